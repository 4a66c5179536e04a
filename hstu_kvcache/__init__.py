"""hstu-kvcache: the KV cache of HSTU generative-recommender inference.

A C core (page pool, per-user index, token filter) with CUDA kernels, usable
from PyTorch, NumPy or any DLPack-speaking library.  Start with
:class:`KVCacheConfig` and :class:`KVCache`.
"""

from . import errors as _errors
from ._C import cuda_built as _cuda_built

_errors._install()

from .cache import Batch, KVCache, LookupResult, PendingBatch, cuda_available  # noqa: E402
from .config import KVCacheConfig  # noqa: E402
from .events import CacheEvent, EventKind  # noqa: E402
from .errors import (CacheBusyError, CacheFullError, CudaError, InvalidArgumentError,  # noqa: E402
                     InvalidStateError, KVCacheError, NoDeviceError, OutOfMemoryError,
                     StaleLookupError)
from .features import strip_cached_tokens  # noqa: E402

__version__ = "0.1.0"


def cuda_built() -> bool:
    """True if this build of the package contains the CUDA kernels."""
    return bool(_cuda_built())


__all__ = [
    "Batch", "CacheEvent", "EventKind", "KVCache", "KVCacheConfig", "LookupResult", "PendingBatch", "cuda_available", "cuda_built",
    "strip_cached_tokens", "KVCacheError", "InvalidArgumentError", "CacheFullError",
    "StaleLookupError", "CacheBusyError", "InvalidStateError", "CudaError",
    "NoDeviceError", "OutOfMemoryError", "__version__",
]
