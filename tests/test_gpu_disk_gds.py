"""GPUDirect Storage for the disk tier (``disk_gds``): records read straight
into GPU pages through cuFile and checked there equal the staged path's
pages; corrupt or unreadable records read as a miss; users it cannot serve
go through the host tier; direct reads wait for the caller's stream (and
visibly race without that wait).

Where cuFile does not work these tests skip, unless HSTU_KVCACHE_REQUIRE_GDS=1
(the GPU runs of this project set it), where they fail instead.
"""

import os
import struct

import pytest

import hstu_kvcache as hk
from hstu_kvcache.errors import CacheFullError, StaleLookupError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

L, H, D, P = 2, 2, 32, 8
PAGE_BYTES = 2 * P * H * D * 4            # one layer of one page: 4 KiB


def make(tmp_path, gds="on", gpu_pages=16, host_pages=40, **kw):
    args = dict(num_layers=L, num_heads=H, head_dim=D, page_size=P, num_pages=gpu_pages,
                max_batch_size=4, max_seq_len=800, dtype="float32", device="cuda",
                host_capacity_bytes=host_pages * L * PAGE_BYTES, disk_dir=str(tmp_path),
                disk_capacity_bytes=16 << 20, disk_admit_after=0, disk_gds=gds)
    args.update(kw)
    try:
        return hk.KVCache(hk.KVCacheConfig(**args))
    except hk.KVCacheError as e:
        if gds == "on" and "GPUDirect Storage" in str(e) and \
                os.environ.get("HSTU_KVCACHE_REQUIRE_GDS") != "1":
            pytest.skip(f"cuFile does not work here: {e}")
        raise


def fill(cache, user, length, seed):
    """Serve a new user; its K is a function of the seed (V = K + 1)."""
    k = torch.randn(L, length, H, D, device="cuda",
                    generator=torch.Generator("cuda").manual_seed(seed))
    with cache.prepare([user], [length]) as b:
        cache.append(range(L), k, k + 1, b)
    return k


def push_down(cache, users):
    """Only the disk holds the users afterwards."""
    cache.evict(users, gpu=True, host=False, offload=True)
    cache.sync_transfers()
    cache.evict(users, gpu=False, host=True)
    for u in users:
        assert cache.cached_tiers(u) == (0, 0) and cache.cached_on_disk(u) > 0


def check_user(cache, user, k, length=None):
    """A request of the user: its cached tokens read back exactly."""
    n = k.shape[1]
    with cache.prepare([user], [length or n]) as b:
        assert b.lookup.cached_lengths.tolist() == [n]
        if length and length > n:
            extra = torch.zeros(L, length - n, H, D, device="cuda")
            cache.append(range(L), extra, extra + 1, b)
        for layer in range(L):
            kg, vg = cache.gather(layer, b)
            torch.cuda.synchronize()
            assert torch.equal(kg[:n], k[layer]) and torch.equal(vg[:n], k[layer] + 1)


def test_direct_reads_bring_users_back(tmp_path):
    cache = make(tmp_path, event_capacity=256)
    assert cache.disk_gds_status() in ("direct", "compat")
    ks = {u: fill(cache, u, 40 + 8 * u, u) for u in (1, 2)}   # 6 and 7 pages
    push_down(cache, [1, 2])
    cache.drain_events()
    with cache.prepare([1, 2], [48, 56]) as b:
        assert b.lookup.cached_lengths.tolist() == [48, 56]
        for layer in range(L):
            kg, vg = cache.gather(layer, b)
            torch.cuda.synchronize()
            assert torch.equal(kg, torch.cat([ks[1][layer], ks[2][layer]]))
            assert torch.equal(vg, torch.cat([ks[1][layer], ks[2][layer]]) + 1)
    s = cache.stats()
    assert s["disk_gds_active"] == 1
    assert s["disk_reads"] == s["disk_gds_reads"] == 13
    assert s["onboard_pages"] == 0                 # nothing came through the host
    assert s["checksum_failures"] == 0 and s["disk_gds_fallbacks"] == 0
    got = {(e.user_id, e.tier, e.from_tier, e.page_index, e.num_pages)
           for e in cache.drain_events() if e.kind == "onboarded"}
    assert got == {(1, "gpu", "disk", 0, 6), (2, "gpu", "disk", 0, 7)}
    assert cache.cached_tiers(1) == (48, 0)        # on the GPU, no host copy yet
    cache.check()


