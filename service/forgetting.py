"""Which keys were invalidated since a moment: a numbered log a cache keeps so that work that read its source
before an invalidation (a disk read, an index build) does not store its result after it. Owns only the
numbering (the latest `keep` keys, and the newest number forgotten); not thread-safe: callers hold their lock."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class InvalidationLog:
    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._count = 0
        self._at: OrderedDict[Hashable, int] = OrderedDict()
        self._forgotten_upto = 0  # a key forgotten from the log counts as invalidated up to this number

    def token(self) -> int:
        """Taken before the work reads its source."""
        return self._count

    def note(self, key: Hashable) -> None:
        self._count += 1
        self._at.pop(key, None)
        self._at[key] = self._count
        while len(self._at) > self._keep:
            self._forgotten_upto = self._at.popitem(last=False)[1]

    def since(self, key: Hashable, token: int) -> bool:
        """Whether `key` may have been invalidated after `token` was taken."""
        return max(self._at.get(key, 0), self._forgotten_upto) > token
