"""The native API: :class:`KVCache`, :class:`LookupResult` and :class:`Batch`.

A request batch goes through::

    lookup = cache.lookup(user_ids, history_lengths)   # microseconds, synchronous
    # ... strip lookup.cached_lengths tokens, embed only the new ones ...
    batch = cache.allocate(lookup)                     # pages + metadata
    for layer in range(num_layers):
        ...compute K, V of the new tokens...
        cache.append(layer, k, v, batch)              # write them into pages
        ...attend with batch.kv_indices / kv_indptr / kv_last_page_len...
    batch.release()                                    # or `with batch:`

Everything stateful lives in the C core; this module converts arguments and
shapes results.
"""

from __future__ import annotations

import gc
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _C
from ._tensors import (DL_CPU, DL_CUDA, Exported, capsule, current_stream, has_torch,
                       int64_array, is_torch, require_torch, torch)
from .config import DTYPES, KVCacheConfig
from .errors import CacheBusyError, InvalidArgumentError
from .events import CacheEvent

IntArray = Union[Sequence[int], np.ndarray, Any]

_FIELDS = _C.META_FIELDS


class LookupResult:
    """What the cache holds for a batch of users.

    Attributes:
        user_ids: int64 [B].
        history_lengths: int64 [B], the request's history lengths.
        cached_lengths: int64 [B], leading history tokens whose K/V are cached.
        new_lengths: int64 [B], history tokens to compute (history - cached).
        token_keys: the keys given in verified mode, else None.
    """

    __slots__ = ("user_ids", "history_lengths", "cached_lengths", "token_keys",
                 "_epochs", "_cache")

    def __init__(self, cache: "KVCache", user_ids: np.ndarray, history_lengths: np.ndarray,
                 cached_lengths: np.ndarray, epochs: np.ndarray,
                 token_keys: Optional[np.ndarray]):
        self._cache = cache
        self.user_ids = user_ids
        self.history_lengths = history_lengths
        self.cached_lengths = cached_lengths
        self._epochs = epochs
        self.token_keys = token_keys

    @property
    def new_lengths(self) -> np.ndarray:
        return self.history_lengths - self.cached_lengths

    @property
    def batch_size(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def hit_tokens(self) -> int:
        return int(self.cached_lengths.sum())

    @property
    def hit_rate(self) -> float:
        """Fraction of the batch's history tokens found cached."""
        total = int(self.history_lengths.sum())
        return self.hit_tokens / total if total else 0.0

    def __repr__(self) -> str:
        return (f"LookupResult(batch_size={self.batch_size}, "
                f"cached={self.cached_lengths.tolist()}, "
                f"history={self.history_lengths.tolist()})")


class Batch:
    """An allocated batch: pages reserved for its new tokens, users pinned,
    and the metadata a paged attention kernel reads.

    The metadata fields are int32 tensors on the cache's device (torch
    tensors when torch is installed, else NumPy arrays on the CPU path);
    ``batch.host(name)`` gives the host copy as NumPy:

    - ``kv_indptr`` [B+1], ``kv_indices`` [pages], ``kv_last_page_len`` [B]
      (FlashInfer layout; 0 for an empty history),
    - ``total_history_lengths`` [B], ``total_history_offsets`` [B+1],
    - ``cached_lengths`` [B], ``new_history_lengths`` [B], ``new_history_offsets`` [B+1],
    - ``batch_indices`` and ``positions`` [new_history_nnz]: each new token's
      user and absolute position in its history,
    - ``row_offsets`` [B+1]: first row of each user in ``append``'s input
      when the batch was allocated with candidates.

    The batch commits (its tokens count as cached) when every layer was
    appended.  ``release()`` (or leaving a ``with`` block, or dropping the
    batch) unpins its users and rolls back a batch that did not commit.
    """

    def __init__(self, cache: "KVCache", native: Any, lookup: LookupResult):
        self._cache = cache
        self._native = native
        self.lookup = lookup
        (self.batch_size, self.num_pages, self.total_history_tokens,
         self.new_history_nnz, self.num_rows, _, _) = native.info()
        self._host: Optional[np.ndarray] = None
        self._device: Any = None
        self._views: Dict[str, Any] = {}

    # -- metadata -----------------------------------------------------
    def _lengths(self) -> Dict[str, int]:
        b = self.batch_size
        return {"kv_indptr": b + 1, "kv_last_page_len": b, "total_history_lengths": b,
                "total_history_offsets": b + 1, "cached_lengths": b,
                "new_history_lengths": b, "new_history_offsets": b + 1,
                "row_offsets": b + 1, "zeros": b, "kv_indices": self.num_pages,
                "batch_indices": self.new_history_nnz,
                "positions": self.new_history_nnz}

    def _host_block(self) -> np.ndarray:
        if self._host is None:
            native = self._native
            self._host = np.from_dlpack(Exported(lambda: native.export_meta(False),
                                                 (DL_CPU, 0)))
        return self._host

    def _device_block(self) -> Any:
        if self._device is None:
            cfg = self._cache.config
            if cfg.device_kind == "cpu":
                if has_torch():
                    native = self._native
                    self._device = torch.from_dlpack(Exported(
                        lambda: native.export_meta(False), (DL_CPU, 0)))
                else:
                    self._device = self._host_block()
            else:
                require_torch("CUDA metadata tensors")
                native = self._native
                self._device = torch.from_dlpack(Exported(
                    lambda: native.export_meta(True), (DL_CUDA, cfg.device_index)))
        return self._device

    def host(self, name: str) -> np.ndarray:
        """Host (NumPy) copy of a metadata field.  On CUDA, ``batch_indices``
        and ``positions`` exist only on the device."""
        n = self._lengths().get(name)
        if n is None or name == "zeros":
            raise InvalidArgumentError(f"unknown metadata field {name!r}")
        if self._cache.config.device_kind == "cuda" and name in ("batch_indices", "positions"):
            raise InvalidArgumentError(f"{name} is computed on the GPU; use batch.{name}")
        off = self._cache._meta_offsets[name]
        return self._host_block()[off:off + n]

    def _field(self, name: str) -> Any:
        view = self._views.get(name)
        if view is None:
            off = self._cache._meta_offsets[name]
            view = self._device_block()[off:off + self._lengths()[name]]
            self._views[name] = view
        return view

    kv_indptr = property(lambda self: self._field("kv_indptr"))
    kv_indices = property(lambda self: self._field("kv_indices"))
    kv_last_page_len = property(lambda self: self._field("kv_last_page_len"))
    total_history_lengths = property(lambda self: self._field("total_history_lengths"))
    total_history_offsets = property(lambda self: self._field("total_history_offsets"))
    cached_lengths = property(lambda self: self._field("cached_lengths"))
    new_history_lengths = property(lambda self: self._field("new_history_lengths"))
    new_history_offsets = property(lambda self: self._field("new_history_offsets"))
    row_offsets = property(lambda self: self._field("row_offsets"))
    batch_indices = property(lambda self: self._field("batch_indices"))
    positions = property(lambda self: self._field("positions"))

    # -- lifecycle ----------------------------------------------------
    @property
    def committed(self) -> bool:
        """True once every layer was appended (or there was nothing to append)."""
        return bool(self._native.info()[5])

    @property
    def released(self) -> bool:
        return bool(self._native.info()[6])

    def wait_layer(self, layer: int, stream: Any = None) -> None:
        """Make ``stream`` (default: the current one) wait, without blocking
        the host, until ``layer`` of the pages this batch onboarded from the
        host tier has arrived.  ``append`` and ``gather`` do this by
        themselves; call it before a paged attention kernel reads the table
        of that layer.  A no-op on the CPU and when nothing was onboarded."""
        cfg = self._cache.config
        self._native.wait_layer(int(layer),
                                current_stream(cfg.device_kind, cfg.device_index, stream))

    def release(self) -> None:
        """Unpin the batch's users; rolls back the batch if it did not commit.
        The metadata stays readable until the batch object is dropped."""
        self._native.close()

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"Batch(batch_size={self.batch_size}, new_history_nnz={self.new_history_nnz}, "
                f"pages={self.num_pages}, committed={self.committed}, "
                f"released={self.released})")