def test_direct_and_staged_reads_give_the_same_pages(tmp_path):
    """Users cycling through all three tiers under pressure, twice: with
    GPUDirect Storage and staged; every read-back is exact in both."""
    for gds in ("on", "off"):
        d = tmp_path / gds
        d.mkdir()
        cache = make(d, gds=gds, gpu_pages=20, host_pages=20)
        ks, gen = {}, torch.Generator().manual_seed(5)
        for step in range(16):
            u = int(torch.randint(1, 6, (1,), generator=gen))
            if u in ks and cache.lookup([u], [ks[u].shape[1]]).cached_lengths[0] > 0:
                check_user(cache, u, ks[u])
            else:
                cache.evict([u])
                ks[u] = fill(cache, u, 8 * int(torch.randint(2, 7, (1,), generator=gen)),
                             100 + step)
            if step % 3 == 2:
                push_down(cache, [v for v in ks if cache.cached_tiers(v)[0] > 0])
            cache.check()
        s = cache.stats()
        assert s["disk_reads"] > 0 and s["disk_read_misses"] == 0
        assert (s["disk_gds_reads"] > 0) == (gds == "on")
        cache.close()


def record_offset(path, user, page):
    """Byte offset of the slot holding record (user, page): the header's
    user_id and page_index sit at bytes 16 and 24 of each slot."""
    record = 4096 + L * PAGE_BYTES
    with open(path, "rb") as f:
        data = f.read()
    for at in range(0, len(data) - 64, record):
        if struct.unpack_from("<qq", data, at + 16) == (user, page):
            return at
    raise AssertionError(f"no record of ({user}, {page})")


def flip(path, offset):
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x10]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupt_records_read_as_a_miss(tmp_path, where):
    cache = make(tmp_path, max_seq_len=64)
    k = fill(cache, 1, 40, 7)
    push_down(cache, [1])
    path = os.path.join(tmp_path, "hkv_disk.dat")
    # data: a byte of layer 1's piece; header: its data_len field
    flip(path, record_offset(path, 1, 2) + (4096 + 5000 if where == "data" else 40))
    lk = cache.lookup([1], [40])
    assert lk.cached_lengths.tolist() == [40]
    with pytest.raises(StaleLookupError, match="failed its check"):
        cache.allocate(lk)
    s = cache.stats()
    assert s["checksum_failures"] == 1 and s["disk_read_misses"] == 1
    # the pages before the bad record came in and stay; the rest is gone
    assert cache.cached_tiers(1) == (16, 0) and cache.cached_on_disk(1) == 16
    cache.check()
    check_user(cache, 1, k[:, :16], length=40)     # recomputed from token 16
    cache.check()


def test_read_errors_read_as_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DISK_FAULTS", "read_eio=1")
    cache = make(tmp_path)
    fill(cache, 1, 24, 8)
    push_down(cache, [1])
    with pytest.raises(StaleLookupError):
        cache.prepare([1], [24])
    assert cache.stats()["disk_io_errors"] == 1
    # two I/O threads: the failed read is page 0 or 1; pages before it stay
    n = int(cache.lookup([1], [24]).cached_lengths[0])
    assert n in (0, 8) and cache.cached_on_disk(1) == n
    cache.check()


def test_prepare_async_reads_directly(tmp_path):
    """The worker thread's allocation orders its direct reads after the
    caller's stream as of the submit (its ready event)."""
    cache = make(tmp_path)
    k = fill(cache, 1, 64, 15)
    push_down(cache, [1])
    pending = cache.prepare_async([1], [72])
    assert pending.lookup.cached_lengths.tolist() == [64]
    b = pending.wait(30.0)
    extra = torch.zeros(L, 8, H, D, device="cuda")
    cache.append(range(L), extra, extra + 1, b)
    for layer in range(L):
        kg, _ = cache.gather(layer, b)
        torch.cuda.synchronize()
        assert torch.equal(kg[:64], k[layer])
    b.release()
    assert cache.stats()["disk_gds_reads"] == 8
    cache.check()


