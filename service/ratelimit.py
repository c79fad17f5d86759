"""Failed-authentication limiter: a client address with too many bad keys in a sliding window gets 429
(with Retry-After) before its key is even looked at. In-process; each replica limits on its own."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque


class FailedAuthLimiter:
    def __init__(self, max_failures: int, window_s: float, max_clients: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._max_clients = max_clients
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            times = deque()
            self._failures[client] = times
            while len(self._failures) > self._max_clients:  # bounded memory under address spraying
                self._failures.popitem(last=False)
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds to wait if the client is blocked now, else None."""
        if self.max_failures <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return None
            return max(1, int(self.window_s - (now - times[0])) + 1)

    def record_failure(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
            self._failures.move_to_end(client)