class PendingBatch:
    """A batch being allocated on the cache's worker thread (see
    :meth:`KVCache.prepare_async`).  ``lookup`` is ready at once; the batch
    comes from :meth:`wait`."""

    def __init__(self, cache: "KVCache", native: Any, lookup: LookupResult):
        self._cache = cache
        self._native = native
        self._batch: Optional[Batch] = None
        self.lookup = lookup

    def ready(self) -> bool:
        """True once the allocation has finished (without blocking)."""
        return bool(self._native.done())

    def wait(self, timeout: Optional[float] = None) -> Batch:
        """Block until the allocation has finished (at most ``timeout``
        seconds) and return the batch.  Raises the allocation's error
        (``CacheFullError``, ``StaleLookupError``...) or ``CacheBusyError``
        when the timeout passed first (the prepare stays pending).  Later
        calls return the same batch."""
        if self._batch is None:
            native = self._native.wait(-1.0 if timeout is None else max(0.0, float(timeout)))
            self._batch = Batch(self._cache, native, self.lookup)
        return self._batch

    def wait_layer(self, layer: int, stream: Any = None,
                   timeout: Optional[float] = None) -> Batch:
        """Make ``stream`` wait, without blocking the host on the copies,
        until ``layer`` of the batch's onboarded pages has arrived (see
        :meth:`Batch.wait_layer`); the host waits only until the worker has
        launched the allocation.  Returns the batch."""
        batch = self.wait(timeout)
        batch.wait_layer(layer, stream)
        return batch


