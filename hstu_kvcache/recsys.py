"""Drop-in facade with the API of NVIDIA recsys-examples' ``recsys_kvcache_manager``.

Switching an HSTU inference pipeline written against recsys-examples takes one
changed import::

    # from recsys_kvcache_manager import KVCacheManager ...
    from hstu_kvcache.recsys import KVCacheManager, get_kvcache_config

    mgr = KVCacheManager.from_config(get_kvcache_config(...))
    index_meta, lookup_res = mgr.lookup_kvcache(user_ids, sequence_lengths)
    meta = mgr.allocate_kvcache(index_meta, lookup_res)
    mgr.onboard_launch(index_meta, lookup_res, meta)
    for layer in range(num_layers):
        mgr.gpu_kvcache_mgr.put(k, v, layer, meta)
        meta.kv_onload_handle.stream_wait_layer(layer)
        ... paged attention with meta.kv_indices / kv_indptr / kv_last_page_len ...
    mgr.offload_launch(index_meta, meta)

Names, arguments and result fields follow the anchor; the implementation is the
native :class:`hstu_kvcache.KVCache` (all state stays in the C core).  How
the anchor's calls map onto it:

==========================  ==================================================
anchor call                  native behaviour
==========================  ==================================================
``lookup_kvcache``           ``KVCache.lookup`` + ``cached_tiers`` per user.
                             Both tiers hold a *prefix* of the history, so all
                             ``*_start_indices`` are 0 and there are no gaps.
``allocate_kvcache``         ``KVCache.allocate``: pages, metadata, and the
                             host->GPU onboarding of host-cached pages are all
                             queued here (side stream, per layer); the host
                             is not blocked for the copies.
``onboard_launch``           nothing left to launch: returns the handle whose
                             ``stream_wait_layer(l)`` is ``Batch.wait_layer``.
``onboard_try_wait/_wait``   poll / wait for every layer's onboard event.
``gpu_kvcache_mgr.put``      ``KVCache.append`` (the batch commits once every
                             layer was put).
``offload_launch``           no copy to launch: in ``lazy`` mode the core
                             writes pages back when it evicts them, in
                             ``eager`` mode it copies a batch's full pages in
                             the background at commit.  It releases the
                             finished batch (unpins its users).
``offload_try_wait/_reap``   release finished batches; ``offload_flush`` also
                             waits for every transfer in flight.
``evict(for_gpu=True)``      with a host tier: write back, then drop from the
                             GPU (the user stays cached on the host) -- the
                             anchor drops; without one: drop.
``evict(for_host=True)``     drop the host copies.
==========================  ==================================================

Where we do better than the anchor: errors are :class:`hstu_kvcache.KVCacheError`
subclasses raised before anything changes (the anchor asserts); allocation
never waits for onboarding; GPU eviction keeps users cached on the host.
Differences: the host tier moves whole pages (a partial tail page stays on the
GPU only), so ``offload_chunksize`` is validated but the unit of offload is a
page; ``num_buffer_pages`` is validated and recorded but unused (the core needs
no staging pages); timeouts and the fail policy are recorded (host-tier
transfers are memcpys that do not time out); the ``flexkv`` backend is not
offered.  :func:`strip_cached_tokens` follows the anchor's feature layout
(contextual features first, then the interleaved item and action history) on
flat jagged tensors and runs the package's strip kernel on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ._tensors import int64_array, is_torch, require_torch, torch
from .cache import Batch, KVCache, LookupResult
from .config import KVCacheConfig as NativeKVCacheConfig
from .errors import InvalidArgumentError, InvalidStateError

__all__ = [
    "KVCacheConfig", "get_kvcache_config", "KVCacheManager", "KVCacheOffloadMode",
    "KVLookupResult", "KVIndexMeta", "KVCacheMetadata", "HostKVTaskStatus",
    "HostKVTaskHandle", "HostKVWaitResult", "DeviceKVCache", "GPUKVCacheManager",
    "NativeHostKVStorage", "strip_cached_tokens",
]

_EXTRA_NATIVE_KEYS = ("max_batch_tokens", "max_open_batches", "verify_tokens")


class KVCacheOffloadMode(Enum):
    """When pages are copied to the host tier."""
    LAZY = "lazy"
    EAGER = "eager"


class HostKVTaskStatus(Enum):
    """State of an onboard/offload task (same members as the anchor)."""
    UNINITIALIZED = "uninitialized"
    SKIPPED = "skipped"
    LAUNCHED = "launched"
    READY = "ready"
    EVENT_READY = "event_ready"
    TIMEOUT = "timeout"
    FAILED = "failed"
    CANCELLED = "cancelled"


# --------------------------------------------------------------------------
# configuration

@dataclass
class KVCacheConfig:
    """The anchor's configuration record; :meth:`to_native` gives the
    :class:`hstu_kvcache.KVCacheConfig` it stands for."""

    num_layers: int
    num_heads: int
    head_dim: int
    page_size: int
    offload_chunksize: int
    num_primary_cache_pages: int
    num_buffer_pages: int
    host_capacity_per_layer: int
    max_batch_size: int
    max_seq_len: int
    dtype: Any
    device: Any
    host_kvstorage_backend: str = "nop"
    onload_timeout_ms: float = 0.0
    offload_timeout_ms: float = 0.0
    offload_mode: str = "lazy"
    host_kvstorage_fail_policy: str = "fail_open"
    extra_configs: Dict[str, Any] = field(default_factory=dict)

    def to_native(self) -> NativeKVCacheConfig:
        """Validate and translate (raises InvalidArgumentError)."""
        if self.host_kvstorage_backend not in ("nop", "native"):
            raise InvalidArgumentError(
                "host_kvstorage_backend must be 'nop' (GPU only) or 'native' (host tier), "
                f"got {self.host_kvstorage_backend!r}")
        if self.host_kvstorage_fail_policy not in ("fail_open", "fail_close"):
            raise InvalidArgumentError(
                "host_kvstorage_fail_policy must be 'fail_open' or 'fail_close', "
                f"got {self.host_kvstorage_fail_policy!r}")
        for name in ("offload_chunksize", "num_buffer_pages", "host_capacity_per_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("onload_timeout_ms", "offload_timeout_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgumentError(f"{name} must be a non-negative number, got {value!r}")
        page_size = self.page_size
        if isinstance(page_size, (int, np.integer)) and page_size > 0 and (
                self.offload_chunksize == 0 or self.offload_chunksize % page_size):
            # The anchor asserts the same; we raise instead.
            raise InvalidArgumentError(
                f"offload_chunksize ({self.offload_chunksize}) must be a positive multiple "
                f"of page_size ({page_size})")
        extra = dict(self.extra_configs or {})
        native_extra = {k: extra[k] for k in _EXTRA_NATIVE_KEYS if k in extra}
        host_bytes = 0
        if self.host_kvstorage_backend == "native":
            if self.host_capacity_per_layer <= 0:
                raise InvalidArgumentError(
                    "host_kvstorage_backend='native' needs host_capacity_per_layer > 0")
            host_bytes = int(self.host_capacity_per_layer) * int(self.num_layers)
        return NativeKVCacheConfig(
            num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim,
            num_pages=self.num_primary_cache_pages, page_size=page_size,
            dtype=self.dtype, device=_device_of(self.device),
            max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len,
            host_capacity_bytes=host_bytes, offload_mode=self.offload_mode, **native_extra)


def _device_of(device: Any) -> Any:
    """The anchor passes a CUDA device index; strings and torch devices pass through."""
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        if device < 0:
            raise InvalidArgumentError(f"device index must be >= 0, got {device}")
        return f"cuda:{int(device)}"
    return device


def get_kvcache_config(
    num_layers: int,
    num_heads: int,
    head_dim: int,
    page_size: int,
    offload_chunksize: int,
    num_primary_cache_pages: int,
    num_buffer_pages: int,
    host_capacity_per_layer: int,
    max_batch_size: int,
    max_seq_len: int,
    dtype: Any,
    device: Any,
    host_kvstorage_backend: str = "nop",
    onload_timeout_ms: float = 0.0,
    offload_timeout_ms: float = 0.0,
    offload_mode: str = "lazy",
    host_kvstorage_fail_policy: str = "fail_open",
    extra_configs: Optional[Dict[str, Any]] = None,
) -> KVCacheConfig:
    """Build (and validate at once, so mistakes surface here rather than at
    ``from_config``) the configuration of a :class:`KVCacheManager`.

    ``host_capacity_per_layer`` is in bytes; the host tier gets
    ``host_capacity_per_layer * num_layers`` bytes with the ``native`` backend
    and none with ``nop``.  ``device`` is a CUDA index (anchor style),
    ``'cpu'``, ``'cuda[:N]'`` or a torch device.  ``extra_configs`` may carry the
    native options ``max_batch_tokens``, ``max_open_batches`` and
    ``verify_tokens``; other keys (the anchor's ``flexkv_*``) are ignored.
    """
    cfg = KVCacheConfig(
        num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, page_size=page_size,
        offload_chunksize=offload_chunksize, num_primary_cache_pages=num_primary_cache_pages,
        num_buffer_pages=num_buffer_pages, host_capacity_per_layer=host_capacity_per_layer,
        max_batch_size=max_batch_size, max_seq_len=max_seq_len, dtype=dtype, device=device,
        host_kvstorage_backend=host_kvstorage_backend, onload_timeout_ms=onload_timeout_ms,
        offload_timeout_ms=offload_timeout_ms, offload_mode=offload_mode,
        host_kvstorage_fail_policy=host_kvstorage_fail_policy,
        extra_configs=dict(extra_configs or {}))
    cfg.to_native()
    return cfg


# --------------------------------------------------------------------------
# result records

@dataclass
class KVIndexMeta:
    """The batch's users and their whole history lengths (int64 CPU tensors)."""
    user_ids: Any
    seq_lengths: Any


@dataclass
class KVLookupResult:
    """Cached ranges per user (int32 CPU tensors, ``user_ids`` int64).

    ``cached_*`` is the merged range, ``gpu_cached_*`` / ``host_cached_*``
    what each tier holds of it; every range starts at 0.  ``extra`` carries
    the native lookup under ``"hstu_kvcache"`` for ``allocate_kvcache``.
    """
    user_ids: Any
    cached_start_indices: Optional[Any] = None
    cached_lengths: Optional[Any] = None
    gpu_cached_start_indices: Optional[Any] = None
    gpu_cached_lengths: Optional[Any] = None
    host_cached_start_indices: Optional[Any] = None
    host_cached_lengths: Optional[Any] = None
    token_ids: Optional[Any] = None
    token_mask: Optional[Any] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HostKVWaitResult:
    """Outcome of an onboard wait."""
    status: HostKVTaskStatus
    ready: bool
    message: str = ""
    failed_mask: Optional[Any] = None
    failed_user_ids: Optional[List[int]] = None


class _OnboardEvents:
    """The native batch's per-layer onboard events, seen as the anchor's
    layer-wise task handle."""

    def __init__(self, batch: Batch, num_layers: int, device_kind: str):
        self._batch = batch
        self._num_layers = num_layers
        self._device_kind = device_kind
        self._done_event: Any = None

    def wait_layer(self, layer_idx: int) -> None:
        self._batch.wait_layer(layer_idx)

    def _all_layers_event(self) -> Any:
        """A CUDA event that fires once every layer has arrived, recorded on a
        side stream so neither the host nor the compute stream waits."""
        if self._done_event is None:
            side = torch.cuda.Stream(device=torch.device(self._batch._cache.config.device))
            for layer in range(self._num_layers):
                self._batch.wait_layer(layer, stream=side)
            self._done_event = torch.cuda.Event()
            self._done_event.record(side)
        return self._done_event

    def query(self) -> bool:
        if self._device_kind != "cuda":
            return True  # the CPU path copies synchronously inside allocate
        return bool(self._all_layers_event().query())

    def synchronize(self) -> None:
        if self._device_kind == "cuda":
            self._all_layers_event().synchronize()


@dataclass
class HostKVTaskHandle:
    """Handle of an onboard task.  ``stream_wait_layer(l)`` makes the current
    stream wait (without blocking the host) for layer ``l``'s pages."""
    backend: str
    user_ids: Optional[Any] = None
    handle: Optional[Any] = None
    status: HostKVTaskStatus = HostKVTaskStatus.UNINITIALIZED
    metadata: Optional[Dict[str, Any]] = None
    time_launched: Optional[float] = None
    is_layerwise: bool = False
    onboard_wait_by_layer: Optional[Any] = None

    def stream_wait_layer(self, layer_idx: int) -> None:
        if self.is_layerwise and self.handle is not None:
            self.handle.wait_layer(layer_idx)

    def wait_layer(self, layer_idx: int) -> None:
        if self.onboard_wait_by_layer is not None:
            self.onboard_wait_by_layer(self, layer_idx)
        else:
            self.stream_wait_layer(layer_idx)


@dataclass
class KVCacheMetadata:
    """Metadata of an allocated batch: int32 tensors on the cache's device
    (views of the native batch's metadata block, no copies) in the anchor's
    field names.  ``position`` is ``Batch.positions``; ``new_history_nnz_cuda``
    is a one-element view of ``new_history_offsets[-1]``; ``kv_cache_table``
    lists the per-layer tables ``[num_pages, 2, page_size, H, D]``.
    ``batch`` is the native :class:`hstu_kvcache.Batch` behind it."""
    page_ids_gpu_buffer: Optional[Any] = None
    metadata_gpu_buffer: Optional[Any] = None
    kv_indices: Optional[Any] = None
    kv_indptr: Optional[Any] = None
    kv_last_page_len: Optional[Any] = None
    total_history_lengths: Optional[Any] = None
    total_history_offsets: Optional[Any] = None
    new_history_offsets: Optional[Any] = None
    batch_indices: Optional[Any] = None
    position: Optional[Any] = None
    new_history_nnz: int = 0
    new_history_nnz_cuda: Optional[Any] = None
    kv_seqlens: Optional[Any] = None
    kv_seqlen_offsets: Optional[Any] = None
    kv_cache_table: Optional[List[Any]] = None
    kv_onload_handle: Optional[HostKVTaskHandle] = None
    max_seqlen: Optional[int] = 0
    onboard_slot_mappings: Optional[List[Any]] = None
    onboard_task_ids: Optional[Any] = None
    batch: Optional[Batch] = None


# --------------------------------------------------------------------------
# the two managers behind the properties

class DeviceKVCache:
    """The anchor's ``gpu_kvcache_mgr``: the paged table and its debug
    read/write calls, on top of the native cache."""

    def __init__(self, cache: KVCache):
        self._cache = cache
        cfg = cache.config
        self.num_layers, self.num_heads, self.head_dim = cfg.num_layers, cfg.num_heads, cfg.head_dim
        self.page_size = cfg.page_size
        self.num_primary_cache_pages = cfg.num_pages
        self.gpu_kvcache_tables: List[Any] = [
            torch.from_dlpack(cache.layer_table(layer)) for layer in range(cfg.num_layers)]

    def get_cache_tables(self, layer_idx: int = -1) -> Union[Any, List[Any]]:
        """Every layer's table (``layer_idx=-1``) or one of them."""
        if layer_idx == -1:
            return self.gpu_kvcache_tables
        return self.gpu_kvcache_tables[_layer(layer_idx, self.num_layers)]

    def put(self, k: Any, v: Any, layer_idx: Union[int, range, slice],
            kvcache_metadata: KVCacheMetadata, append_offsets: Optional[Any] = None) -> None:
        """Write the batch's new history K/V (``[new_history_nnz, H, D]``) of
        one layer into its pages; ``layer_idx`` may also be a range of layers
        with ``[layers, nnz, H, D]`` inputs (the anchor refuses those)."""
        batch = _batch_of(kvcache_metadata, self._cache)
        if append_offsets is not None and bool((torch.as_tensor(append_offsets) != 0).any()):
            raise InvalidArgumentError(
                "append_offsets other than zeros are not supported: pass exactly the "
                "new history rows (or allocate natively with num_candidates)")
        self._cache.append(layer_idx, k, v, batch)

    def get(self, page_ids: Any, last_page_lens: Any, layer_idx: int) -> Tuple[Any, Any]:
        """K and V (``[tokens, H, D]`` copies) held by ``page_ids`` in
        ``layer_idx``, the last page cut at ``last_page_lens`` tokens.  Waits
        for transfers in flight first (a debug call, not for the hot path)."""
        layer = _layer(layer_idx, self.num_layers)
        ids = torch.as_tensor(int64_array(page_ids, "page_ids"))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_primary_cache_pages):
            raise InvalidArgumentError(
                f"page_ids must be in 0..{self.num_primary_cache_pages - 1}")
        last = int(torch.as_tensor(last_page_lens).reshape(-1)[0]) \
            if is_torch(last_page_lens) else int(last_page_lens)
        if ids.numel() and not 1 <= last <= self.page_size:
            raise InvalidArgumentError(
                f"last_page_lens must be in 1..{self.page_size}, got {last}")
        self._cache.sync_transfers()
        table = self.gpu_kvcache_tables[layer]
        pages = table[ids.to(table.device)]                 # [n, 2, ps, H, D]
        n = ids.numel() * self.page_size - (self.page_size - last if ids.numel() else 0)
        k = pages[:, 0].reshape(-1, self.num_heads, self.head_dim)[:n].clone()
        v = pages[:, 1].reshape(-1, self.num_heads, self.head_dim)[:n].clone()
        return k, v


