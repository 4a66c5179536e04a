"""Configuration of a KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .errors import InvalidArgumentError

#: dtype name -> (DLPack type code, bits)
DTYPES = {
    "float32": (2, 32),
    "float16": (2, 16),
    "bfloat16": (4, 16),
}


#: Largest ``event_capacity`` (records of 48 bytes: 768 MiB).
MAX_EVENT_CAPACITY = 1 << 24


def dtype_name(dtype: Any) -> str:
    """Normalise a dtype given as a string, a torch dtype or a NumPy dtype."""
    name = str(dtype)
    for prefix in ("torch.", "<class 'numpy.", "dtype('"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.rstrip("')>")
    aliases = {"float": "float32", "half": "float16", "bf16": "bfloat16",
               "fp32": "float32", "fp16": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise InvalidArgumentError(
            f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return name


def parse_device(device: Any) -> Tuple[str, int]:
    """('cpu', 0) or ('cuda', index) from 'cpu', 'cuda', 'cuda:1' or a torch.device."""
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu", 0
    if text == "cuda":
        idx = None if isinstance(device, str) else getattr(device, "index", None)
        return "cuda", int(idx) if idx is not None else 0
    if text.startswith("cuda:"):
        try:
            idx = int(text[5:])
        except ValueError:
            idx = -1
        if idx >= 0:
            return "cuda", idx
    raise InvalidArgumentError(
        f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _positive_int(name: str, value: Any, low: int = 1, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numbers
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise InvalidArgumentError(f"{name} must be an integer, got {value!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise InvalidArgumentError(f"{name} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class KVCacheConfig:
    """What a :class:`~hstu_kvcache.KVCache` holds and how much.

    Args:
        num_layers: HSTU layers whose K/V are cached.
        num_heads: attention heads per layer.
        head_dim: dimension of one head's K and V.
        num_pages: pages of the GPU tier (of host memory on ``device='cpu'``).
        page_size: tokens per page, a power of two from 2 to 256.
        dtype: ``'float32'``, ``'float16'`` or ``'bfloat16'`` (torch and NumPy
            dtypes are accepted too).
        device: ``'cpu'`` (C loops on host memory) or ``'cuda[:N]'``.
        max_batch_size: most users in one batch.
        max_seq_len: longest history a request may carry.
        max_batch_tokens: most new (uncached) history tokens in one batch;
            default ``max_batch_size * max_seq_len``.  Sizes the per-batch
            metadata buffers.
        verify_tokens: verified mode: lookups take one int64 key per history
            token and reuse only the prefix whose keys match the cached ones,
            so rewritten or truncated histories are recomputed, never reused
            wrongly.  Trust mode (default, the recsys-examples semantics)
            assumes histories only grow.
        max_open_batches: batches (with their metadata) that may be alive at
            once; each costs one metadata buffer.
        host_capacity_bytes: size of the host tier (pinned host memory on
            CUDA); 0 disables it.  Pages evicted from the GPU tier are kept
            there and onboarded back when their user returns.
        offload_mode: ``'lazy'`` (write pages back to the host tier when
            they are evicted from the GPU) or ``'eager'`` (copy a batch's
            full pages to the host as soon as it commits, in the background,
            so evictions cost nothing).
        max_offload_bytes: offload bytes that may be in flight at once
            (0: 2 GiB).  Past it, eager offloads are deferred to eviction
            time and write-backs at eviction wait for older copies
            (backpressure), so queued copy work stays bounded and onboards
            never queue behind seconds of offloads.
        event_capacity: records of the cache's event ring
            (:meth:`KVCache.drain_events`, :mod:`hstu_kvcache.events`); 0
            (default) disables events at no cost.  65536 (3 MiB) holds a few
            seconds of a busy cache between drains; when the ring is full the
            oldest records are dropped and counted (``events_dropped``).
        disk_dir: an existing directory for the disk tier (below the host
            tier; None: no disk tier).  Its file ``hkv_disk.dat`` holds
            checksummed records; a record that fails its check reads as a
            miss (the tokens are recomputed), never as wrong data.
        disk_capacity_bytes: size of the disk tier's file.
        disk_persist: keep the records across close and reopen (each record
            is made durable before it counts); False starts empty.
        disk_admit_after: requests of a user before its pages are written
            to disk (default 2: spares the SSD one-off users); 0: at once.
        disk_io_threads: threads doing the disk tier's reads and writes
            (default 2: enough for one SATA or network disk; a fast NVMe
            drive, or GPUDirect Storage, may want more).
        disk_gds: GPUDirect Storage for reads from the disk tier.
            ``'off'`` (default): disk -> pinned host page -> GPU (the staged
            path).  ``'auto'``: where NVIDIA's cuFile (libcufile) loads and
            opens, records of users whose pages continue their GPU pages
            are read straight into GPU pages and checked there; elsewhere
            the staged path, and :meth:`KVCache.disk_gds_status` says why.
            ``'on'``: like auto, but creating the cache fails where cuFile
            does not work.  A direct read first waits for the work queued
            on the caller's stream (the pages it writes may still be read
            there), so it does not overlap the previous batch's compute the
            way the staged path does; benchmarks/bench_disk.py measures
            both.  Without the nvidia-fs kernel module cuFile runs in
            compatibility mode (``disk_gds_status() == 'compat'``).
        copy_engines: how tier transfers move pages on CUDA.  True
            (default): runs of consecutive pages go by DMA on the GPU's copy
            engines (97-99 % of the PCIe link on an H100), scattered pages
            by a small copy kernel.  The model's own host<->device copies
            issued while a transfer runs then queue behind it on the copy
            engine (a synchronous ``tensor.to("cuda")`` in the forward waits
            for the whole onboarding).  False: the copy kernel moves every
            page (90-94 % of the link, on 32 SMs) and the copy engines stay
            free for the model; faster end to end for a model that copies
            during its forward (benchmarks/bench_e2e.py measures both).
        early_reuse: pipelined inference prepares batch N+1 while batch N
            still computes, and the same user can be in both.  With
            early_reuse (default) the tokens batch N is appending count as
            cached for batch N+1: it continues where N ends (or only reads
            them), and its reads of them wait per layer for N's appends (a
            read of a layer N has not appended yet, or of tokens of a batch
            released unfinished, raises instead of reading garbage).  At
            most two batches fill one user at once.  Off: such a user is
            busy (CacheBusyError) until N is done.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    num_pages: int
    page_size: int = 32
    dtype: Any = "float32"
    device: Any = "cpu"
    max_batch_size: int = 64
    max_seq_len: int = 8192
    max_batch_tokens: Optional[int] = None
    verify_tokens: bool = False
    max_open_batches: int = 8
    host_capacity_bytes: int = 0
    offload_mode: str = "lazy"
    max_offload_bytes: int = 0
    event_capacity: int = 0
    early_reuse: bool = True
    copy_engines: bool = True
    disk_dir: Optional[str] = None
    disk_capacity_bytes: int = 0
    disk_persist: bool = False
    disk_admit_after: int = 2
    disk_io_threads: int = 2
    disk_gds: str = "off"
    device_kind: str = field(init=False, repr=False)
    device_index: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "num_layers", _positive_int("num_layers", self.num_layers, 1, 1024))
        set_(self, "num_heads", _positive_int("num_heads", self.num_heads))
        set_(self, "head_dim", _positive_int("head_dim", self.head_dim))
        set_(self, "num_pages", _positive_int("num_pages", self.num_pages, 1, 2**31 - 1))
        ps = _positive_int("page_size", self.page_size, 2, 256)
        if ps & (ps - 1):
            raise InvalidArgumentError(f"page_size must be a power of two in 2..256, got {ps}")
        set_(self, "page_size", ps)
        set_(self, "dtype", dtype_name(self.dtype))
        kind, index = parse_device(self.device)
        set_(self, "device_kind", kind)
        set_(self, "device_index", index)
        set_(self, "device", "cpu" if kind == "cpu" else f"cuda:{index}")
        set_(self, "max_batch_size", _positive_int("max_batch_size", self.max_batch_size, 1, 2**20))
        set_(self, "max_seq_len", _positive_int("max_seq_len", self.max_seq_len, 1, 2**30))
        if self.max_batch_tokens is not None:
            set_(self, "max_batch_tokens",
                 _positive_int("max_batch_tokens", self.max_batch_tokens, 1, 2**30))
        if self.disk_dir is not None:
            import os
            d = os.fspath(self.disk_dir)
            if not os.path.isdir(d):
                raise InvalidArgumentError(f"disk_dir {d!r} is not an existing directory")
            set_(self, "disk_dir", d)
            if self.host_capacity_bytes <= 0:
                raise InvalidArgumentError("the disk tier sits below the host tier: set "
                                           "host_capacity_bytes too")
            set_(self, "disk_capacity_bytes",
                 _positive_int("disk_capacity_bytes", self.disk_capacity_bytes, 1, 2**62))
        if not isinstance(self.disk_persist, bool):
            raise InvalidArgumentError(f"disk_persist must be a bool, got {self.disk_persist!r}")
        set_(self, "disk_admit_after",
             _positive_int("disk_admit_after", self.disk_admit_after, 0, 2**30))
        set_(self, "disk_io_threads",
             _positive_int("disk_io_threads", self.disk_io_threads, 1, 64))
        if self.disk_gds not in ("off", "auto", "on"):
            raise InvalidArgumentError(
                f"disk_gds must be 'off', 'auto' or 'on', got {self.disk_gds!r}")
        if self.disk_gds != "off" and self.disk_dir is None:
            raise InvalidArgumentError("disk_gds reads the disk tier: set disk_dir too")
        if not isinstance(self.copy_engines, bool):
            raise InvalidArgumentError(f"copy_engines must be a bool, got {self.copy_engines!r}")
        if not isinstance(self.early_reuse, bool):
            raise InvalidArgumentError(f"early_reuse must be a bool, got {self.early_reuse!r}")
        if not isinstance(self.verify_tokens, bool):
            raise InvalidArgumentError(f"verify_tokens must be a bool, got {self.verify_tokens!r}")
        set_(self, "max_open_batches",
             _positive_int("max_open_batches", self.max_open_batches, 1, 1024))
        set_(self, "host_capacity_bytes",
             _positive_int("host_capacity_bytes", self.host_capacity_bytes, 0))
        set_(self, "event_capacity",
             _positive_int("event_capacity", self.event_capacity, 0, MAX_EVENT_CAPACITY))
        if self.offload_mode not in ("lazy", "eager"):
            raise InvalidArgumentError(
                f"offload_mode must be 'lazy' or 'eager', got {self.offload_mode!r}")
        set_(self, "max_offload_bytes",
             _positive_int("max_offload_bytes", self.max_offload_bytes, 0, 2**62))
        if 0 < self.host_capacity_bytes < self.num_layers * self.page_bytes:
            raise InvalidArgumentError(
                f"host_capacity_bytes={self.host_capacity_bytes} holds no page: one page "
                f"of all layers takes {self.num_layers * self.page_bytes} bytes")

    @property
    def element_size(self) -> int:
        """Bytes of one K or V element."""
        return DTYPES[self.dtype][1] // 8

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in one layer (K and V)."""
        return 2 * self.page_size * self.num_heads * self.head_dim * self.element_size

    @property
    def table_bytes(self) -> int:
        """Bytes of the whole page table: all layers, all pages."""
        return self.num_layers * self.num_pages * self.page_bytes

    @property
    def host_pages(self) -> int:
        """Pages (of all layers) the host tier holds."""
        return self.host_capacity_bytes // (self.num_layers * self.page_bytes)

    @property
    def max_tokens(self) -> int:
        """History tokens the page table can hold."""
        return self.num_pages * self.page_size
