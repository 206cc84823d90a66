"""What a source may do: source lists, and its rate of new connections.

Pure: no reactor. :func:`source_refusal` applies CIDR lists (compiled once,
:class:`~threshold.schema.policy_kinds.CidrList`) to a parsed address;
:class:`SourceRateLimiter` holds token buckets of new connections per key
(a tunnel and a source), bounded in number.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from threshold.schema.policy_kinds import CidrList
from threshold.server.stats import Refusal

__all__ = ["SourceRateLimiter", "source_refusal"]


def source_refusal(
    address: tuple[int, int] | None,
    denies: Iterable[CidrList],
    allows: Iterable[CidrList],
) -> Refusal | None:
    """Why the source lists refuse ``address`` (a parsed IP), or None.

    Deny wins; every non-empty allow list must hold the source. A peer
    without an IP address is allowed only where no allow list is set.
    """
    if address is not None:
        for cidrs in denies:
            if cidrs and cidrs.matches(address):
                return Refusal.DENIED_SOURCE
    for cidrs in allows:
        if cidrs and (address is None or not cidrs.matches(address)):
            return Refusal.NOT_ALLOWED_SOURCE
    return None


class SourceRateLimiter:
    """Token buckets of new connections, one per key, at most ``max_buckets``.

    A bucket full again is the same as none, so it is dropped (the oldest
    first, checked as new keys come); past the bound the least recently
    used is dropped even if not full, which can only let its source
    through sooner. Memory stays bounded under a flood of new addresses.
    """

    def __init__(self, max_buckets: int) -> None:
        self.max_buckets = max_buckets
        # key -> [tokens, stamp, time it is full again]
        self._buckets: OrderedDict[object, list[float]] = OrderedDict()
        #: Buckets dropped before they were full (the bound was reached).
        self.evicted = 0

    def allow(self, key: object, rate: float, burst: int, now: float) -> bool:
        """Take one token from ``key``'s bucket; False when it has none."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._expire(now)
            tokens = burst - 1.0
            buckets[key] = [tokens, now, now + (burst - tokens) / rate]
            if len(buckets) > self.max_buckets:
                buckets.popitem(last=False)
                self.evicted += 1
            return True
        tokens = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        bucket[0], bucket[1] = tokens, now
        bucket[2] = now + (burst - tokens) / rate
        buckets.move_to_end(key)
        return allowed

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        # Each bucket is dropped once, so this is O(1) per call on average.
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if bucket[2] > now:
                return
            del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