class NativeHostKVStorage:
    """The anchor's ``host_kvstorage_manager`` for the host tier of the
    native cache (``backend_name`` is ``'native'``, or ``'nop'`` without one)."""

    def __init__(self, cache: KVCache, backend_name: str):
        self._cache = cache
        self.backend_name = backend_name
        self.capacity_bytes = cache.config.host_capacity_bytes

    def build_index_meta(self, user_ids: Any, sequence_lengths: Any) -> KVIndexMeta:
        return KVIndexMeta(user_ids=torch.as_tensor(int64_array(user_ids, "user_ids")),
                           seq_lengths=torch.as_tensor(
                               int64_array(sequence_lengths, "sequence_lengths")))

    def lookup_kvcache(self, index_meta: KVIndexMeta) -> KVLookupResult:
        """Host-tier prefix lengths of the users (not clamped to the request)."""
        ids = int64_array(index_meta.user_ids, "user_ids")
        host = np.array([self._cache.cached_tiers(int(u))[1] for u in ids], dtype=np.int32)
        return KVLookupResult(user_ids=torch.as_tensor(ids),
                              host_cached_start_indices=torch.zeros(len(ids), dtype=torch.int32),
                              host_cached_lengths=torch.as_tensor(host))

    def evict(self, user_ids: Any) -> None:
        if self.capacity_bytes:
            self._cache.evict(user_ids, gpu=False, host=True)

    def evict_all(self) -> None:
        if self.capacity_bytes:
            self._cache.evict_all(gpu=False, host=True)