def _preload_cufile() -> None:
    """Make libcufile findable for the core's dlopen where it came with pip.

    The core looks for ``libcufile.so.0`` on the loader's path and in
    CUDA's usual places.  PyTorch's CUDA wheels ship it inside the
    ``nvidia`` packages instead; loading it here by its full path makes the
    core's dlopen by name find it.  Nothing happens when it is absent.
    """
    import ctypes
    import glob
    import os
    import sys

    if os.environ.get("HSTU_KVCACHE_CUFILE_LIB"):
        return
    for root in sys.path:
        for path in sorted(glob.glob(os.path.join(root or ".", "nvidia", "*", "lib",
                                                  "libcufile.so.0"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


class KVCache:
    """A paged KV cache for HSTU inference (see :class:`KVCacheConfig`).

    Thread-safe: calls from several threads are serialised in the C core,
    which runs without the GIL.
    """

    def __init__(self, config: KVCacheConfig):
        if not isinstance(config, KVCacheConfig):
            raise InvalidArgumentError("KVCache needs a KVCacheConfig")
        self.config = config
        code, bits = DTYPES[config.dtype]
        if config.disk_gds != "off" and config.device_kind != "cpu":
            _preload_cufile()
        self._native = _C.Cache(
            num_layers=config.num_layers, num_heads=config.num_heads,
            head_dim=config.head_dim, page_size=config.page_size,
            num_pages=config.num_pages, dtype_code=code, dtype_bits=bits,
            device_kind=0 if config.device_kind == "cpu" else 1,
            device_index=config.device_index, max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len,
            max_batch_tokens=config.max_batch_tokens or 0,
            verify_tokens=config.verify_tokens,
            max_open_batches=config.max_open_batches,
            host_pages=config.host_pages,
            offload_mode=0 if config.offload_mode == "lazy" else 1,
            max_offload_bytes=config.max_offload_bytes,
            event_capacity=config.event_capacity,
            early_reuse=config.early_reuse,
            kernel_copies=not config.copy_engines,
            disk_dir=config.disk_dir, disk_capacity_bytes=config.disk_capacity_bytes,
            disk_persist=config.disk_persist, disk_admit_after=config.disk_admit_after,
            disk_gds={"off": 0, "auto": 1, "on": 2}[config.disk_gds],
            disk_io_threads=config.disk_io_threads)
        self._meta_offsets = dict(zip(_FIELDS, self._native.meta_offsets()))
        self._dl_device = (DL_CPU, 0) if config.device_kind == "cpu" else (
            DL_CUDA, config.device_index)
        self._local = threading.local()

    # -- lookup / allocate ----------------------------------------------
    def lookup(self, user_ids: IntArray, history_lengths: IntArray,
               token_keys: Optional[IntArray] = None) -> LookupResult:
        """How many leading history tokens of each user are cached.

        Args:
            user_ids: int64 [B], distinct.
            history_lengths: [B], each user's whole history length in this request.
            token_keys: verified mode only: int64, one key per history token,
                users one after another (``sum(history_lengths)`` keys).
        """
        ids = int64_array(user_ids, "user_ids")
        lengths = int64_array(history_lengths, "history_lengths")
        keys = None if token_keys is None else int64_array(token_keys, "token_keys")
        if lengths.shape != ids.shape:
            raise InvalidArgumentError(
                f"history_lengths has {lengths.shape[0]} entries for {ids.shape[0]} users")
        cached = np.empty_like(ids)
        epochs = np.empty(ids.shape, dtype=np.uint64)
        self._native.lookup(ids, lengths, keys, cached, epochs)
        return LookupResult(self, ids, lengths, cached, epochs, keys)

    def allocate(self, lookup: LookupResult, num_candidates: Optional[IntArray] = None,
                 stream: Any = None) -> Batch:
        """Reserve pages for the new tokens of a looked-up batch and build its
        metadata (uploaded on ``stream`` on CUDA).  Evicts least recently used
        users (tail pages first) when the pool is full.

        Args:
            lookup: the result of :meth:`lookup` for this batch.
            num_candidates: [B], optional: ``append`` will then also accept
                rows laid out per user as [new history ; candidates], and skip
                the candidates (they are never cached).

        Raises:
            CacheFullError: the pool cannot hold the batch; nothing changed.
            StaleLookupError: a user's entry changed since the lookup.
            CacheBusyError: a user is in an open batch that is still appending,
                or too many batches are open.
        """
        if not isinstance(lookup, LookupResult) or lookup._cache is not self:
            raise InvalidArgumentError("allocate needs a LookupResult of this cache")
        cands = self._candidates(num_candidates, lookup)
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        args = (lookup.user_ids, lookup.history_lengths, lookup.cached_lengths,
                lookup._epochs, lookup.token_keys, cands, handle)
        try:
            native = self._native.allocate(*args)
        except CacheBusyError as e:
            if "batch slots" not in str(e):
                raise
            # Batches that only a reference cycle keeps alive (seen under
            # compute-sanitizer) are freed by the cyclic collector: collect
            # once and retry before giving up.
            gc.collect()
            native = self._native.allocate(*args)
        return Batch(self, native, lookup)

    def prepare_async(self, user_ids: IntArray, history_lengths: IntArray,
                      token_keys: Optional[IntArray] = None,
                      num_candidates: Optional[IntArray] = None,
                      stream: Any = None) -> PendingBatch:
        """:meth:`lookup` now, :meth:`allocate` on the cache's worker thread.

        Returns at once: the caller strips the cached tokens
        (``pending.lookup.cached_lengths``) and runs its embedding lookup while
        the worker allocates pages, evicts, writes back, uploads the metadata
        and launches the onboarding on ``stream`` and the side streams; then
        ``pending.wait()`` gives the :class:`Batch`."""
        lookup = self.lookup(user_ids, history_lengths, token_keys)
        cands = self._candidates(num_candidates, lookup)
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        native = self._native.prepare_async(lookup.user_ids, lookup.history_lengths,
                                            lookup.cached_lengths, lookup._epochs,
                                            lookup.token_keys, cands, handle)
        return PendingBatch(self, native, lookup)

    def prepare(self, user_ids: IntArray, history_lengths: IntArray,
                token_keys: Optional[IntArray] = None,
                num_candidates: Optional[IntArray] = None, stream: Any = None) -> Batch:
        """:meth:`lookup` and :meth:`allocate` in one call; the lookup result
        is ``batch.lookup``."""
        return self.allocate(self.lookup(user_ids, history_lengths, token_keys),
                             num_candidates=num_candidates, stream=stream)

    # -- K/V in and out ---------------------------------------------------
    def append(self, layer: Union[int, range, slice], k: Any, v: Any, batch: Batch,
               stream: Any = None) -> None:
        """Write the new history tokens' K and V of ``layer`` into their pages.

        ``k`` and ``v`` are ``[rows, num_heads, head_dim]`` (or
        ``[rows, num_heads * head_dim]``) in the cache's dtype and device, with
        rows = ``batch.new_history_nnz``, or ``batch.num_rows`` when the batch
        was allocated with candidates.  For several layers at once pass a
        ``range``/``slice`` and ``[layers, rows, H, D]`` tensors.
        """
        first, count = self._layer_range(layer)
        self._check_batch(batch)
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        batch._native.append(first, count, capsule(k, "k"), capsule(v, "v"), handle)

    def gather(self, layer: int, batch: Batch, stream: Any = None) -> Tuple[Any, Any]:
        """K and V of every history token of the batch (cached and newly
        appended) for ``layer``, read from the pages: two tensors
        ``[total_history_tokens, H, D]`` jagged by ``batch.total_history_offsets``."""
        require_torch("gather")
        self._check_batch(batch)
        cfg = self.config
        dev = torch.device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        n = batch.total_history_tokens
        k = torch.empty((n, cfg.num_heads, cfg.head_dim), dtype=dtype, device=dev)
        v = torch.empty_like(k)
        scratch = torch.empty((2, n), dtype=torch.int32, device=dev)
        handle = current_stream(cfg.device_kind, cfg.device_index, stream)
        batch._native.read(int(layer), capsule(k, "k"), capsule(v, "v"),
                           capsule(scratch[0], "batch_indices"),
                           capsule(scratch[1], "positions"), handle)
        return k, v

    def read(self, user_id: int, layer: int, stream: Any = None) -> Tuple[Any, Any]:
        """The cached K and V of one user for one layer, ``[cached_len, H, D]``
        each (for tests and debugging)."""
        cfg = self.config
        length = self.cached_length(user_id)
        shape = (length, cfg.num_heads, cfg.head_dim)
        if has_torch():
            dtype = getattr(torch, cfg.dtype)
            k = torch.empty(shape, dtype=dtype, device=torch.device(cfg.device))
            v = torch.empty_like(k)
        else:
            if cfg.device_kind != "cpu" or cfg.dtype == "bfloat16":
                require_torch(f"reading {cfg.dtype} on {cfg.device}")
            k = np.empty(shape, dtype=cfg.dtype)
            v = np.empty_like(k)
        handle = current_stream(cfg.device_kind, cfg.device_index, stream)
        n = self._native.read_user(int(user_id), int(layer), capsule(k, "k"),
                                   capsule(v, "v"), handle)
        return k[:n], v[:n]

    def gather_pages(self, page_ids: Any, layers: Union[int, range, slice, None] = None,
                     out: Any = None, stream: Any = None) -> Any:
        """Copy whole pages out of the table into a contiguous staging tensor
        ``[layers, n, 2, page_size, H, D]`` (the building block of offload).

        ``page_ids`` is an int32 tensor on the cache's device; ``layers``
        defaults to all layers.  Returns ``out`` (allocated if not given)."""
        require_torch("gather_pages")
        first, count = self._layer_range(layers if layers is not None
                                         else range(self.config.num_layers))
        if out is None:
            cfg = self.config
            out = torch.empty((count, int(page_ids.shape[0]), 2, cfg.page_size,
                               cfg.num_heads, cfg.head_dim), dtype=getattr(torch, cfg.dtype),
                              device=torch.device(cfg.device))
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        self._native.copy_pages(True, first, count, capsule(page_ids, "page_ids"),
                                capsule(out, "staging"), handle)
        return out

    def scatter_pages(self, page_ids: Any, staging: Any,
                      layers: Union[int, range, slice, None] = None, stream: Any = None) -> None:
        """Copy a staging tensor ``[layers, n, 2, page_size, H, D]`` into the
        pages ``page_ids`` (distinct; the building block of onboard).  This
        writes K/V behind the index's back: meant for tests, benchmarks and
        the tiers."""
        first, count = self._layer_range(layers if layers is not None
                                         else range(self.config.num_layers))
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        self._native.copy_pages(False, first, count, capsule(page_ids, "page_ids"),
                                capsule(staging, "staging"), handle)

    def cached_length(self, user_id: int) -> int:
        """Tokens of the user's history whose K/V are cached (0 if unknown)."""
        return self._native.user_length(int(user_id))

    # -- eviction / stats ---------------------------------------------------
    def evict(self, user_ids: IntArray, gpu: bool = True, host: bool = True,
              offload: bool = False, stream: Any = None,
              disk: Optional[bool] = None) -> None:
        """Drop these users' cached K/V from the GPU tier and/or the host tier
        (and the disk tier: by default when both others are dropped).

        With ``offload=True`` (and a host tier) GPU pages are written back to
        the host tier before they are dropped, so the users stay cached.
        Unknown users are ignored; users in an open batch raise
        CacheBusyError (and nobody is dropped)."""
        tiers = self._tiers(gpu, host, disk)
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        self._native.evict(int64_array(user_ids, "user_ids"), tiers, bool(offload), handle)

    def prefetch(self, user_ids: IntArray, stream: Any = None) -> int:
        """Start bringing these users' cached pages from the host tier to the
        GPU tier ahead of their requests (for example when a user opens the
        app), so their next :meth:`prepare` finds them on the GPU.

        A hint: it never blocks (the copies run on a side stream; a batch
        that uses the users waits for them per layer, like for its own
        onboarding), takes only free GPU pages or pages that already have a
        host copy (never a write-back, never a user in an open batch), and
        drops users it has no room for, or all of them when too many
        prefetches are in flight.  Unknown users, users in open batches and
        users with nothing only on the host are skipped.  Returns how many
        users' pages are on their way."""
        ids = int64_array(user_ids, "user_ids")
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        step = self.config.max_batch_size
        return sum(int(self._native.prefetch(ids[i:i + step], handle))
                   for i in range(0, len(ids), step))

    def evict_all(self, gpu: bool = True, host: bool = True, offload: bool = False,
                  stream: Any = None) -> int:
        """:meth:`evict` for every user not in an open batch; returns how many
        users were touched.  Disk records of users that no upper tier holds
        stay (they are found again by lookup)."""
        tiers = self._tiers(gpu, host, None)
        handle = current_stream(self.config.device_kind, self.config.device_index, stream)
        return self._native.evict_all(tiers, bool(offload), handle)

    def cached_tiers(self, user_id: int) -> Tuple[int, int]:
        """``(tokens on the GPU tier, tokens on the host tier)`` of a user;
        both tiers hold a prefix of its history."""
        return tuple(self._native.user_tiers(int(user_id))[:2])  # type: ignore[return-value]

    def cached_on_disk(self, user_id: int) -> int:
        """Tokens of a user the disk tier holds (a prefix of its history; 0
        without a disk tier).  A record can still fail its check when read:
        it is then a miss."""
        return int(self._native.user_tiers(int(user_id))[2])

    def disk_gds_status(self) -> str:
        """How reads from the disk tier reach the GPU.

        ``'off'`` (no disk tier, or ``disk_gds='off'``: staged through the
        host tier), ``'direct'`` (GPUDirect Storage with the nvidia-fs
        driver: DMA from the drive into GPU memory), ``'compat'`` (cuFile's
        compatibility mode: it reads into its own pinned buffers and
        copies), or ``'unavailable: <why>'`` (``disk_gds='auto'`` where
        cuFile does not work: staged).
        """
        return str(self._native.gds_status())

    def sync_transfers(self) -> None:
        """Block until every onboard and offload in flight has completed."""
        self._native.sync_transfers()

    def stats(self) -> Dict[str, Union[int, float]]:
        """Counters of the core as a plain dict (plus ``hit_rate``).

        Counters only grow; gauges (``pages_free``, ``host_pages_used``,
        ``transfers_in_flight``, ``offload_queued_bytes``, ``events_pending``,
        ...) are the state now; ``*_latency`` entries are histograms
        ``{"buckets": [(upper bound in s, cumulative count), ...], "count",
        "sum" (s)}``.  ``hstu_kvcache.metrics.METRICS`` documents every key.
        """
        s = self._native.stats()
        total = s["hit_tokens"] + s["missed_tokens"]
        s["hit_rate"] = s["hit_tokens"] / total if total else 0.0
        return s

    def drain_events(self, max_events: Optional[int] = None) -> List[CacheEvent]:
        """Take the oldest pending cache events (all of them by default),
        oldest first; they are removed from the cache's ring.

        Events need ``KVCacheConfig(event_capacity=N)``; with the default 0
        this returns ``[]``.  See :mod:`hstu_kvcache.events` for what each
        kind means.  ``stats()['events_pending']`` says how many wait and
        ``stats()['events_dropped']`` how many were lost to overflow.

        Args:
            max_events: most events to return (an int >= 0), or None for all.

        Raises:
            InvalidArgumentError: max_events is not None or an int >= 0.
        """
        if max_events is None:
            n = -1
        elif isinstance(max_events, bool) or not isinstance(max_events, (int, np.integer)):
            raise InvalidArgumentError(
                f"max_events must be an int >= 0 or None, got {max_events!r}")
        else:
            n = int(max_events)
            if n < 0:
                raise InvalidArgumentError(f"max_events must be >= 0, got {n}")
        return [CacheEvent._from_core(r) for r in self._native.drain_events(n)]

    def check(self) -> None:
        """Verify the core's internal invariants (raises InvalidStateError)."""
        self._native.check()

    # -- memory views ---------------------------------------------------------
    def layer_table(self, layer: int) -> Exported:
        """The pages of one layer, ``[num_pages, 2, page_size, H, D]`` (K at 0,
        V at 1): ``torch.from_dlpack(cache.layer_table(l))`` shares memory."""
        layer = int(layer)
        if not 0 <= layer < self.config.num_layers:
            raise InvalidArgumentError(
                f"layer {layer} is outside 0..{self.config.num_layers - 1}")
        native = self._native
        return Exported(lambda: native.export_table(layer), self._dl_device)

    def table(self) -> Exported:
        """The whole table ``[num_layers, num_pages, 2, page_size, H, D]``."""
        native = self._native
        return Exported(lambda: native.export_table(-1), self._dl_device)

    # -- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        """Free the cache's memory (views exported earlier keep theirs alive)."""
        self._native.close()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVCache({self.config})"

    # -- helpers ----------------------------------------------------------------
    def _layer_range(self, layer: Union[int, range, slice]) -> Tuple[int, int]:
        n = self.config.num_layers
        if isinstance(layer, slice):
            layer = range(*layer.indices(n))
        if isinstance(layer, range):
            if layer.step != 1 or len(layer) == 0:
                raise InvalidArgumentError("layer ranges must be contiguous and non-empty")
            return layer.start, len(layer)
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise InvalidArgumentError(f"layer must be an int or a range, got {layer!r}")
        return int(layer), 1

    @staticmethod
    def _candidates(num_candidates: Optional[IntArray], lookup: LookupResult
                    ) -> Optional[np.ndarray]:
        if num_candidates is None:
            return None
        cands = int64_array(num_candidates, "num_candidates")
        if cands.shape != lookup.user_ids.shape:
            raise InvalidArgumentError(
                f"num_candidates has {cands.shape[0]} entries for "
                f"{lookup.user_ids.shape[0]} users")
        return cands

    @staticmethod
    def _tiers(gpu: bool, host: bool, disk: Optional[bool]) -> int:
        if disk is None:
            disk = bool(gpu and host)
        tiers = (1 if gpu else 0) | (2 if host else 0) | (4 if disk else 0)
        if not tiers:
            raise InvalidArgumentError("evict needs gpu=True, host=True or disk=True")
        return tiers

    def _check_batch(self, batch: Any) -> None:
        if not isinstance(batch, Batch) or batch._cache is not self:
            raise InvalidArgumentError("expected a Batch allocated by this cache")


def cuda_available() -> bool:
    """True when the CUDA part was built and a usable GPU is present."""
    try:
        return _C.cuda_built() and _C.cuda_device_count() > 0
    except Exception:
        return False