def test_a_user_ahead_on_the_host_goes_through_the_host(tmp_path):
    """User 1: no GPU pages, 2 on the host, 5 on disk.  The host's pages
    come first, so its disk pages are staged through the host (a direct
    read would land after a gap in the GPU chain)."""
    cache = make(tmp_path, host_pages=12)
    k1 = fill(cache, 1, 40, 9)
    cache.evict([1], gpu=True, host=False, offload=True)
    cache.sync_transfers()
    fill(cache, 2, 80, 10)
    cache.evict([2], gpu=True, host=False, offload=True)   # host: 3 of user 1's go
    cache.sync_transfers()
    assert cache.cached_tiers(1) == (0, 16) and cache.cached_on_disk(1) == 40
    check_user(cache, 1, k1)
    s = cache.stats()
    assert s["disk_gds_fallbacks"] == 1 and s["disk_gds_reads"] == 0
    assert s["disk_reads"] == 3
    cache.check()


def test_no_gpu_room_fails_cleanly(tmp_path):
    """An open batch holds most GPU pages: the direct reads stop, the rest
    is staged, and the allocation reports the full pool; nothing leaks."""
    cache = make(tmp_path, gpu_pages=8)
    k = fill(cache, 1, 48, 11)                     # 6 pages
    push_down(cache, [1])
    hold = cache.prepare([2], [40])                # 5 of the 8 pages, pinned
    with pytest.raises(CacheFullError):
        cache.prepare([1], [48])
    assert cache.stats()["disk_gds_fallbacks"] >= 1
    cache.check()
    hold.release()
    cache.evict([2])
    check_user(cache, 1, k)
    cache.check()


def test_direct_reads_wait_for_the_callers_stream(tmp_path):
    """A kernel queued before the allocation still reads user 1's pages
    when the direct reads of user 2 take them (the GPU tier is exactly one
    user big): the reads must wait for it."""
    cache = make(tmp_path, gpu_pages=5, offload_mode="eager")
    # CUDA loads a kernel's module at its first launch, which waits for all
    # work on the device and would order the reads by itself: launch every
    # kernel of the race (direct read and its CRC, read, gather) once first
    k3 = fill(cache, 3, 8, 99)
    push_down(cache, [3])
    check_user(cache, 3, k3)
    cache.read(3, 0)
    cache.evict([3])
    torch.cuda.synchronize()
    k1 = fill(cache, 1, 40, 12)
    k2 = fill(cache, 2, 40, 13)                    # evicts user 1 (host copy kept)
    push_down(cache, [2])
    check_user(cache, 1, k1)                       # user 1 back on the GPU
    cache.sync_transfers()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)                 # the GPU is busy for a while ...
    got, _ = cache.read(1, 0)                      # ... then reads user 1's pages
    with cache.prepare([2], [40]) as b:            # takes those pages for user 2
        kg, _ = cache.gather(0, b)
    torch.cuda.synchronize()
    assert torch.equal(got, k1[0])
    assert torch.equal(kg, k2[0])
    assert cache.stats()["disk_gds_reads"] == 6
    cache.check()


def test_direct_read_ordering_fails_without_the_wait(tmp_path, monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_SKIP_WAITS", "1")
    with pytest.raises(AssertionError):
        test_direct_reads_wait_for_the_callers_stream(tmp_path)
    torch.cuda.synchronize()


def test_auto_without_cufile_stays_staged(tmp_path, monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_CUFILE_LIB", "/nonexistent/libcufile.so.0")
    cache = make(tmp_path, gds="auto")
    assert cache.disk_gds_status().startswith("unavailable: GPUDirect Storage")
    k = fill(cache, 1, 24, 14)
    push_down(cache, [1])
    check_user(cache, 1, k)
    s = cache.stats()
    assert s["disk_gds_active"] == 0 and s["disk_gds_reads"] == 0 and s["disk_reads"] == 3
    d2 = tmp_path / "on"
    d2.mkdir()
    with pytest.raises(hk.KVCacheError, match="libcufile"):
        hk.KVCache(hk.KVCacheConfig(
            num_layers=L, num_heads=H, head_dim=D, page_size=P, num_pages=8,
            device="cuda", host_capacity_bytes=8 * L * PAGE_BYTES, disk_dir=str(d2),
            disk_capacity_bytes=1 << 20, disk_gds="on"))