# --------------------------------------------------------------------------
# the manager

class KVCacheManager:
    """The anchor's user-facing manager, on one native :class:`KVCache`.

    Batch lifecycle: each ``allocate_kvcache`` opens a native batch whose
    users stay pinned until it is released.  The anchor has no "request
    done" call, so a batch is released at the next ``allocate_kvcache``,
    ``offload_*`` or ``evict*`` call once every layer was put (it then counts
    as cached); a batch not fully put stays open, and :meth:`release_all`
    abandons such requests (rolled back, nothing half-written is cached).

    Not meant to be shared by concurrent requests from several threads (the
    anchor's contract too); the native cache underneath is thread-safe.
    """

    def __init__(self, cache: KVCache, config: Optional[KVCacheConfig] = None):
        require_torch("hstu_kvcache.recsys")
        if not isinstance(cache, KVCache):
            raise InvalidArgumentError("KVCacheManager needs a hstu_kvcache.KVCache")
        self.cache = cache
        self.config = config
        backend = config.host_kvstorage_backend if config is not None else (
            "native" if cache.config.host_capacity_bytes else "nop")
        self.offload_mode = KVCacheOffloadMode(cache.config.offload_mode)
        self.host_kvstorage_fail_policy = (config.host_kvstorage_fail_policy
                                           if config is not None else "fail_open")
        self._gpu = DeviceKVCache(cache)
        self._host = NativeHostKVStorage(cache, backend)
        # Batches handed out and not yet released: released once they commit
        # (every layer put) at the next allocate/offload/evict call, because
        # the anchor's API has no explicit "request done" call.
        self._open: List[Batch] = []

    @classmethod
    def from_config(cls, kvcache_config: KVCacheConfig) -> "KVCacheManager":
        if not isinstance(kvcache_config, KVCacheConfig):
            raise InvalidArgumentError("from_config needs the result of get_kvcache_config")
        return cls(KVCache(kvcache_config.to_native()), kvcache_config)

    @property
    def gpu_kvcache_mgr(self) -> DeviceKVCache:
        return self._gpu

    @property
    def host_kvstorage_manager(self) -> NativeHostKVStorage:
        return self._host

    # -- lookup / allocate ----------------------------------------------
    def lookup_kvcache(self, user_ids: Any, sequence_lengths: Any
                       ) -> Tuple[KVIndexMeta, KVLookupResult]:
        """Cached prefix of each user's history, merged over the GPU and the
        host tier (synchronous, microseconds)."""
        native = self.cache.lookup(user_ids, sequence_lengths)
        cached = native.cached_lengths
        tiers = np.array([self.cache.cached_tiers(int(u)) for u in native.user_ids],
                         dtype=np.int64).reshape(-1, 2)
        # A tier may hold more than this request reuses (trust mode clamps to
        # the history length): report what each tier contributes.
        gpu = np.minimum(tiers[:, 0], cached)
        host = np.minimum(tiers[:, 1], cached)
        zeros = np.zeros(len(cached), dtype=np.int32)
        i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
        index_meta = KVIndexMeta(user_ids=torch.from_numpy(native.user_ids.copy()),
                                 seq_lengths=torch.from_numpy(native.history_lengths.copy()))
        result = KVLookupResult(
            user_ids=index_meta.user_ids, cached_start_indices=i32(zeros),
            cached_lengths=i32(cached), gpu_cached_start_indices=i32(zeros),
            gpu_cached_lengths=i32(gpu), host_cached_start_indices=i32(zeros),
            host_cached_lengths=i32(host), extra={"hstu_kvcache": native})
        return index_meta, result

    def allocate_kvcache(self, index_meta: KVIndexMeta, lookup_results: KVLookupResult,
                         output_kvcache_metadata: Optional[KVCacheMetadata] = None
                         ) -> KVCacheMetadata:
        """Reserve pages for the batch's new tokens, build its metadata and
        queue the onboarding of its host-cached pages (per layer, on a side
        stream: the host does not wait for the copies).

        With ``output_kvcache_metadata`` (preallocated buffers, e.g. for CUDA
        graphs) the fields are copied into its tensors, padded like the
        anchor does (offsets repeat their last value, the rest is zero).

        Raises:
            CacheFullError: the pool cannot hold the batch.
            StaleLookupError: a user changed since the lookup (look up again).
            CacheBusyError: a user is in a batch still being written.
        """
        native = self._native_lookup(index_meta, lookup_results)
        self._release_finished()
        batch = self.cache.allocate(native)
        self._open.append(batch)
        meta = self._metadata(batch, native, lookup_results.gpu_cached_lengths)
        if output_kvcache_metadata is not None:
            _copy_into(output_kvcache_metadata, meta)
            return output_kvcache_metadata
        return meta

    def _native_lookup(self, index_meta: KVIndexMeta, lookup_results: KVLookupResult
                       ) -> LookupResult:
        native = getattr(lookup_results, "extra", {}).get("hstu_kvcache") \
            if isinstance(lookup_results, KVLookupResult) else None
        if not isinstance(native, LookupResult) or native._cache is not self.cache:
            raise InvalidArgumentError(
                "allocate_kvcache needs a KVLookupResult from this manager's lookup_kvcache")
        if not isinstance(index_meta, KVIndexMeta) or not np.array_equal(
                int64_array(index_meta.user_ids, "user_ids"), native.user_ids):
            raise InvalidArgumentError("index_meta and lookup_results are of different batches")
        return native

    def _metadata(self, batch: Batch, native: LookupResult, gpu_cached: Any) -> KVCacheMetadata:
        cfg = self.cache.config
        # What the lookup found on the host but not on the GPU is what
        # allocate is onboarding now.
        onboarded = native.cached_lengths - np.asarray(gpu_cached, dtype=np.int64)
        handle = HostKVTaskHandle(
            backend=self._host.backend_name, user_ids=torch.from_numpy(native.user_ids.copy()),
            handle=_OnboardEvents(batch, cfg.num_layers, cfg.device_kind),
            status=(HostKVTaskStatus.LAUNCHED if onboarded.any() else HostKVTaskStatus.SKIPPED),
            is_layerwise=True,
            metadata={"onboarded_tokens": onboarded})
        offsets = batch.new_history_offsets
        hist = batch.host("total_history_lengths")
        return KVCacheMetadata(
            page_ids_gpu_buffer=batch.kv_indices, metadata_gpu_buffer=None,
            kv_indices=batch.kv_indices, kv_indptr=batch.kv_indptr,
            kv_last_page_len=batch.kv_last_page_len,
            total_history_lengths=batch.total_history_lengths,
            total_history_offsets=batch.total_history_offsets,
            new_history_offsets=offsets, batch_indices=batch.batch_indices,
            position=batch.positions, new_history_nnz=int(batch.new_history_nnz),
            new_history_nnz_cuda=offsets[-1:],
            # Scratch the anchor's attention prep fills in place: fresh buffers,
            # never views of the batch's metadata the core's kernels read.
            kv_seqlens=torch.empty_like(batch.total_history_lengths),
            kv_seqlen_offsets=torch.empty_like(batch.total_history_offsets),
            kv_cache_table=self._gpu.gpu_kvcache_tables, kv_onload_handle=handle,
            max_seqlen=int(hist.max()) if len(hist) else 0, batch=batch)

    # -- onboard ----------------------------------------------------------------
    def onboard_launch(self, index_meta: KVIndexMeta, lookup_result: KVLookupResult,
                       kvcache_metadata: KVCacheMetadata) -> HostKVTaskHandle:
        """Nothing left to launch (``allocate_kvcache`` queued the copies):
        returns ``kvcache_metadata.kv_onload_handle``."""
        _batch_of(kvcache_metadata, self.cache)
        return kvcache_metadata.kv_onload_handle

    def onboard_try_wait(self, kv_index_meta: KVIndexMeta,
                         task_handle: Optional[HostKVTaskHandle]) -> HostKVWaitResult:
        """READY once every layer's pages arrived, else LAUNCHED; never blocks."""
        if _nothing_onboarded(task_handle):
            return HostKVWaitResult(status=HostKVTaskStatus.UNINITIALIZED, ready=False)
        if task_handle.handle.query():
            task_handle.status = HostKVTaskStatus.READY
            return HostKVWaitResult(status=HostKVTaskStatus.READY, ready=True)
        return HostKVWaitResult(status=HostKVTaskStatus.LAUNCHED, ready=False)

    def onboard_wait(self, kv_index_meta: KVIndexMeta,
                     task_handle: Optional[HostKVTaskHandle]) -> HostKVWaitResult:
        """Block the host until every layer's pages arrived (prefer
        ``stream_wait_layer`` per layer: it does not block the host)."""
        if _nothing_onboarded(task_handle):
            return HostKVWaitResult(status=HostKVTaskStatus.UNINITIALIZED, ready=False)
        task_handle.handle.synchronize()
        task_handle.status = HostKVTaskStatus.READY
        return HostKVWaitResult(status=HostKVTaskStatus.READY, ready=True)

    # -- offload -----------------------------------------------------------------
    def offload_launch(self, index_meta: KVIndexMeta,
                       kvcache_metadata: Optional[KVCacheMetadata] = None) -> None:
        """End of the request: release its batch once committed.  No copy is
        launched here: the core offloads by itself (at eviction in ``lazy``
        mode, at commit in ``eager`` mode, in the background).  Returns None,
        as the anchor does when it launched nothing."""
        if kvcache_metadata is not None:
            _batch_of(kvcache_metadata, self.cache)
        self._release_finished()
        return None

    def offload_try_wait(self) -> None:
        """Release finished batches (the core reaps its own transfers)."""
        self._release_finished()

    def offload_reap_completed(self) -> None:
        self._release_finished()

    def offload_flush(self) -> None:
        """Release finished batches and wait for every transfer in flight."""
        self._release_finished()
        self.cache.sync_transfers()

    # -- eviction ------------------------------------------------------------------
    def evict(self, user_ids: Any, for_gpu: bool = False, for_host: bool = False) -> None:
        """Evict users from the GPU tier and/or the host tier (neither: no-op,
        as in the anchor).  ``for_gpu`` alone with a host tier writes the
        pages back first, so the users stay cached on the host."""
        ids = int64_array(user_ids, "user_ids")
        self._release_finished()
        self._evict(lambda **kw: self.cache.evict(ids, **kw), for_gpu, for_host)

    def evict_all(self, for_gpu: bool = False, for_host: bool = False) -> None:
        """:meth:`evict` for every user not in a batch still being written."""
        self._release_finished()
        self._evict(lambda **kw: self.cache.evict_all(**kw), for_gpu, for_host)

    def _evict(self, fn: Any, for_gpu: bool, for_host: bool) -> None:
        has_host = bool(self.cache.config.host_capacity_bytes)
        for_host = bool(for_host) and has_host
        if for_gpu and for_host:
            fn(gpu=True, host=True)
        elif for_gpu:
            fn(gpu=True, host=False, offload=has_host)
        elif for_host:
            fn(gpu=False, host=True)

    # -- helpers ---------------------------------------------------------------------
    def _release_finished(self) -> None:
        """Release the batches whose every layer was put; a batch still being
        written stays open (its users stay pinned)."""
        keep = []
        for batch in self._open:
            if batch.released:
                continue
            if batch.committed:
                batch.release()
            else:
                keep.append(batch)
        self._open = keep

    def release_all(self) -> None:
        """Release every open batch, rolling back the ones not fully put
        (beyond the anchor's API: for abandoned requests)."""
        for batch in self._open:
            batch.release()
        self._open = []


