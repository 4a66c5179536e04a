"""Exceptions of hstu_kvcache: every error the package raises derives from
:class:`KVCacheError`.  A failed call leaves the cache consistent and usable."""

from __future__ import annotations


class KVCacheError(Exception):
    """Base class of every hstu_kvcache error."""


class InvalidArgumentError(KVCacheError, ValueError, TypeError):
    """An argument has the wrong value, type, dtype, shape or device."""


class CacheFullError(KVCacheError):
    """The page pool cannot hold the request even after evicting every
    user that may be evicted."""


class StaleLookupError(KVCacheError):
    """The cache changed for a user between lookup and allocate; look up again."""


class CacheBusyError(KVCacheError):
    """A resource is held by unfinished work (an open batch, another thread)."""


class InvalidStateError(KVCacheError, RuntimeError):
    """The call is not valid now (released batch, closed cache, layer appended twice)."""


class CudaError(KVCacheError, RuntimeError):
    """A CUDA runtime call failed."""


class NoDeviceError(KVCacheError, RuntimeError):
    """CUDA was asked for but is not built in or no usable GPU exists."""


class OutOfMemoryError(KVCacheError, MemoryError):
    """A host allocation failed."""


def _install() -> None:
    """Teach the C extension which exception each status code raises."""
    from . import _C

    _C._set_error_types({
        _C.EINVAL: InvalidArgumentError,
        _C.ENOMEM: OutOfMemoryError,
        _C.EFULL: CacheFullError,
        _C.ESTATE: InvalidStateError,
        _C.ECUDA: CudaError,
        _C.ENODEV: NoDeviceError,
        _C.ESTALE: StaleLookupError,
        _C.EBUSY: CacheBusyError,
    })
