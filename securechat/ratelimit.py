"""Token buckets: how many things one party may do at once, and how fast after that.

Used by the server (lines per account, frames per connection, connections per
address) and by the client (pacing its own lines below the server's limit).
No sockets, no chat: a bucket only counts.
"""

from __future__ import annotations

import ipaddress
import threading
import time


class FloodControl:
    """A token bucket: ``burst`` at once, then ``rate`` per second (``rate`` 0: no limit).

    Safe to share between threads (one account's devices each have a reader thread):
    ``_tokens_lock`` guards the count, and is held only for the arithmetic.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        # Guards _tokens and _updated.
        self._tokens_lock = threading.Lock()
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; False means the action is over the limit.

        A cost above the burst is allowed only from a full bucket (and empties it), so a
        request the size of the whole budget can still be made after a quiet spell.
        """
        if self.rate <= 0:
            return True
        with self._tokens_lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            needed = min(cost, float(self.burst))
            if self._tokens >= needed:
                self._tokens -= cost
                return True
            return False

    def delay(self, cost: float = 1.0) -> float:
        """Seconds until ``allow(cost)`` would be True (0: now); takes nothing."""
        if self.rate <= 0:
            return 0.0
        with self._tokens_lock:
            tokens = min(self.burst, self._tokens + (time.monotonic() - self._updated) * self.rate)
            return max(0.0, (min(cost, float(self.burst)) - tokens) / self.rate)

    def is_full(self) -> bool:
        """True when the bucket has refilled: its owner has been quiet, nothing to remember."""
        if self.rate <= 0:
            return True
        with self._tokens_lock:
            return self._tokens + (time.monotonic() - self._updated) * self.rate >= self.burst


#: The IPv6 prefix one host (or one home) gets: per-address limits count the whole network.
IPV6_HOST_PREFIX = 64


def address_bucket(address: str) -> str:
    """What per-address limits count a peer under: its IPv4 address, or its IPv6 /64.

    One IPv6 host may pick any address in its /64, so counting whole addresses would give
    it some 2^64 budgets. An IPv4-mapped IPv6 address counts as its IPv4 address.
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{parsed}/{IPV6_HOST_PREFIX}", strict=False))
    return str(parsed)