def _nothing_onboarded(task_handle: Optional[HostKVTaskHandle]) -> bool:
    """The anchor answers UNINITIALIZED (not ready) when there is no task."""
    return (task_handle is None or task_handle.handle is None
            or task_handle.status == HostKVTaskStatus.SKIPPED)


def _layer(layer_idx: Any, num_layers: int) -> int:
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, (int, np.integer)) \
            or not 0 <= int(layer_idx) < num_layers:
        raise InvalidArgumentError(f"layer_idx must be an int in 0..{num_layers - 1}, "
                                   f"got {layer_idx!r}")
    return int(layer_idx)


def _batch_of(meta: Any, cache: KVCache) -> Batch:
    batch = getattr(meta, "batch", None)
    if not isinstance(meta, KVCacheMetadata) or not isinstance(batch, Batch) \
            or batch._cache is not cache:
        raise InvalidArgumentError(
            "expected a KVCacheMetadata returned by this manager's allocate_kvcache")
    if batch.released:
        raise InvalidStateError("the batch of this KVCacheMetadata was already released")
    return batch


def _copy_into(dst: KVCacheMetadata, src: KVCacheMetadata) -> None:
    """Copy a batch's metadata into preallocated buffers (anchor padding)."""
    def tensor(name: str, pad_last: bool) -> None:
        d, s = getattr(dst, name), getattr(src, name)
        if d is None:
            setattr(dst, name, s)
            return
        n = int(s.shape[0])
        if int(d.shape[0]) < n:
            raise InvalidArgumentError(
                f"output_kvcache_metadata.{name} holds {d.shape[0]} entries, needs {n}")
        d[:n].copy_(s, non_blocking=True)
        if int(d.shape[0]) > n:
            d[n:] = s[-1] if (pad_last and n) else 0

    for name in ("kv_indices", "kv_last_page_len", "total_history_lengths",
                 "batch_indices", "position", "new_history_nnz_cuda", "kv_seqlens"):
        tensor(name, False)
    for name in ("kv_indptr", "total_history_offsets", "new_history_offsets",
                 "kv_seqlen_offsets"):
        tensor(name, True)
    dst.new_history_nnz = src.new_history_nnz
    dst.kv_cache_table = src.kv_cache_table
    dst.kv_onload_handle = src.kv_onload_handle
    dst.max_seqlen = src.max_seqlen
    dst.batch = src.batch


