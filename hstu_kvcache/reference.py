"""A small, readable, pure-PyTorch HSTU ranking model (inference only).

It exists to prove that inference with the KV cache equals inference without
it: :meth:`HSTUModel.forward` computes candidate scores either by a plain,
dense recompute of every user's ``[history ; candidates]`` sequence, or
incrementally (only the tokens a cache does not hold are embedded and run
through the layers, attending to history K/V read back from the cache), or in
M-FALCON candidate micro-batches. All three give the same scores.

HSTU math (see shared DESIGN.md, "HSTU math for the reference model"), per
layer, for a jagged input ``x`` of shape ``[tokens, d_model]``::

    x_hat      = LayerNorm(x)
    U, V, Q, K = split(SiLU(x_hat W + b))          # each H*D wide
    s_ij       = SiLU(alpha * q_i . k_j) / N        # per head, alpha = 1/sqrt(D)
    o_i        = sum_j mask_ij s_ij v_j
    out        = x + (LayerNorm(o) * U) W_o

``N`` is ``HSTUConfig.max_seq_len``, a constant: normalising by the batch's own
maximum length would make a cached run (which sees fewer new tokens) differ
from an uncached one. The mask, per user with tokens laid out
``[history ; candidates]``: history is causal (token i sees j <= i); every
candidate sees the whole history and itself, never another candidate. Hence a
history token's K/V at every layer depend only on the tokens up to and
including it, which is what makes caching them exact.

Two formulations of every forward, selected by ``forward(..., batched=...)``:

- per user (the readable reference): :meth:`HSTULayer.attend` / :meth:`HSTULayer.attend_dense`
  loop over users with one dense ``[H, rows_b, hist_b]`` (or ``[H, T, T]``) block each.
  Clear and exact masks, but ~15 small kernels per user per layer and host syncs:
  with a cache it was barely faster than recomputing (H100, 8 layers, 4 x 256 heads,
  bf16, 4096-token histories of which 3968 cached, 256 candidates: batch 16 took
  101 ms with the cache against 132 ms without).
- batched (the default with a cache or chunking): :meth:`HSTULayer.attend_batched`
  runs every user at once. Every index of the forward (row layout, padding, each
  row's last visible history index) is planned on the host from host lengths and
  uploaded in one copy; per layer there is no host synchronisation and the number
  of kernels does not depend on the batch size. New history rows and candidates go
  straight to ``cache.append`` in their ``[new ; candidates]`` layout, the history
  K/V come back from ``cache.gather`` and are padded to ``[B, L, H, D]`` by one
  gather (a view when all histories have one length); the scores are computed per
  head, as strided GEMMs, in blocks bounded by ``HSTUModel.max_score_elements``.
  Without a cache the same path treats every history token as a row: the fair
  no-cache baseline. Same H100 workload: batch 16 runs in 18.8 ms with the cache
  against 78 ms for the batched and 131 ms for the dense per-user recompute
  (benchmarks/results/e2e_h100.json); small batches are bound by the host's
  launch rate (~7.5 ms for ~400 operators), not by the GPU.

Exactness: the model never lets a history token depend on later tokens (bit
for bit at equal shapes). A from-scratch recompute of a longer history can
still round earlier rows differently in the last bit, because GEMM libraries
choose kernels by matrix size; a cache stores the bits, so the cached path is
exact by construction and agrees with recompute to float rounding.

Nothing here imports the compiled part of the package, so this module works
(and its tests run) without the C extension; the cached path only calls the
cache object it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HSTUConfig",
    "HSTUBatch",
    "HSTULayer",
    "HSTUModel",
    "KVCacheLike",
    "RowLayout",
    "BatchedLayout",
    "plan_batched_pass",
    "token_keys_host",
    "SyntheticUsers",
    "lengths_to_offsets",
    "make_synthetic_batch",
    "strip_cached_tokens_reference",
    "token_keys",
    "time_features",
    "NUM_HOUR_OF_WEEK",
    "NUM_GAP_BUCKETS",
]

# Time encoding vocabulary sizes (see ``time_features``).
NUM_HOUR_OF_WEEK = 168
NUM_GAP_BUCKETS = 64  # bucket 0 = "no previous event"; 1 + floor(log2(1 + gap)) otherwise


# --------------------------------------------------------------------------- #
# Configuration and inputs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class HSTUConfig:
    """Shape and numerics of the reference model.

    Attributes:
        num_items: item vocabulary size; item ids are in ``[0, num_items)``.
        num_actions: action vocabulary size; action ids are in ``[0, num_actions)``.
            Index ``num_actions`` of the action table is reserved for candidates
            ("no action").
        d_model: width of the residual stream.
        num_heads: attention heads ``H``.
        head_dim: per-head width ``D`` of Q, K, V and U.
        num_layers: HSTU layers.
        max_seq_len: ``N``; positions must be ``< N`` and it is the attention
            normaliser (a constant, never the batch's own maximum length).
        dtype: parameter and activation dtype (float32 or bfloat16, say).
        device: where parameters live and compute happens.
        seed: seed of the deterministic parameter initialisation.
    """

    num_items: int = 1000
    num_actions: int = 4
    d_model: int = 64
    num_heads: int = 2
    head_dim: int = 32
    num_layers: int = 2
    max_seq_len: int = 4352
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_items", "num_actions", "d_model", "num_heads", "head_dim",
                     "num_layers", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HSTUConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"HSTUConfig.dtype must be a floating torch.dtype, got {self.dtype!r}")

    @property
    def no_action_index(self) -> int:
        """Row of the action table used by candidates, which carry no action."""
        return self.num_actions


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host int64 array on ``device``; to a GPU through pinned memory, without a host sync."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def lengths_to_offsets(lengths: Tensor) -> Tensor:
    """Exclusive prefix sum of a 1-D length tensor: ``[B] -> [B+1]`` (int64, same device)."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    return offsets


@dataclass
class HSTUBatch:
    """One batch of ranking requests, jagged by user.

    All tensors are 1-D int64 on one device. User ``b`` owns history tokens
    ``history_offsets()[b] : history_offsets()[b+1]`` (oldest first) and
    candidates ``candidate_offsets()[b] : candidate_offsets()[b+1]``.

    Attributes:
        user_ids: ``[B]``.
        history_item_ids, history_action_ids, history_timestamps:
            ``[sum(history_lengths)]``; timestamps in seconds, non-decreasing per user.
        history_lengths: ``[B]``; each ``<= max_seq_len``.
        candidate_item_ids: ``[sum(num_candidates)]``.
        num_candidates: ``[B]``.
        request_timestamps: optional ``[B]`` time of the request, used as the
            candidates' timestamp; defaults to each user's last history
            timestamp (0 for an empty history).
    """

    user_ids: Tensor
    history_item_ids: Tensor
    history_action_ids: Tensor
    history_timestamps: Tensor
    history_lengths: Tensor
    candidate_item_ids: Tensor
    num_candidates: Tensor
    request_timestamps: Tensor | None = None

    _INT_FIELDS = ("user_ids", "history_item_ids", "history_action_ids", "history_timestamps",
                   "history_lengths", "candidate_item_ids", "num_candidates")

    @property
    def batch_size(self) -> int:
        """Number of users ``B``."""
        return int(self.user_ids.numel())

    def history_offsets(self) -> Tensor:
        """``[B+1]`` int64 offsets of each user's history tokens."""
        return lengths_to_offsets(self.history_lengths)

    def candidate_offsets(self) -> Tensor:
        """``[B+1]`` int64 offsets of each user's candidates."""
        return lengths_to_offsets(self.num_candidates)

    def to(self, device: str | torch.device) -> "HSTUBatch":
        """A copy of the batch with every tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in self._INT_FIELDS}
        req = None if self.request_timestamps is None else self.request_timestamps.to(device)
        return HSTUBatch(**moved, request_timestamps=req)

    def resolved_request_timestamps(self) -> Tensor:
        """``[B]`` request time: ``request_timestamps`` or the last history timestamp."""
        if self.request_timestamps is not None:
            return self.request_timestamps
        offsets = self.history_offsets()
        last = (offsets[1:] - 1).clamp(min=0)
        if self.history_timestamps.numel() == 0:
            return torch.zeros_like(self.history_lengths)
        ts = self.history_timestamps[last]
        return torch.where(self.history_lengths > 0, ts, torch.zeros_like(ts))

    def validate(self, cfg: HSTUConfig) -> None:
        """Raise ``ValueError`` with a clear message if the batch does not fit ``cfg``."""
        self.validated_host_lengths(cfg)

    def validated_host_lengths(self, cfg: HSTUConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`validate`, returning host copies ``(user_ids, history_lengths, num_candidates)``.

        Why: every data-dependent check needs the device's answer on the host, and
        each answer is a host-device round trip. The lengths and ids come over in
        one copy and every value check is reduced on the device and read back in a
        second one, so a forward on a GPU batch synchronises twice here, not once
        per check; the forward then plans its layout from these host lengths.
        """
        for name in self._INT_FIELDS:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise ValueError(f"HSTUBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"HSTUBatch.{name} must be 1-D, got shape {tuple(t.shape)}")
            if t.dtype != torch.int64:
                raise ValueError(f"HSTUBatch.{name} must be int64, got {t.dtype}")
        B = self.batch_size
        for name in ("history_lengths", "num_candidates"):
            n = getattr(self, name).numel()
            if n != B:
                raise ValueError(f"HSTUBatch.{name} has {n} entries but user_ids has {B}")
        if self.request_timestamps is not None:
            rt = self.request_timestamps
            if rt.dim() != 1 or rt.numel() != B or rt.dtype != torch.int64:
                raise ValueError("HSTUBatch.request_timestamps must be int64 [B] "
                                 f"(B={B}), got {rt.dtype} {tuple(rt.shape)}")
        # One device -> host copy for every length and id.
        host = torch.cat([self.user_ids, self.history_lengths.to(self.user_ids.device),
                          self.num_candidates.to(self.user_ids.device)]).cpu().numpy()
        uid, hl, nc = host[:B], host[B:2 * B], host[2 * B:]
        if B and int(hl.min()) < 0:
            raise ValueError(f"history_lengths must be >= 0, got {hl.tolist()}")
        if B and int(nc.min()) < 0:
            raise ValueError(f"num_candidates must be >= 0, got {nc.tolist()}")
        total_h = int(hl.sum())
        for name in ("history_item_ids", "history_action_ids", "history_timestamps"):
            n = getattr(self, name).numel()
            if n != total_h:
                raise ValueError(f"HSTUBatch.{name} has {n} tokens but sum(history_lengths) = {total_h}")
        total_c = int(nc.sum())
        if self.candidate_item_ids.numel() != total_c:
            raise ValueError(f"HSTUBatch.candidate_item_ids has {self.candidate_item_ids.numel()} "
                             f"items but sum(num_candidates) = {total_c}")
        if B and int(hl.max()) > cfg.max_seq_len:
            b = int(hl.argmax())
            raise ValueError(
                f"user {int(uid[b])} has {int(hl[b])} history tokens: positions "
                f"0..{int(hl[b]) - 1} go beyond max_seq_len={cfg.max_seq_len} (positions must be "
                "< max_seq_len); truncate the history or raise max_seq_len")

        # Every value check as a device scalar, then one copy to the host.
        ranges = (("history_item_ids", self.history_item_ids, cfg.num_items),
                  ("candidate_item_ids", self.candidate_item_ids, cfg.num_items),
                  ("history_action_ids", self.history_action_ids, cfg.num_actions))
        checks: list[Tensor] = []
        for _, values, _ in ranges:
            if values.numel():
                checks += [values.min(), values.max()]
        ts = self.history_timestamps
        h_off = np.concatenate([[0], np.cumsum(hl)])
        has = np.flatnonzero(hl > 0)
        check_request = self.request_timestamps is not None and has.size > 0
        if ts.numel():
            checks.append(ts.min())
            # Non-decreasing within each user: a decrease across a user boundary is fine.
            dec = ts[1:] < ts[:-1]
            boundaries = h_off[1:-1][(h_off[1:-1] > 0) & (h_off[1:-1] < total_h)] - 1
            if boundaries.size:
                dec[_to_device(boundaries, ts.device)] = False
            checks.append(dec.any().to(torch.int64))
            if check_request:
                assert self.request_timestamps is not None
                idx = _to_device(has, ts.device)
                last = _to_device(h_off[1:][has] - 1, ts.device)
                late = self.request_timestamps.to(ts.device).index_select(0, idx) < ts.index_select(0, last)
                checks.append(late.any().to(torch.int64))
        got = iter(torch.stack(checks).cpu().tolist() if checks else [])
        for name, values, hi in ranges:
            if values.numel():
                lo_v, hi_v = next(got), next(got)
                if lo_v < 0 or hi_v >= hi:
                    raise ValueError(f"HSTUBatch.{name} must be in [0, {hi}), got range [{lo_v}, {hi_v}]")
        if ts.numel():
            if next(got) < 0:
                raise ValueError("history_timestamps must be >= 0 (seconds since the epoch)")
            if next(got):
                raise ValueError("history_timestamps must be non-decreasing within each user")
            if check_request and next(got):
                raise ValueError("request_timestamps must be >= each user's last history timestamp")
        return uid, hl, nc


# --------------------------------------------------------------------------- #
# Jagged helpers
# --------------------------------------------------------------------------- #


def strip_cached_tokens_reference(values: Tensor, lengths: Tensor,
                                  num_cached: Tensor | np.ndarray | Sequence[int]
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Drop each user's first ``num_cached[b]`` tokens from a jagged 1-D tensor.

    Pure-PyTorch twin of ``hstu_kvcache.strip_cached_tokens`` (same contract), used
    when the package's op is unavailable and to cross-check it.

    Returns:
        ``(values, lengths, offsets)`` of the remaining (new) tokens; ``lengths``
        int64 ``[B]`` and ``offsets`` int64 ``[B+1]``, on ``values.device``.
    """
    lengths = lengths.to(device=values.device, dtype=torch.int64)
    cached = torch.as_tensor(np.asarray(num_cached, dtype=np.int64) if not isinstance(num_cached, Tensor)
                             else num_cached, dtype=torch.int64).to(values.device)
    if cached.shape != lengths.shape:
        raise ValueError(f"num_cached has shape {tuple(cached.shape)}, lengths {tuple(lengths.shape)}")
    if bool((cached < 0).any()) or bool((cached > lengths).any()):
        raise ValueError("num_cached must satisfy 0 <= num_cached <= lengths")
    offsets = lengths_to_offsets(lengths)
    new_lengths = lengths - cached
    # Each token's index within its user; keep those at or after the cached prefix.
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    within = torch.arange(values.numel(), device=values.device) - offsets[:-1][seg]
    keep = within >= cached[seg]
    return values[keep], new_lengths, lengths_to_offsets(new_lengths)


def _resolve_strip() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The package's strip op when it exists (so the reference exercises it), else the twin."""
    try:
        from hstu_kvcache import strip_cached_tokens  # type: ignore[attr-defined]
    except ImportError:
        return strip_cached_tokens_reference
    return strip_cached_tokens


def time_features(batch: HSTUBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Time encoding indices of every history token and candidate.

    Returns ``(hist_hour_of_week, hist_gap_bucket, cand_hour_of_week, cand_gap_bucket)``.

    Why this encoding: a cached token's K/V must not depend on anything that
    changes when the history grows, so a history token's time feature may use
    only the token itself and its predecessors, never its successors and never
    the request time. We use (a) the hour of the week of the token's own
    timestamp and (b) the log2-bucketed gap to the previous event of the same
    user (bucket 0 for the first event). Both are fixed once the token exists,
    which is exactly what makes KV caching exact. (A "time since the latest
    event" feature, common in training code, would change every cached token's
    embedding at every request and silently break the cache.) Candidates are
    never cached, so they use the request time: its hour of week and its gap
    to the last history event.
    """
    ts = batch.history_timestamps
    offsets = batch.history_offsets()
    hist_how = torch.div(ts, 3600, rounding_mode="floor") % NUM_HOUR_OF_WEEK
    prev = torch.cat([ts[:1], ts[:-1]]) if ts.numel() else ts
    first = torch.zeros_like(ts, dtype=torch.bool)
    first[offsets[:-1][batch.history_lengths > 0]] = True
    hist_gap = _gap_bucket(ts - prev)
    hist_gap = torch.where(first, torch.zeros_like(hist_gap), hist_gap)

    req = batch.resolved_request_timestamps()
    last = (offsets[1:] - 1).clamp(min=0)
    last_ts = ts[last] if ts.numel() else torch.zeros_like(req)
    user_gap = torch.where(batch.history_lengths > 0, _gap_bucket(req - last_ts), torch.zeros_like(req))
    user_how = torch.div(req, 3600, rounding_mode="floor") % NUM_HOUR_OF_WEEK
    cand_how = torch.repeat_interleave(user_how, batch.num_candidates)
    cand_gap = torch.repeat_interleave(user_gap, batch.num_candidates)
    return hist_how, hist_gap, cand_how, cand_gap


def _gap_bucket(gap: Tensor) -> Tensor:
    # float64 log2 of an int64 gap is deterministic, so every path buckets alike.
    b = torch.floor(torch.log2(gap.clamp(min=0).to(torch.float64) + 1.0)).to(torch.int64) + 1
    return b.clamp(max=NUM_GAP_BUCKETS - 1)


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #


@dataclass
class RowLayout:
    """How the rows processed by one pass are laid out, per user.

    User ``b`` owns rows ``row_offsets[b] : row_offsets[b+1]``: first
    ``num_new_history[b]`` new history tokens (absolute positions
    ``history_start[b], history_start[b]+1, ...``), then its candidates. The
    history K/V the rows attend to (cached + new) are jagged by
    ``history_offsets``: user ``b`` has ``history_offsets[b+1]-history_offsets[b]``
    history tokens. Lists are host-side Python ints (loop bounds).
    """

    row_offsets: list[int]
    num_new_history: list[int]
    history_start: list[int]
    history_offsets: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.num_new_history)


@dataclass
class BatchedLayout:
    """How the rows of one batched pass sit in padded, head-major blocks.

    Built once per pass on the host from host lengths (:func:`plan_batched_pass`)
    and uploaded with every other index of the forward in one copy; per layer
    the batched attention then needs no host synchronisation and launches the
    same handful of kernels whatever the batch size.

    The pass's rows are laid out per user as ``[new history ; candidates]``
    (each user's rows consecutive, users in batch order). For attention they
    are gathered into ``[H*B, R, D]`` (head-major: slab ``h*B + b`` is head ``h``
    of user ``b``), user ``b``'s history K/V into ``[H*B, L, D]``, so one strided
    batched GEMM covers every head of every user. Padding slots hold copies of a
    real row, so every score is finite; they are hidden by the mask (history
    columns) or dropped (rows).

    Attributes:
        batch_size: users ``B``.
        num_rows: rows of the pass.
        max_rows: ``R``, the most rows of one user.
        max_history: ``L``, the longest history.
        row_pad: ``[B*R]`` int64, the row in each slot; ``None`` when every user
            has ``R`` rows (the rows are the slots).
        unpad: ``[num_rows]`` int64, the slot of each row (read when ``row_pad`` is set).
        is_candidate: ``[num_rows, 1, 1]`` model dtype, 1 for candidate rows
            (they add their own K/V term), 0 for history rows.
        mask_rows, mask_col0: the only corner of each ``[R, L]`` score block that
            can hold hidden entries (rows ``< mask_rows``, columns ``>= mask_col0``):
            a new history row at position ``p`` sees ``j <= p``, a candidate its
            user's whole history (``j < history_length``). With 3968 of 4096
            tokens cached the corner is 128 x 127 of 384 x 4096.
        causal_diagonal: when every user with rows has new tokens starting at
            one position and histories of length ``L``, the corner's mask is a
            plain lower triangle: ``tril_(causal_diagonal)`` zeroes it in place,
            writing only the hidden entries (no mask tensor to read). Else None.
        hidden: ``[B, mask_rows, L - mask_col0]`` bool, True where a row must not
            see a history column (used when ``causal_diagonal`` is None), or None
            when nothing is hidden.
        blocks: ``(first slab, end slab, first user, end user)`` of each block of
            score slabs materialised at once: whole heads of every user, or one
            head of a range of users, so that a block stays within
            ``HSTUModel.max_score_elements``.
    """

    batch_size: int
    num_rows: int
    max_rows: int
    max_history: int
    row_pad: Tensor | None
    unpad: Tensor
    is_candidate: Tensor
    mask_rows: int
    mask_col0: int
    causal_diagonal: int | None
    hidden: Tensor | None
    blocks: list[tuple[int, int, int, int]]


def _offsets_np(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def plan_batched_pass(history_lengths: np.ndarray, history_start: np.ndarray,
                      num_new_history: np.ndarray, num_candidates: np.ndarray,
                      ) -> dict[str, Any]:
    """Host-side layout of one batched pass (pure NumPy; see :class:`BatchedLayout`).

    Args:
        history_lengths: ``[B]`` whole history length per user (cached + new).
        history_start: ``[B]`` absolute position of each user's first new row.
        num_new_history: ``[B]`` new history rows per user in this pass.
        num_candidates: ``[B]`` candidate rows per user in this pass.

    Returns:
        A dict of host values: ``num_rows``, ``max_rows``, ``max_history``,
        ``mask_rows``, ``mask_col0``, ``causal_diagonal`` (int or None), and int64
        arrays ``row_offsets`` [B+1], ``row_pad`` [B*R] (None when it is the
        identity), ``unpad`` [rows], ``limit`` [B, mask_rows] (last visible
        history index of each slot, -1 for none), ``is_candidate`` [rows] (0/1),
        ``row_in_user`` and ``user_of_row`` [rows].
    """
    hl = np.asarray(history_lengths, dtype=np.int64)
    start = np.asarray(history_start, dtype=np.int64)
    n_new = np.asarray(num_new_history, dtype=np.int64)
    n_cand = np.asarray(num_candidates, dtype=np.int64)
    B = hl.shape[0]
    rows_b = n_new + n_cand
    row_off = _offsets_np(rows_b)
    rows = int(row_off[-1])
    R = int(rows_b.max(initial=0))
    L = int(hl.max(initial=0))
    user = np.repeat(np.arange(B, dtype=np.int64), rows_b)
    r = np.arange(rows, dtype=np.int64) - row_off[:-1][user]
    is_hist = r < n_new[user]
    unpad = user * R + r
    row_pad = None
    if rows != B * R:  # some user has fewer rows than R: slots need filling
        row_pad = np.zeros(B * R, dtype=np.int64)
        row_pad[unpad] = np.arange(rows, dtype=np.int64)
    # Which corner of the [R, L] block can hide anything (see BatchedLayout).
    active = rows_b > 0
    contributes = active & ((n_new > 0) | (hl < L))
    mask_rows, mask_col0 = 0, L
    if L > 0 and contributes.any():
        mask_rows = int(np.where(hl < L, rows_b, n_new)[contributes].max())
        mask_col0 = int(np.where(n_new > 0, start + 1, hl)[contributes].min())
    if mask_col0 >= L:
        mask_rows, mask_col0 = 0, L
    causal_diagonal = None
    if mask_rows:
        s0 = start[active]
        # Rows below a user's new ones (its candidates, padding) are left alone by the
        # triangle: they sit at r >= n_new[b], whose triangle starts past the history.
        if (n_new[active] > 0).all() and (s0 == s0[0]).all() and (hl[active] == L).all():
            causal_diagonal = int(s0[0]) - mask_col0
    limit = np.full(B * R, -1, dtype=np.int64)
    limit[unpad] = np.where(is_hist, start[user] + r, hl[user] - 1)
    limit = limit.reshape(B, R)[:, :mask_rows]
    return {"num_rows": rows, "max_rows": R, "max_history": L, "mask_rows": mask_rows,
            "mask_col0": mask_col0, "causal_diagonal": causal_diagonal, "row_offsets": row_off,
            "row_pad": row_pad, "unpad": unpad, "limit": np.ascontiguousarray(limit),
            "is_candidate": (~is_hist).astype(np.int64), "row_in_user": r, "user_of_row": user}


def score_blocks(num_heads: int, batch_size: int, slab_elements: int, max_elements: int
                 ) -> list[tuple[int, int, int, int]]:
    """Blocks of ``[R, L]`` score slabs (head-major ``h*B + b``) within ``max_elements``.

    Whole heads of every user when one head's slabs fit, else one head of an
    even share of the users; each block is a contiguous slab range.
    """
    H, B = num_heads, batch_size
    per_block = max(1, max_elements // max(slab_elements, 1))
    if per_block >= B:
        hc = min(H, per_block // B)
        return [(h * B, min(H, h + hc) * B, 0, B) for h in range(0, H, hc)]
    n = -(-B // per_block)
    bc = -(-B // n)  # even blocks
    return [(h * B + b, h * B + min(B, b + bc), b, min(B, b + bc))
            for h in range(H) for b in range(0, B, bc)]


class _Uploader:
    """Collects host int64 arrays and sends them to the device in one copy.

    Why: each small ``torch.tensor(..., device="cuda")`` is its own transfer (and
    pageable, so synchronous); one pinned, non-blocking copy per forward keeps
    the host ahead of the GPU.
    """

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._views: list[tuple[int, int, tuple[int, ...]]] = []
        self._size = 0

    def add(self, array: np.ndarray) -> int:
        """Queue ``array`` (cast to int64); returns its handle for :meth:`get`."""
        a = np.ascontiguousarray(array, dtype=np.int64)
        self._parts.append(a.reshape(-1))
        self._views.append((self._size, a.size, a.shape))
        self._size += a.size
        return len(self._views) - 1

    def upload(self, device: torch.device) -> None:
        """Send everything queued so far to ``device`` (one copy)."""
        self._flat = _to_device(np.concatenate(self._parts) if self._parts else np.zeros(0, np.int64), device)

    def get(self, handle: int) -> Tensor:
        off, n, shape = self._views[handle]
        return self._flat[off:off + n].view(shape)


class HSTULayer(nn.Module):
    """One HSTU layer, split into building blocks that work on any set of rows.

    ``qkvu`` and ``finish`` are row-wise; ``attend`` is the only block that mixes
    tokens. The cached path runs them on "new rows" (new history tokens and
    candidates) against "all history K/V" (cached + new).
    """

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.alpha = 1.0 / math.sqrt(cfg.head_dim)
        self.normaliser = float(cfg.max_seq_len)  # N: a constant, see module docstring
        hd = cfg.num_heads * cfg.head_dim
        self.input_norm = nn.LayerNorm(cfg.d_model)
        self.uvqk = nn.Linear(cfg.d_model, 4 * hd)
        self.output_norm = nn.LayerNorm(hd)
        self.out_proj = nn.Linear(hd, cfg.d_model, bias=False)

    def qkvu(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Row-wise projections: ``x [rows, d_model]`` -> q, k, v ``[rows, H, D]``, u ``[rows, H*D]``."""
        h = F.silu(self.uvqk(self.input_norm(x)))
        u, v, q, k = h.chunk(4, dim=-1)
        shape = (x.shape[0], self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape), u

    def attend(self, q: Tensor, k: Tensor, v: Tensor, k_hist: Tensor, v_hist: Tensor,
               layout: RowLayout) -> Tensor:
        """HSTU attention of new rows over history K/V (+ each candidate's own K/V).

        Args:
            q, k, v: ``[rows, H, D]`` of the rows of this pass (``layout.row_offsets``).
                ``k``/``v`` are only read for candidate rows (their self term):
                candidates are not part of the history, so not in ``k_hist``.
            k_hist, v_hist: ``[sum(history), H, D]``, every history token's K/V
                (cached and new), jagged by ``layout.history_offsets``.
            layout: row layout of this pass.

        Returns:
            ``o [rows, H, D]``. A new history row at absolute position ``p`` sees
            history ``j <= p``; a candidate row sees all history and itself.

        Loops over users with one dense ``[H, rows_b, hist_b]`` score block each:
        clear, and never materialises a ``[B, H, T, T]`` padded tensor.
        """
        o = torch.empty_like(q)
        for b in range(layout.batch_size):
            r0, r1 = layout.row_offsets[b], layout.row_offsets[b + 1]
            h0, h1 = layout.history_offsets[b], layout.history_offsets[b + 1]
            n_new, start = layout.num_new_history[b], layout.history_start[b]
            if r1 == r0:
                continue
            qb = q[r0:r1]
            if h1 > h0:
                s = F.silu(self.alpha * torch.einsum("rhd,lhd->hrl", qb, k_hist[h0:h1])) / self.normaliser
                hist_len = h1 - h0
                # Last visible history index per row: causal for history rows, all for candidates.
                limit = torch.full((r1 - r0,), hist_len - 1, dtype=torch.int64, device=q.device)
                limit[:n_new] = start + torch.arange(n_new, device=q.device)
                mask = torch.arange(hist_len, device=q.device)[None, :] <= limit[:, None]
                s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
                ob = torch.einsum("hrl,lhd->rhd", s, v_hist[h0:h1])
            else:
                ob = torch.zeros_like(qb)
            if r1 - r0 > n_new:
                # Candidates also see themselves (and no other candidate).
                c0 = r0 + n_new
                self_s = F.silu(self.alpha * (q[c0:r1] * k[c0:r1]).sum(-1, keepdim=True)) / self.normaliser
                ob[n_new:] = ob[n_new:] + self_s * v[c0:r1]
            o[r0:r1] = ob
        return o

    def attend_batched(self, q: Tensor, k: Tensor, v: Tensor, k_hist: Tensor, v_hist: Tensor,
                       layout: BatchedLayout) -> Tensor:
        """:meth:`attend` for every user at once, in padded blocks, without host syncs.

        Args:
            q, k, v: ``[rows, H, D]`` of the pass's rows (``k``/``v`` only for the
                candidates' self term), laid out as ``layout`` says.
            k_hist, v_hist: ``[H*B, L, D]`` history K/V in head-major padded slots
                (head ``h`` of user ``b``'s token ``j`` at ``[h*B + b, j]``; slots past
                a user's length hold any finite values: the mask hides them).
            layout: the pass's :class:`BatchedLayout`.

        Returns:
            ``o [rows, H, D]``, equal to :meth:`attend` up to float rounding.

        Per block of score slabs (one block unless the scores would exceed the
        memory bound): ``S = alpha * Q K^T`` (alpha in the GEMM's epilogue), SiLU
        in place, zero the hidden corner in place, ``O = S V / N`` (1/N in the
        epilogue). Every head of every user is one strided batched GEMM: the
        kernel count depends on neither B nor H, which matters because small
        batches are bound by the host's launch rate, not by the GPU.
        """
        B, R, L = layout.batch_size, layout.max_rows, layout.max_history
        H, D = self.num_heads, self.head_dim
        rows = q.shape[0]
        if rows == 0:
            return torch.empty_like(q)
        qt = q.transpose(0, 1)  # [H, rows, D], a view
        q_slabs = (qt.reshape(H * B, R, D) if layout.row_pad is None
                   else qt.index_select(1, layout.row_pad).view(H * B, R, D))
        o_slabs = (torch.zeros if L == 0 else torch.empty)((H * B, R, D), dtype=q.dtype, device=q.device)
        mr, c0 = layout.mask_rows, layout.mask_col0
        for i0, i1, b0, b1 in (layout.blocks if L else []):
            whole = i0 == 0 and i1 == H * B
            qb = q_slabs if whole else q_slabs[i0:i1]
            kb = k_hist if whole else k_hist[i0:i1]
            vb = v_hist if whole else v_hist[i0:i1]
            s = torch.empty((i1 - i0, R, L), dtype=q.dtype, device=q.device)
            s.baddbmm_(qb, kb.transpose(1, 2), beta=0.0, alpha=self.alpha)
            F.silu(s, inplace=True)
            if mr:
                corner = s[:, :mr, c0:]
                if layout.causal_diagonal is not None:
                    corner.tril_(layout.causal_diagonal)  # writes only the hidden entries
                elif layout.hidden is not None:
                    hidden = layout.hidden if b0 == 0 and b1 == B else layout.hidden[b0:b1]
                    corner.view(-1, b1 - b0, mr, L - c0).masked_fill_(hidden, 0.0)
            (o_slabs if whole else o_slabs[i0:i1]).baddbmm_(s, vb, beta=0.0, alpha=1.0 / self.normaliser)
        # Back to rows: [H, B*R, D] seen as [B*R, H, D]; one copy (dropping padding slots).
        ot = o_slabs.view(H, B * R, D).transpose(0, 1)
        o = ot.contiguous() if layout.row_pad is None else ot.index_select(0, layout.unpad)
        # Candidates also see themselves (and no other candidate); history rows add 0.
        self_s = F.silu(self.alpha * (q * k).sum(-1, keepdim=True)) / self.normaliser
        return o.addcmul_(self_s * layout.is_candidate, v)

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, offsets: list[int],
                     history_lengths: list[int]) -> Tensor:
        """Plain masked attention over each user's whole ``[history ; candidates]`` sequence.

        The no-cache reference: one ``[H, T, T]`` block per user with the mask
        spelled out, independent of the decomposition used by :meth:`attend`.
        """
        o = torch.empty_like(q)
        for b in range(len(history_lengths)):
            t0, t1 = offsets[b], offsets[b + 1]
            if t1 == t0:
                continue
            T, L = t1 - t0, history_lengths[b]
            s = F.silu(self.alpha * torch.einsum("ihd,jhd->hij", q[t0:t1], k[t0:t1])) / self.normaliser
            i = torch.arange(T, device=q.device)[:, None]
            j = torch.arange(T, device=q.device)[None, :]
            # History: causal (j <= i). Candidate: all history (j < L) and itself (j == i).
            mask = (j <= i) & ((j < L) | (j == i))
            s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
            o[t0:t1] = torch.einsum("hij,jhd->ihd", s, v[t0:t1])
        return o

    def finish(self, o: Tensor, u: Tensor, x: Tensor) -> Tensor:
        """Row-wise output: ``x + (LayerNorm(o) * u) W_o``."""
        y = self.output_norm(o.reshape(o.shape[0], self.num_heads * self.head_dim)) * u
        return x + self.out_proj(y)


# --------------------------------------------------------------------------- #
# The cache interface this model is written against
# --------------------------------------------------------------------------- #


class KVCacheLike(Protocol):
    """The subset of ``hstu_kvcache.KVCache`` the cached forward uses.

    - ``lookup(user_ids, history_lengths, token_keys=None)`` (numpy int64 ids and
      lengths; token keys an int64 tensor) returns an object with
      ``cached_lengths`` (int64 ``[B]``): leading history tokens already cached.
    - ``allocate(lookup, num_candidates=None)`` reserves room for the new tokens
      and returns the batch metadata; the model reads ``new_history_nnz`` from it
      and passes it back. The batched path passes ``num_candidates`` (``[B]``, the
      candidates riding with the history pass); the per-user path passes none.
    - ``append(layer, k, v, batch)`` writes the new history tokens' K/V (cache
      dtype/device, rows may be strided): ``[new_history_nnz, H, D]``, users one
      after another, or, when the batch was allocated with ``num_candidates``,
      ``[rows, H, D]`` laid out per user as ``[new history ; candidates]``, and the
      cache skips the candidates.
    - ``gather(layer, batch)`` returns every history token's K and V (cached and
      just appended), ``[sum(history_lengths), H, D]`` each, users one after another.
    - ``batch.release()``, if present, is called when the forward ends (unpins
      the batch's users; rolls back a batch that did not append every layer).

    The cache's ``dtype`` / ``device`` are read from ``cache.config`` (or the
    cache itself); torch dtypes and dtype names (``"bfloat16"``) both work.
    """

    def lookup(self, user_ids: Any, history_lengths: Any, token_keys: Any = None) -> Any: ...
    def allocate(self, lookup: Any, num_candidates: Any = None) -> Any: ...
    def append(self, layer: int, k: Tensor, v: Tensor, batch: Any) -> Any: ...
    def gather(self, layer: int, batch: Any) -> tuple[Tensor, Tensor]: ...


def _cache_spec(cache: Any, default_dtype: torch.dtype, default_device: torch.device
                ) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the K/V tensors ``cache`` takes."""
    for holder in (getattr(cache, "config", None), cache):
        dtype = getattr(holder, "dtype", None) if holder is not None else None
        if dtype is None:
            continue
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = getattr(holder, "device", None)
        return dtype, torch.device(device) if device is not None else default_device
    return default_dtype, default_device


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


class HSTUModel(nn.Module):
    """HSTU ranking model: embeddings, ``num_layers`` HSTU layers, a scoring head.

    Parameters are drawn deterministically from ``cfg.seed`` (on the CPU in
    float32, then cast), so two models built from one config are identical on
    any device.
    """

    #: Upper bound on score elements the batched path materialises at once
    #: (see :func:`score_blocks`): 2**28 is 512 MiB in bf16. 16 users x 4 heads x
    #: 384 rows x 4096 history (200 MB) is one block; a no-cache pass of 16 users
    #: (4352 rows each) runs in 8 blocks of 8 users x 1 head.
    max_score_elements: int = 1 << 28

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.num_items, d)
        self.action_emb = nn.Embedding(cfg.num_actions + 1, d)  # last row: "no action" (candidates)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.how_emb = nn.Embedding(NUM_HOUR_OF_WEEK, d)
        self.gap_emb = nn.Embedding(NUM_GAP_BUCKETS, d)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head_hidden = nn.Linear(d, d)
        self.head_out = nn.Linear(d, 1)
        self._init_parameters()
        self.to(device=cfg.device, dtype=cfg.dtype)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.item_emb.weight.device

    def _init_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed)

        def normal_(t: Tensor, std: float) -> None:
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)

        # Five embeddings are summed: std 1/sqrt(5) each keeps the input at unit scale.
        for emb in (self.item_emb, self.action_emb, self.pos_emb, self.how_emb, self.gap_emb):
            normal_(emb.weight, 1.0 / math.sqrt(5))
        hd = self.cfg.num_heads * self.cfg.head_dim
        for layer in self.layers:
            assert isinstance(layer, HSTULayer)
            normal_(layer.uvqk.weight, 1.0 / math.sqrt(self.cfg.d_model))  # LN input: unit-scale pre-activations
            normal_(layer.uvqk.bias, 0.1)
            # Each residual branch adds ~1/(2L) variance, so the stream stays O(1) over layers.
            normal_(layer.out_proj.weight, 1.0 / math.sqrt(hd * 2 * self.cfg.num_layers))
        normal_(self.head_hidden.weight, 1.0 / math.sqrt(self.cfg.d_model))
        normal_(self.head_hidden.bias, 0.1)
        normal_(self.head_out.weight, 1.0 / math.sqrt(self.cfg.d_model))
        normal_(self.head_out.bias, 0.1)

    # ---- building blocks -------------------------------------------------- #

    def embed(self, item_ids: Tensor, action_ids: Tensor, positions: Tensor,
              hour_of_week: Tensor, gap_bucket: Tensor) -> Tensor:
        """Input embedding of a set of tokens: ``[n] ids -> [n, d_model]``.

        Position and time embeddings are added to the input (never inside
        attention), so a token's embedding depends only on its own features.
        """
        return (self.item_emb(item_ids) + self.action_emb(action_ids) + self.pos_emb(positions)
                + self.how_emb(hour_of_week) + self.gap_emb(gap_bucket))

    def candidate_positions(self, history_lengths: Tensor, num_candidates: Tensor) -> Tensor:
        """Candidates take the position right after the history, clamped to ``max_seq_len - 1``."""
        pos = history_lengths.clamp(max=self.cfg.max_seq_len - 1)
        return torch.repeat_interleave(pos, num_candidates)

    def score(self, x_candidates: Tensor) -> Tensor:
        """Scoring head: ``[n, d_model] -> [n]``."""
        h = F.silu(self.head_hidden(self.final_norm(x_candidates)))
        return self.head_out(h).squeeze(-1)

    # ---- forward ---------------------------------------------------------- #

    @torch.no_grad()
    def forward(self, batch: HSTUBatch, cache: KVCacheLike | None = None,
                candidate_chunk: int | None = None, *, verify_tokens: bool = False,
                batched: bool | None = None) -> Tensor:
        """Score every candidate of the batch.

        Args:
            batch: the requests (any device; moved to the model's).
            cache: optional KV cache (see :class:`KVCacheLike`). With a cache, only
                history tokens it does not hold are embedded and computed; their
                K/V are appended to it, and every layer's history K/V are read
                back from it.
            candidate_chunk: M-FALCON micro-batch size. Candidates are scored in
                micro-batches of this many per user, all reusing the history K/V
                computed once; the first micro-batch rides with the history pass.
            verify_tokens: pass ``token_keys(batch)`` to ``cache.lookup`` (verified
                mode: only a prefix whose tokens match is reused).
            batched: which formulation runs.

                - ``None`` (default): the dense per-user recompute (the plain
                  definition) without cache and chunking, else the batched
                  incremental path.
                - ``True``: the batched incremental path (:meth:`HSTULayer.attend_batched`):
                  every user at once in padded blocks, no host synchronisation per
                  layer; without a cache every history token is a row (the fair
                  no-cache baseline of the cached path).
                - ``False``: the per-user loops (:meth:`HSTULayer.attend` with a cache
                  or chunking, :meth:`HSTULayer.attend_dense` otherwise): the
                  readable reference the batched path is tested against.

        Returns:
            Scores ``[sum(num_candidates)]`` in the batch's candidate order, model dtype.

        All formulations agree up to float rounding.
        """
        if candidate_chunk is not None and (not isinstance(candidate_chunk, int)
                                            or isinstance(candidate_chunk, bool) or candidate_chunk < 1):
            raise ValueError(f"candidate_chunk must be a positive int or None, got {candidate_chunk!r}")
        if verify_tokens and cache is None:
            raise ValueError("verify_tokens=True needs a cache")
        if batched is not None and not isinstance(batched, bool):
            raise ValueError(f"batched must be True, False or None, got {batched!r}")
        batch = batch.to(self.device)
        uid, hl, nc = batch.validated_host_lengths(self.cfg)
        if batched is None:
            batched = cache is not None or candidate_chunk is not None
        if not batched:
            if cache is None and candidate_chunk is None:
                return self._forward_dense(batch)[0]
            return self._forward_incremental(batch, cache, candidate_chunk, verify_tokens)
        return self._forward_batched(batch, uid, hl, nc, cache, candidate_chunk, verify_tokens)

    @torch.no_grad()
    def history_kv(self, batch: HSTUBatch) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the K and V ``[sum(history_lengths), H, D]`` of every history token.

        Computed by the dense no-cache path; this is what a cache would hold.
        """
        batch = batch.to(self.device)
        batch.validate(self.cfg)
        return self._forward_dense(batch, record_history_kv=True)[1]

    def _forward_dense(self, batch: HSTUBatch, record_history_kv: bool = False
                       ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        cfg, dev = self.cfg, self.device
        B = batch.batch_size
        hl = batch.history_lengths
        nc = batch.num_candidates
        hist_how, hist_gap, cand_how, cand_gap = time_features(batch)
        h_off = batch.history_offsets()
        hist_pos = torch.arange(hist_how.numel(), device=dev) - torch.repeat_interleave(h_off[:-1], hl)
        x_hist = self.embed(batch.history_item_ids, batch.history_action_ids, hist_pos, hist_how, hist_gap)
        no_action = torch.full_like(batch.candidate_item_ids, cfg.no_action_index)
        x_cand = self.embed(batch.candidate_item_ids, no_action, self.candidate_positions(hl, nc),
                            cand_how, cand_gap)
        # Interleave into per-user sequences [history ; candidates].
        seq_len = hl + nc
        user_of_hist = torch.repeat_interleave(torch.arange(B, device=dev), hl)
        user_of_cand = torch.repeat_interleave(torch.arange(B, device=dev), nc)
        s_off = lengths_to_offsets(seq_len)
        hist_rows = s_off[:-1][user_of_hist] + hist_pos
        c_off = batch.candidate_offsets()
        cand_rows = (s_off[:-1] + hl)[user_of_cand] + (
            torch.arange(x_cand.shape[0], device=dev) - c_off[:-1][user_of_cand])
        x = torch.empty(int(s_off[-1]), cfg.d_model, dtype=x_hist.dtype, device=dev)
        x[hist_rows] = x_hist
        x[cand_rows] = x_cand
        offsets, hist_lengths = s_off.tolist(), hl.tolist()
        recorded: list[tuple[Tensor, Tensor]] = []
        for layer in self.layers:
            q, k, v, u = layer.qkvu(x)
            if record_history_kv:
                recorded.append((k[hist_rows], v[hist_rows]))
            x = layer.finish(layer.attend_dense(q, k, v, offsets, hist_lengths), u, x)
        return self.score(x[cand_rows]), recorded

    def _forward_incremental(self, batch: HSTUBatch, cache: KVCacheLike | None,
                             candidate_chunk: int | None, verify_tokens: bool) -> Tensor:
        cfg, dev = self.cfg, self.device
        B = batch.batch_size
        hl_host = batch.history_lengths.cpu().numpy().astype(np.int64)

        # 1. Which history tokens are new (lookup), and room for them (allocate).
        if cache is not None:
            uid_host = batch.user_ids.cpu().numpy().astype(np.int64)
            if len(set(uid_host.tolist())) != B:
                raise ValueError("with a cache, each user may appear at most once per batch")
            keys = token_keys(batch) if verify_tokens else None
            lk = cache.lookup(uid_host, hl_host, token_keys=keys)
            cached = np.asarray(lk.cached_lengths, dtype=np.int64).reshape(-1)
            if cached.shape != (B,) or (cached < 0).any() or (cached > hl_host).any():
                raise RuntimeError(f"cache.lookup returned cached_lengths {cached.tolist()} for "
                                   f"history_lengths {hl_host.tolist()}")
            cache_dtype, cache_device = _cache_spec(cache, cfg.dtype, dev)
            meta = cache.allocate(lk)
            try:
                return self._run_passes(batch, cache, meta, cached, candidate_chunk,
                                        cache_dtype, cache_device)
            finally:
                # Unpin the users; a batch that failed midway is rolled back by the cache.
                release = getattr(meta, "release", None)
                if callable(release):
                    release()
        return self._run_passes(batch, None, None, np.zeros(B, dtype=np.int64), candidate_chunk,
                                cfg.dtype, dev)

    def _run_passes(self, batch: HSTUBatch, cache: KVCacheLike | None, meta: Any,
                    cached: np.ndarray, candidate_chunk: int | None,
                    cache_dtype: torch.dtype, cache_device: torch.device) -> Tensor:
        """History pass (+ first candidate micro-batch), then the other micro-batches."""
        cfg, dev = self.cfg, self.device
        B = batch.batch_size
        hl = batch.history_lengths
        hl_host = hl.cpu().numpy().astype(np.int64)
        nc_host = batch.num_candidates.cpu().tolist()
        new_len = hl_host - cached
        if meta is not None and int(meta.new_history_nnz) != int(new_len.sum()):
            raise RuntimeError(f"cache.allocate reserved {int(meta.new_history_nnz)} new tokens, "
                               f"expected {int(new_len.sum())}")

        # 2. Strip cached tokens from the jagged features, embed only new ones.
        hist_how, hist_gap, cand_how, cand_gap = time_features(batch)
        strip = _resolve_strip() if cache is not None else strip_cached_tokens_reference
        cached_t = torch.as_tensor(cached, device=dev)
        new_items, new_len_t, _ = strip(batch.history_item_ids, hl, cached_t)
        new_actions = strip(batch.history_action_ids, hl, cached_t)[0]
        new_how = strip(hist_how, hl, cached_t)[0]
        new_gap = strip(hist_gap, hl, cached_t)[0]
        new_len_t = new_len_t.to(device=dev, dtype=torch.int64)
        new_off = lengths_to_offsets(new_len_t)
        user_of_new = torch.repeat_interleave(torch.arange(B, device=dev), new_len_t)
        new_pos = cached_t[user_of_new] + torch.arange(int(new_off[-1]), device=dev) - new_off[:-1][user_of_new]
        x_new = self.embed(new_items.to(dev), new_actions.to(dev), new_pos, new_how.to(dev), new_gap.to(dev))
        no_action = torch.full_like(batch.candidate_item_ids, cfg.no_action_index)
        x_cand_all = self.embed(batch.candidate_item_ids, no_action,
                                self.candidate_positions(hl, batch.num_candidates), cand_how, cand_gap)

        # 3. M-FALCON: candidate micro-batches; the first rides with the history pass.
        max_c = max(nc_host, default=0)
        chunk = max(max_c, 1) if candidate_chunk is None else candidate_chunk
        num_chunks = max(1, -(-max_c // chunk))
        c_off = batch.candidate_offsets().tolist()
        hist_off = [0] + np.cumsum(hl_host).tolist()
        new_off_host = [0] + np.cumsum(new_len).tolist()
        scores = torch.empty(c_off[-1], dtype=cfg.dtype, device=dev)
        history_kv: list[tuple[Tensor, Tensor]] = []  # kept for micro-batches after the first

        for ci in range(num_chunks):
            with_history = ci == 0
            rows: list[Tensor] = []
            cand_idx: list[int] = []
            row_off, n_new_rows = [0], []
            for b in range(B):
                c0 = c_off[b] + min(ci * chunk, nc_host[b])
                c1 = c_off[b] + min((ci + 1) * chunk, nc_host[b])
                n_new = int(new_len[b]) if with_history else 0
                if n_new:
                    rows.append(x_new[new_off_host[b]:new_off_host[b] + n_new])
                rows.append(x_cand_all[c0:c1])
                cand_idx.extend(range(c0, c1))
                n_new_rows.append(n_new)
                row_off.append(row_off[-1] + n_new + (c1 - c0))
            layout = RowLayout(row_offsets=row_off, num_new_history=n_new_rows,
                               history_start=cached.tolist(), history_offsets=hist_off)
            x = torch.cat(rows) if rows else x_new[:0]
            is_hist_row = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
            for b in range(B):
                is_hist_row[row_off[b]:row_off[b] + n_new_rows[b]] = True
            for li, layer in enumerate(self.layers):
                q, k, v, u = layer.qkvu(x)
                if with_history:
                    if cache is not None:
                        # Append only the new history rows (candidates are never cached;
                        # a compact copy keeps this independent of how a cache could skip
                        # interleaved rows), then read every history token's K/V back from
                        # the pages: the attention below uses exactly what the cache holds.
                        if new_off_host[-1]:  # with nothing new, a batch has nothing to append
                            cache.append(li, k[is_hist_row].to(device=cache_device, dtype=cache_dtype),
                                         v[is_hist_row].to(device=cache_device, dtype=cache_dtype), meta)
                        k_hist, v_hist = cache.gather(li, meta)
                        if k_hist.shape[0] != hist_off[-1] or v_hist.shape[0] != hist_off[-1]:
                            raise RuntimeError(f"cache.gather returned {k_hist.shape[0]} history rows, "
                                               f"expected sum(history_lengths) = {hist_off[-1]}")
                        k_hist = k_hist.to(device=dev, dtype=cfg.dtype)
                        v_hist = v_hist.to(device=dev, dtype=cfg.dtype)
                    else:
                        # No cache: every history token is new, the rows are all of them.
                        k_hist, v_hist = k[is_hist_row], v[is_hist_row]
                    if num_chunks > 1:
                        history_kv.append((k_hist, v_hist))
                else:
                    k_hist, v_hist = history_kv[li]
                x = layer.finish(layer.attend(q, k, v, k_hist, v_hist, layout), u, x)
            if cand_idx:
                scores[torch.tensor(cand_idx, dtype=torch.int64, device=dev)] = self.score(x[~is_hist_row])
        return scores

    # ---- batched path ------------------------------------------------------ #

    def _forward_batched(self, batch: HSTUBatch, uid: np.ndarray, hl: np.ndarray, nc: np.ndarray,
                         cache: KVCacheLike | None, candidate_chunk: int | None,
                         verify_tokens: bool) -> Tensor:
        cfg, dev = self.cfg, self.device
        B = hl.shape[0]
        max_c = int(nc.max(initial=0))
        chunk = max(max_c, 1) if candidate_chunk is None else candidate_chunk
        if cache is None:
            return self._batched_passes(batch, hl, nc, np.zeros(B, dtype=np.int64), chunk,
                                        None, None, cfg.dtype, dev)
        if np.unique(uid).size != B:
            raise ValueError("with a cache, each user may appear at most once per batch")
        keys = token_keys_host(batch) if verify_tokens else None
        lk = cache.lookup(uid, hl, token_keys=keys)
        cached = np.asarray(lk.cached_lengths, dtype=np.int64).reshape(-1)
        if cached.shape != (B,) or (cached < 0).any() or (cached > hl).any():
            raise RuntimeError(f"cache.lookup returned cached_lengths {cached.tolist()} for "
                               f"history_lengths {hl.tolist()}")
        cache_dtype, cache_device = _cache_spec(cache, cfg.dtype, dev)
        # The first candidate micro-batch rides with the history pass: its rows are
        # [new history ; candidates] per user, which append() takes as they are.
        meta = cache.allocate(lk, num_candidates=np.minimum(nc, chunk))
        try:
            return self._batched_passes(batch, hl, nc, cached, chunk, cache, meta,
                                        cache_dtype, cache_device)
        finally:
            release = getattr(meta, "release", None)
            if callable(release):
                release()

    def _batched_passes(self, batch: HSTUBatch, hl: np.ndarray, nc: np.ndarray, cached: np.ndarray,
                        chunk: int, cache: KVCacheLike | None, meta: Any,
                        cache_dtype: torch.dtype, cache_device: torch.device) -> Tensor:
        """Embed each pass's rows, run every layer on all users at once.

        Host side, once: every index of the forward (which history tokens are
        new, where each row's features and slots are, each row's last visible
        history index) from the host lengths, uploaded in one copy. Device side:
        per pass one embedding of its rows; per layer qkvu on all rows, append,
        gather, pad, batched attention, finish; nothing reads a device value back.
        """
        cfg, dev = self.cfg, self.device
        B = hl.shape[0]
        new_len = hl - cached
        n_new_total = int(new_len.sum())
        if meta is not None and int(meta.new_history_nnz) != n_new_total:
            raise RuntimeError(f"cache.allocate reserved {int(meta.new_history_nnz)} new tokens, "
                               f"expected {n_new_total}")
        h_off, c_off = _offsets_np(hl), _offsets_np(nc)
        total_h, total_c = int(h_off[-1]), int(c_off[-1])
        has = hl > 0
        last = np.maximum(h_off[1:] - 1, 0)  # each user's last history token
        with_request = batch.request_timestamps is not None
        up = _Uploader()

        # -- host: pass layouts and the features of every row ----------------------
        # Features are read from cat([history, candidates]) tensors; timestamps from
        # cat([history timestamps, per-user request time (0 when not given)]).
        num_chunks = max(1, -(-int(nc.max(initial=0)) // chunk))
        passes = []
        for ci in range(num_chunks):
            c_lo = np.minimum(ci * chunk, nc)
            n_cand = np.minimum((ci + 1) * chunk, nc) - c_lo
            n_new = new_len if ci == 0 else np.zeros(B, dtype=np.int64)
            plan = plan_batched_pass(hl, cached, n_new, n_cand)
            if plan["num_rows"] == 0:
                continue
            user, r = plan["user_of_row"], plan["row_in_user"]
            is_cand = plan["is_candidate"].astype(bool)
            pos_hist = cached[user] + r                      # new history rows: absolute position
            tok = h_off[:-1][user] + pos_hist                # ... and index in the batch's history
            cand = c_off[:-1][user] + c_lo[user] + r - n_new[user]  # candidate rows: global index
            cand_t = (total_h + user) if with_request else np.where(has[user], last[user], total_h + user)
            feats = np.stack([
                np.where(is_cand, total_h + cand, tok),                              # item
                np.where(is_cand, total_h, tok),                                     # action
                np.where(is_cand, np.minimum(hl, cfg.max_seq_len - 1)[user], pos_hist),  # position
                np.where(is_cand, cand_t, tok),                                      # time
                np.where(is_cand, last[user], np.maximum(tok - 1, 0)),               # previous time
                np.where(is_cand, ~has[user], pos_hist == 0),                        # no previous event
            ])
            cand_rows = np.flatnonzero(is_cand)
            entry = {"plan": plan, "feats": up.add(feats), "unpad": up.add(plan["unpad"]),
                     "is_cand": up.add(plan["is_candidate"]), "cand_rows": up.add(cand_rows),
                     "cand_out": up.add(cand[cand_rows]),
                     "limit": up.add(plan["limit"]) if plan["causal_diagonal"] is None else None,
                     "row_pad": None if plan["row_pad"] is None else up.add(plan["row_pad"])}
            if ci == 0:
                # History K/V slots: user b's token j at [b, j]. From the cache's
                # jagged gather (cached + new tokens) or, without a cache, straight
                # from this pass's rows (every history token is a row).
                L = plan["max_history"]
                j = np.arange(L, dtype=np.int64)[None, :]
                base = h_off[:-1] if cache is not None else plan["row_offsets"][:-1]
                idx = np.where(j < hl[:, None], base[:, None] + j, 0).reshape(-1)
                n_src = total_h if cache is not None else plan["num_rows"]
                identity = idx.size == n_src and np.array_equal(idx, np.arange(n_src))
                entry["hist_pad"] = None if identity else up.add(idx)
            passes.append(entry)
        scores = torch.empty(total_c, dtype=cfg.dtype, device=dev)
        if not passes:
            return scores
        up.upload(dev)

        # -- device: per-forward feature tables ------------------------------------------
        items = torch.cat([batch.history_item_ids, batch.candidate_item_ids])
        actions = torch.cat([batch.history_action_ids,
                             torch.full((1,), cfg.no_action_index, dtype=torch.int64, device=dev)])
        request = batch.request_timestamps if with_request else torch.zeros(B, dtype=torch.int64, device=dev)
        times = torch.cat([batch.history_timestamps, request])

        kept: list[tuple[Tensor, Tensor]] = []  # padded history K/V, for micro-batches after the first
        for ci, entry in enumerate(passes):
            plan = entry["plan"]
            rows, R, L = plan["num_rows"], plan["max_rows"], plan["max_history"]
            hidden = None
            if entry["limit"] is not None and plan["mask_rows"]:
                cols = torch.arange(plan["mask_col0"], L, device=dev)
                hidden = cols[None, None, :] > up.get(entry["limit"])[:, :, None]
            layout = BatchedLayout(
                batch_size=B, num_rows=rows, max_rows=R, max_history=L,
                row_pad=None if entry["row_pad"] is None else up.get(entry["row_pad"]),
                unpad=up.get(entry["unpad"]),
                is_candidate=up.get(entry["is_cand"]).to(cfg.dtype).view(rows, 1, 1),
                mask_rows=plan["mask_rows"], mask_col0=plan["mask_col0"],
                causal_diagonal=plan["causal_diagonal"], hidden=hidden,
                blocks=score_blocks(cfg.num_heads, B, R * L, self.max_score_elements))
            x = self._embed_rows(items, actions, times, up.get(entry["feats"]))
            for li, layer in enumerate(self.layers):
                q, k, v, u = layer.qkvu(x)
                if ci == 0:
                    if cache is not None:
                        # Append the new history rows straight from the [new ; candidates]
                        # layout (the cache skips the candidates), then read every history
                        # token back: attention uses exactly what the cache holds.
                        if n_new_total:
                            cache.append(li, _as(k, cache_dtype, cache_device), _as(v, cache_dtype, cache_device),
                                         meta)
                        k_src, v_src = cache.gather(li, meta)
                        if k_src.shape[0] != total_h or v_src.shape[0] != total_h:
                            raise RuntimeError(f"cache.gather returned {k_src.shape[0]} history rows, "
                                               f"expected sum(history_lengths) = {total_h}")
                        k_src, v_src = _as(k_src, cfg.dtype, dev), _as(v_src, cfg.dtype, dev)
                    else:
                        k_src, v_src = k, v
                    pad = entry["hist_pad"]
                    k_hist, v_hist = (self._pad_history(t, None if pad is None else up.get(pad), B, L)
                                      for t in (k_src, v_src))
                    if len(passes) > 1:
                        kept.append((k_hist, v_hist))
                else:
                    k_hist, v_hist = kept[li]
                x = layer.finish(layer.attend_batched(q, k, v, k_hist, v_hist, layout), u, x)
            cand_rows = up.get(entry["cand_rows"])
            if cand_rows.numel():
                scores.index_copy_(0, up.get(entry["cand_out"]), self.score(x.index_select(0, cand_rows)))
        return scores

    def _embed_rows(self, items: Tensor, actions: Tensor, times: Tensor, feats: Tensor) -> Tensor:
        """Embeddings of a pass's rows from their feature indices (``feats [6, rows]``).

        ``feats`` rows: item index into ``items``, action index into ``actions``,
        position, time index and previous-time index into ``times``, and a flag for
        "no previous event" (gap bucket 0). This is :func:`time_features` for
        just these rows: the hour of week of the row's time, the bucketed gap to
        the previous event (the user's previous token; for a candidate the last
        history token, with the request time as its time).
        """
        t = times.index_select(0, feats[3])
        how = torch.div(t, 3600, rounding_mode="floor") % NUM_HOUR_OF_WEEK
        gap = _gap_bucket(t - times.index_select(0, feats[4])).masked_fill_(feats[5] != 0, 0)
        return self.embed(items.index_select(0, feats[0]), actions.index_select(0, feats[1]), feats[2], how, gap)

    def _pad_history(self, src: Tensor, index: Tensor | None, B: int, L: int) -> Tensor:
        """History K or V ``[tokens, H, D]`` -> head-major padded slots ``[H*B, L, D]`` (one copy).

        ``index`` [B*L] is the source token of each slot; None when the tokens
        already are the slots (every user ``L`` long, users one after another).
        """
        H, D = self.cfg.num_heads, self.cfg.head_dim
        t = src.transpose(0, 1)  # [H, tokens, D], a view
        if index is None:
            return t.reshape(H * B, L, D)
        return t.index_select(1, index).view(H * B, L, D)


def _as(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` in ``dtype`` on ``device``; ``t`` itself (no dispatch) when it already is."""
    return t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- #
# Synthetic data for tests and demos
# --------------------------------------------------------------------------- #


def _random_history(cfg: HSTUConfig, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    items = torch.randint(0, cfg.num_items, (n,), generator=g, dtype=torch.int64)
    actions = torch.randint(0, cfg.num_actions, (n,), generator=g, dtype=torch.int64)
    start = torch.randint(1_600_000_000, 1_700_000_000, (1,), generator=g, dtype=torch.int64)
    # Log-uniform gaps from 1 s to ~2 weeks, so every gap bucket and hour of week shows up.
    gaps = torch.floor(2.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 20.0)).to(torch.int64)
    gaps[:1] = 0
    return items, actions, start + torch.cumsum(gaps, 0)


def make_synthetic_batch(cfg: HSTUConfig, user_ids: Sequence[int], history_lengths: Sequence[int],
                         num_candidates: Sequence[int], generator: torch.Generator) -> HSTUBatch:
    """A random batch on the CPU (items, actions, increasing timestamps, candidates)."""
    if not (len(user_ids) == len(history_lengths) == len(num_candidates)):
        raise ValueError(f"user_ids, history_lengths and num_candidates differ in length: "
                         f"{len(user_ids)}, {len(history_lengths)}, {len(num_candidates)}")
    parts = [_random_history(cfg, int(n), generator) for n in history_lengths]
    cands = torch.randint(0, cfg.num_items, (int(sum(num_candidates)),), generator=generator, dtype=torch.int64)
    return HSTUBatch(
        user_ids=torch.tensor(list(user_ids), dtype=torch.int64),
        history_item_ids=torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64),
        history_action_ids=torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64),
        history_timestamps=torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64),
        history_lengths=torch.tensor(list(history_lengths), dtype=torch.int64),
        candidate_item_ids=cands,
        num_candidates=torch.tensor(list(num_candidates), dtype=torch.int64),
    )


@dataclass
class SyntheticUsers:
    """A deterministic stream of requests whose histories grow between requests.

    Each user has a fixed random event sequence of ``max_history`` events
    (seeded by ``seed`` and the user id alone, so it does not depend on which
    other users are requested). A request returns, per user, the history up to
    its current length plus ``new_events`` more (the user's length advances),
    and fresh random candidates.
    """

    cfg: HSTUConfig
    user_ids: Sequence[int]
    initial_length: int | Sequence[int] = 16
    max_history: int | None = None
    seed: int = 0
    lengths: dict[int, int] = field(init=False)
    _events: dict[int, tuple[Tensor, Tensor, Tensor]] = field(init=False, repr=False)
    _cand_gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cap = self.cfg.max_seq_len if self.max_history is None else self.max_history
        if not 0 < cap <= self.cfg.max_seq_len:
            raise ValueError(f"max_history must be in [1, max_seq_len={self.cfg.max_seq_len}], got {cap}")
        self.max_history = cap
        init = ([self.initial_length] * len(self.user_ids) if isinstance(self.initial_length, int)
                else list(self.initial_length))
        if len(init) != len(self.user_ids) or any(not 0 <= n <= cap for n in init):
            raise ValueError(f"initial_length must be one int or one per user, each in [0, {cap}]")
        self._events, self.lengths = {}, {}
        for uid, n in zip(self.user_ids, init):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(uid)) & (2**63 - 1))
            self._events[int(uid)] = _random_history(self.cfg, cap, g)
            self.lengths[int(uid)] = n
        self._cand_gen = torch.Generator().manual_seed(self.seed ^ 0x5EED)

    def request(self, user_ids: Sequence[int] | None = None, new_events: int | Sequence[int] = 0,
                num_candidates: int | Sequence[int] = 8) -> HSTUBatch:
        """Advance each requested user's history by ``new_events`` and return its batch."""
        uids = [int(u) for u in (self.user_ids if user_ids is None else user_ids)]
        grow = [new_events] * len(uids) if isinstance(new_events, int) else list(new_events)
        ncand = [num_candidates] * len(uids) if isinstance(num_candidates, int) else list(num_candidates)
        if len(grow) != len(uids) or len(ncand) != len(uids):
            raise ValueError("new_events and num_candidates must be one int or one per requested user")
        for u, k in zip(uids, grow):
            if u not in self.lengths:
                raise ValueError(f"unknown user {u}")
            if k < 0 or self.lengths[u] + k > self.max_history:  # type: ignore[operator]
                raise ValueError(f"user {u}: {self.lengths[u]} + {k} events is outside [0, {self.max_history}]")
        for u, k in zip(uids, grow):
            self.lengths[u] += k
        hist = [tuple(t[: self.lengths[u]] for t in self._events[u]) for u in uids]
        cands = torch.randint(0, self.cfg.num_items, (sum(ncand),), generator=self._cand_gen, dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        return HSTUBatch(
            user_ids=torch.tensor(uids, dtype=torch.int64),
            history_item_ids=torch.cat([h[0] for h in hist]) if hist else empty,
            history_action_ids=torch.cat([h[1] for h in hist]) if hist else empty,
            history_timestamps=torch.cat([h[2] for h in hist]) if hist else empty,
            history_lengths=torch.tensor([self.lengths[u] for u in uids], dtype=torch.int64),
            candidate_item_ids=cands,
            num_candidates=torch.tensor(ncand, dtype=torch.int64),
        )


_M64 = np.uint64


def _splitmix64_(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on ``x`` (``tmp`` is scratch of the same shape).

    uint64 array arithmetic wraps modulo 2**64 (well defined, unlike signed int64).
    In place because this runs on every history token of every cached request.
    """
    x += _M64(0x9E3779B97F4A7C15)
    np.right_shift(x, _M64(30), out=tmp)
    x ^= tmp
    x *= _M64(0xBF58476D1CE4E5B9)
    np.right_shift(x, _M64(27), out=tmp)
    x ^= tmp
    x *= _M64(0x94D049BB133111EB)
    np.right_shift(x, _M64(31), out=tmp)
    x ^= tmp
    return x


def token_keys_host(batch: HSTUBatch) -> np.ndarray:
    """:func:`token_keys` as a host int64 NumPy array (what ``cache.lookup`` reads).

    The three features come to the host in one copy (one synchronisation for a
    GPU batch).
    """
    n = batch.history_item_ids.numel()
    feats = torch.stack([batch.history_item_ids, batch.history_action_ids.to(batch.history_item_ids.device),
                         batch.history_timestamps.to(batch.history_item_ids.device)]).cpu().numpy()
    u = feats.view(np.uint64)
    x = u[0].copy()
    tmp = np.empty(n, dtype=np.uint64)
    _splitmix64_(x, tmp)
    x ^= u[1]
    _splitmix64_(x, tmp)
    x ^= u[2]
    _splitmix64_(x, tmp)
    return x.view(np.int64)


def token_keys(batch: HSTUBatch) -> Tensor:
    """One int64 key per history token folding its item id, action and timestamp.

    For the cache's verified mode: two tokens get the same key only if all three
    features match (up to 64-bit hash collisions). Returns ``[sum(history_lengths)]``
    int64 on the batch's device (computed on the host with numpy's wrapping uint64:
    ``splitmix64(splitmix64(splitmix64(item) ^ action) ^ timestamp)``).
    """
    return torch.from_numpy(token_keys_host(batch)).to(batch.history_item_ids.device)
