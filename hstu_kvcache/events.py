"""Cache events: what :meth:`KVCache.drain_events` returns.

With ``KVCacheConfig(event_capacity=N)`` the C core keeps the last ``N``
records of pages changing tier in a ring buffer (csrc/events.h).  A record
covers a run of consecutive pages of one user; ``page_index`` counts pages
from the start of that user's history (page ``i`` holds tokens
``i * page_size`` to ``(i + 1) * page_size - 1``).

Kinds (:class:`EventKind`, a ``str`` enum, so ``event.kind == "stored"`` works):

- ``stored``: new K/V were committed into the pages on ``tier`` (``'gpu'``)
  when a batch's last layer was appended.  A partial tail page that gains
  tokens is stored again.
- ``removed``: the pages left ``tier`` (eviction, ``evict``, a rewritten
  history).  A consumer may see ``removed`` for pages it never saw added;
  it ignores them.
- ``onboarded``: the pages were copied from ``from_tier`` to ``tier``:
  ``'host'`` to ``'gpu'``, ``'disk'`` to ``'host'`` (a disk-tier read,
  staged), or ``'disk'`` to ``'gpu'`` (GPUDirect Storage).  The source copy
  stays.
- ``offloaded``: the pages were copied from ``from_tier`` (``'gpu'``) to
  ``tier`` (``'host'``); the GPU copy stays until a ``removed`` event.

So ``stored``, ``onboarded`` and ``offloaded`` add pages to ``tier`` and
``removed`` takes them off it.  The tier ``'gpu'`` is the cache's device tier
(host memory on ``device='cpu'``).

Overflow keeps the newest records: when the ring is full the oldest record is
overwritten and counted in ``stats()['events_dropped']``; emission never
blocks the cache.  ``seq`` numbers every record ever made, so a gap between
two drained records tells a consumer that it missed some.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from . import _C

__all__ = ["CacheEvent", "EventKind", "TIER_NAMES"]


class EventKind(str, Enum):
    """Kind of a :class:`CacheEvent` (compares equal to its string value)."""

    STORED = "stored"
    REMOVED = "removed"
    ONBOARDED = "onboarded"
    OFFLOADED = "offloaded"

    def __str__(self) -> str:
        return self.value


_KINDS = {
    _C.EVENT_STORED: EventKind.STORED,
    _C.EVENT_REMOVED: EventKind.REMOVED,
    _C.EVENT_ONBOARDED: EventKind.ONBOARDED,
    _C.EVENT_OFFLOADED: EventKind.OFFLOADED,
}

#: core tier code -> name
TIER_NAMES = {_C.TIER_GPU: "gpu", _C.TIER_HOST: "host", _C.TIER_DISK: "disk"}


class CacheEvent(NamedTuple):
    """A run of ``num_pages`` pages of user ``user_id``, starting at history
    page ``page_index``, changed on ``tier``.

    Attributes:
        seq: sequence number of the record (0, 1, ... over the cache's life).
        kind: what happened (:class:`EventKind`).
        tier: ``'gpu'`` or ``'host'``: the tier the pages are now on (or left).
        from_tier: the source tier of a copy (``onboarded``/``offloaded``;
            ``'disk'`` for a read from the disk tier);
            equal to ``tier`` for ``stored`` and ``removed``.
        user_id: the user.
        page_index: first page of the run, counted in the user's history.
        num_pages: pages in the run (at least 1).
        timestamp_ns: ``CLOCK_MONOTONIC`` nanoseconds (``time.monotonic_ns()``
            on Linux) when the record was made.
    """

    seq: int
    kind: EventKind
    tier: str
    from_tier: str
    user_id: int
    page_index: int
    num_pages: int
    timestamp_ns: int

    @property
    def pages(self) -> range:
        """The page indices of the run."""
        return range(self.page_index, self.page_index + self.num_pages)

    @classmethod
    def _from_core(cls, rec: tuple) -> "CacheEvent":
        seq, kind, tier, from_tier, uid, page, n, ts = rec
        return cls(seq, _KINDS[kind], TIER_NAMES.get(tier, str(tier)),
                   TIER_NAMES.get(from_tier, str(from_tier)), uid, page, n, ts)
