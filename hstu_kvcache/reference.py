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

Attention is computed per user with dense blocks (``[H, T, T]`` for the
plain path, ``[H, new rows, history]`` for the incremental one) in a Python
loop over users: clear, exact masks, and no padded ``[B, H, T, T]`` tensor;
B=16 users x (4096 history + 256 candidates), 8 layers, 4 heads x 256, bf16
took about 0.13 s on one H100.

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
        hl, nc = self.history_lengths, self.num_candidates
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
                f"user {int(self.user_ids[b])} has {int(hl[b])} history tokens: positions "
                f"0..{int(hl[b]) - 1} go beyond max_seq_len={cfg.max_seq_len} (positions must be "
                "< max_seq_len); truncate the history or raise max_seq_len")
        for name, values, hi in (("history_item_ids", self.history_item_ids, cfg.num_items),
                                 ("candidate_item_ids", self.candidate_item_ids, cfg.num_items),
                                 ("history_action_ids", self.history_action_ids, cfg.num_actions)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= hi):
                raise ValueError(f"HSTUBatch.{name} must be in [0, {hi}), got range "
                                 f"[{int(values.min())}, {int(values.max())}]")
        ts = self.history_timestamps
        if ts.numel():
            if int(ts.min()) < 0:
                raise ValueError("history_timestamps must be >= 0 (seconds since the epoch)")
            # Non-decreasing within each user (a decrease across a user boundary is fine).
            first = torch.zeros_like(ts, dtype=torch.bool)
            starts = self.history_offsets()[:-1][hl > 0]
            first[starts] = True
            dec = (ts[1:] < ts[:-1]) & ~first[1:]
            if bool(dec.any()):
                raise ValueError("history_timestamps must be non-decreasing within each user")
        if self.request_timestamps is not None and B:
            last = self.history_offsets()[1:] - 1
            has = hl > 0
            if bool(has.any()) and bool((self.request_timestamps[has] < ts[last[has]]).any()):
                raise ValueError("request_timestamps must be >= each user's last history timestamp")


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
    - ``allocate(lookup)`` reserves room for the new tokens and returns the batch
      metadata; the model reads ``new_history_nnz`` from it and passes it back.
    - ``append(layer, k, v, batch)`` writes the new history tokens' K/V
      (``[new_history_nnz, H, D]``, users one after another, cache dtype/device).
    - ``gather(layer, batch)`` returns every history token's K and V (cached and
      just appended), ``[sum(history_lengths), H, D]`` each, users one after another.
    - ``batch.release()``, if present, is called when the forward ends (unpins
      the batch's users; rolls back a batch that did not append every layer).

    The cache's ``dtype`` / ``device`` are read from ``cache.config`` (or the
    cache itself); torch dtypes and dtype names (``"bfloat16"``) both work.
    """

    def lookup(self, user_ids: Any, history_lengths: Any, token_keys: Any = None) -> Any: ...
    def allocate(self, lookup: Any) -> Any: ...
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
                candidate_chunk: int | None = None, *, verify_tokens: bool = False) -> Tensor:
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

        Returns:
            Scores ``[sum(num_candidates)]`` in the batch's candidate order, model dtype.

        Without cache and chunking, this is the dense per-user recompute (the
        plain definition); otherwise the incremental formulation. Both agree.
        """
        if candidate_chunk is not None and (not isinstance(candidate_chunk, int)
                                            or isinstance(candidate_chunk, bool) or candidate_chunk < 1):
            raise ValueError(f"candidate_chunk must be a positive int or None, got {candidate_chunk!r}")
        if verify_tokens and cache is None:
            raise ValueError("verify_tokens=True needs a cache")
        batch = batch.to(self.device)
        batch.validate(self.cfg)
        if cache is None and candidate_chunk is None:
            return self._forward_dense(batch)[0]
        return self._forward_incremental(batch, cache, candidate_chunk, verify_tokens)

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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64 (well defined, unlike signed int64).
    x = x + _M64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _M64(30))) * _M64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _M64(27))) * _M64(0x94D049BB133111EB)
    return x ^ (x >> _M64(31))


def token_keys(batch: HSTUBatch) -> Tensor:
    """One int64 key per history token folding its item id, action and timestamp.

    For the cache's verified mode: two tokens get the same key only if all three
    features match (up to 64-bit hash collisions). Returns ``[sum(history_lengths)]``
    int64 on the batch's device (computed on the host with numpy's wrapping uint64).
    """
    item = batch.history_item_ids.cpu().numpy().astype(np.uint64)
    action = batch.history_action_ids.cpu().numpy().astype(np.uint64)
    ts = batch.history_timestamps.cpu().numpy().astype(np.uint64)
    key = _splitmix64(_splitmix64(_splitmix64(item) ^ action) ^ ts)
    return torch.from_numpy(key.view(np.int64).copy()).to(batch.history_item_ids.device)
