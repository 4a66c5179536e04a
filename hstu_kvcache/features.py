"""Strip cached tokens from jagged feature tensors, so only new tokens are
embedded."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import _C
from ._tensors import capsule, current_stream, int64_array, is_torch, torch
from .errors import InvalidArgumentError


def strip_cached_tokens(values: Any, lengths: Any, num_cached: Any,
                        offsets: Any = None, stream: Any = None) -> Tuple[Any, Any, Any]:
    """Remove each user's first ``num_cached[b]`` tokens from a jagged tensor.

    Args:
        values: ``[sum(lengths), ...]`` jagged values (ids or features), a torch
            tensor (CPU or CUDA) or a NumPy array, contiguous.
        lengths: ``[B]`` tokens per user (int32 or int64; host or device).
        num_cached: ``[B]`` tokens to drop per user, e.g.
            ``lookup.cached_lengths``; clamped to ``0..lengths[b]``.
        offsets: optional ``[B+1]`` offsets of ``values`` (else from lengths).

    Returns:
        ``(values, lengths, offsets)`` of the kept tokens, on the device and of
        the index dtype of the inputs.  Runs on the GPU for CUDA tensors; the
        lengths are read on the host to size the output (a synchronisation if
        they live on the GPU).
    """
    host_lengths = int64_array(lengths, "lengths")
    drop = int64_array(num_cached, "num_cached")
    if drop.shape != host_lengths.shape:
        raise InvalidArgumentError(
            f"num_cached has {drop.shape[0]} entries, lengths has {host_lengths.shape[0]}")
    if (host_lengths < 0).any():
        raise InvalidArgumentError("lengths must not be negative")
    kept = host_lengths - np.clip(drop, 0, host_lengths)
    out_total = int(kept.sum())
    index_dtype = _index_dtype(lengths)

    if is_torch(values):
        dev = values.device
        tdtype = torch.int64 if index_dtype == np.int64 else torch.int32
        if offsets is None:
            offsets_t = torch.from_numpy(
                np.concatenate(([0], np.cumsum(host_lengths))).astype(index_dtype)).to(dev)
        else:
            offsets_t = offsets.to(dev, tdtype) if is_torch(offsets) else \
                torch.as_tensor(np.asarray(offsets, dtype=index_dtype), device=dev)
        drop_t = torch.from_numpy(np.clip(drop, -2**31, 2**31 - 1).astype(np.int32)).to(dev)
        out_values = torch.empty((out_total,) + tuple(values.shape[1:]),
                                 dtype=values.dtype, device=dev)
        out_lengths = torch.empty(host_lengths.shape[0], dtype=tdtype, device=dev)
        out_offsets = torch.empty(host_lengths.shape[0] + 1, dtype=tdtype, device=dev)
        if dev.type == "cuda":
            handle = current_stream("cuda", dev.index or 0, stream)
        else:
            handle = 0
        _C.strip(capsule(values.contiguous(), "values"), capsule(offsets_t, "offsets"),
                 capsule(drop_t, "num_cached"), capsule(out_values, "out_values"),
                 capsule(out_lengths, "out_lengths"), capsule(out_offsets, "out_offsets"),
                 handle)
        return out_values, out_lengths, out_offsets

    arr = np.ascontiguousarray(values)
    if offsets is None:
        offs = np.concatenate(([0], np.cumsum(host_lengths))).astype(index_dtype)
    else:
        offs = np.ascontiguousarray(np.asarray(offsets), dtype=index_dtype)
    out_values = np.empty((out_total,) + arr.shape[1:], dtype=arr.dtype)
    out_lengths = np.empty(host_lengths.shape[0], dtype=index_dtype)
    out_offsets = np.empty(host_lengths.shape[0] + 1, dtype=index_dtype)
    drop32 = np.clip(drop, -2**31, 2**31 - 1).astype(np.int32)
    _C.strip(capsule(arr, "values"), capsule(offs, "offsets"), capsule(drop32, "num_cached"),
             capsule(out_values, "out_values"), capsule(out_lengths, "out_lengths"),
             capsule(out_offsets, "out_offsets"), 0)
    return out_values, out_lengths, out_offsets


def _index_dtype(lengths: Any) -> type:
    dt = getattr(lengths, "dtype", None)
    if dt is not None and str(dt).endswith("int32"):
        return np.int32
    return np.int64