#: Backward-compatible alias, as in the anchor.
GPUKVCacheManager = DeviceKVCache


def strip_cached_tokens(values: Any, lengths: Any, offsets: Any, num_cached: Any,
                        feature_order: List[str]) -> Tuple[Any, Any, Any]:
    """Drop cached tokens from the jagged features of a batch, as the anchor's
    inference loop does before embedding.

    The features are laid out feature-major, like a KeyedJaggedTensor:
    ``lengths`` holds ``len(feature_order) * B`` segment lengths (all users of
    the first feature, then of the second...), ``offsets`` their
    ``len(lengths) + 1`` offsets into ``values``.  ``feature_order`` names each
    feature's kind: ``"contextual"`` (one token per user, placed before the
    history), ``"item"`` and ``"action"`` (the history, whose tokens alternate
    item, action, item...; exactly one of each).  ``num_cached`` [B] counts the
    cached tokens of each user's sequence, contextual tokens included.

    Per user with ``c = max(num_cached - num_contextual, 0)`` cached history
    tokens, ``c - c // 2`` item and ``c // 2`` action tokens are dropped, and a
    contextual feature is dropped entirely unless nothing is cached (its token
    is part of the cached prefix).  Returns ``(values, lengths, offsets)`` of
    the kept tokens, on the device of ``values``.
    """
    from .features import strip_cached_tokens as strip_segments

    kinds = list(feature_order)
    if any(k not in ("contextual", "item", "action") for k in kinds) or \
            kinds.count("item") != 1 or kinds.count("action") != 1:
        raise InvalidArgumentError(
            "feature_order must name each feature 'contextual', 'item' or 'action', "
            f"with exactly one item and one action feature; got {kinds}")
    cached = int64_array(num_cached, "num_cached")
    seg_lengths = int64_array(lengths, "lengths")
    batch = cached.shape[0]
    if seg_lengths.shape[0] != len(kinds) * batch:
        raise InvalidArgumentError(
            f"lengths has {seg_lengths.shape[0]} entries; {len(kinds)} features x "
            f"{batch} users need {len(kinds) * batch}")
    if (cached < 0).any():
        raise InvalidArgumentError("num_cached must not be negative")
    num_context = kinds.count("contextual")
    history = np.maximum(cached - num_context, 0)
    drop_of = {"item": history - history // 2, "action": history // 2,
               "contextual": np.where(cached > 0, np.iinfo(np.int32).max, 0)}
    drop = np.concatenate([drop_of[k] for k in kinds])
    return strip_segments(values, lengths, drop, offsets=offsets)
