"""Glue between array libraries and the C core: int64 host arrays in,
DLPack capsules in and out.  No policy here."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np

from .errors import InvalidArgumentError

try:  # torch is optional: only the torch-facing parts need it
    import torch
    from torch.utils.dlpack import to_dlpack as _torch_to_dlpack
except ImportError:  # pragma: no cover - exercised on torch-less installs
    torch = None
    _torch_to_dlpack = None

DL_CPU, DL_CUDA = 1, 2


def has_torch() -> bool:
    return torch is not None


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def int64_array(x: Any, name: str, ndim: int = 1) -> np.ndarray:
    """A C-contiguous int64 NumPy array from a list, NumPy array or torch tensor."""
    if isinstance(x, np.ndarray) and x.dtype == np.int64 and x.flags.c_contiguous \
            and x.ndim == ndim:
        return x
    if is_torch(x):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise InvalidArgumentError(f"{name} must hold integers, got {x.dtype}")
        x = x.detach().to("cpu", torch.int64).numpy()
    else:
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise InvalidArgumentError(f"{name} is not an array of integers: {e}") from None
        if x.dtype == object or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
            raise InvalidArgumentError(f"{name} must hold integers, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise InvalidArgumentError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.int64)


def capsule(x: Any, name: str) -> Any:
    """A DLPack capsule of x (torch tensors without any stream synchronisation:
    the core queues its work on the caller's current stream anyway)."""
    if is_torch(x):
        return _torch_to_dlpack(x)
    fn = getattr(x, "__dlpack__", None)
    if fn is None:
        raise InvalidArgumentError(
            f"{name} must be a tensor that supports DLPack (torch, NumPy, CuPy, JAX), "
            f"got {type(x).__name__}")
    return fn()


class Exported:
    """An object speaking the DLPack protocol for memory the cache owns:
    ``torch.from_dlpack(obj)`` or ``np.from_dlpack(obj)`` give a view, no copy.
    Each view keeps the memory alive, even after the cache is closed."""

    __slots__ = ("_make", "_device")

    def __init__(self, make: Callable[[], Any], device: Tuple[int, int]):
        self._make = make
        self._device = device

    def __dlpack__(self, stream: Optional[int] = None, max_version: Any = None,
                   dl_device: Any = None, copy: Optional[bool] = None) -> Any:
        return self._make()

    def __dlpack_device__(self) -> Tuple[int, int]:
        return self._device


def current_stream(device_kind: str, device_index: int, stream: Any) -> int:
    """The CUDA stream handle to queue work on: the given one (a torch stream
    or a raw handle), else torch's current stream, else the legacy default."""
    if device_kind != "cuda":
        return 0
    if stream is None:
        if torch is not None:
            return torch.cuda.current_stream(device_index).cuda_stream
        return 0
    handle = getattr(stream, "cuda_stream", stream)
    if isinstance(handle, bool) or not isinstance(handle, int) or handle < 0:
        raise InvalidArgumentError(
            f"stream must be a torch.cuda.Stream or a raw handle (int), got {stream!r}")
    return handle


def require_torch(what: str) -> None:
    if torch is None:
        raise InvalidArgumentError(f"{what} needs PyTorch; pip install torch")
