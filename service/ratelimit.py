"""Failed-authentication limiter: a client with too many bad credentials (API keys, the metrics token) in a
sliding window is blocked, and Retry-After says when the block lifts. Clients are counted by bucket: an IPv4
address, an IPv6 /64 (what one subscriber is given), an IPv4-mapped IPv6 address as its IPv4; a name that is
no address is its own bucket. Memory is bounded: max_clients buckets, max_failures timestamps each.
In-process; each replica limits on its own."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

IPV6_SUBSCRIBER_PREFIX = 64


def client_bucket(address: str) -> str:
    """The bucket whose failures `address` shares."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SUBSCRIBER_PREFIX), strict=False))
    return str(ip)


class FailedAuthLimiter:
    def __init__(
        self,
        max_failures: int,
        window_s: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, bucket: str, now: float) -> deque[float]:
        times = self._failures.get(bucket)
        if times is None:
            # Only the newest max_failures decide the block: older ones are dropped, even while blocked.
            times = deque(maxlen=self.max_failures)
            self._failures[bucket] = times
            while len(self._failures) > self._max_clients:  # bounded memory under address spraying
                self._failures.popitem(last=False)
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds to wait if the client is blocked now, else None."""
        if self.max_failures <= 0:
            return None
        now = self._clock()
        with self._lock:
            times = self._recent(client_bucket(client), now)
            if len(times) < self.max_failures:
                return None
            # times[0] is the oldest of the newest max_failures: the block lifts when it leaves the window.
            return max(1, int(self.window_s - (now - times[0])) + 1)

    def record_failure(self, client: str) -> None:
        if self.max_failures <= 0:
            return
        now = self._clock()
        bucket = client_bucket(client)
        with self._lock:
            self._recent(bucket, now).append(now)
            self._failures.move_to_end(bucket)
