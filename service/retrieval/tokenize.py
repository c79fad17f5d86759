"""Pure text -> BM25 terms. Lower-cased word tokens, a tiny stop list; no I/O, no state."""

from __future__ import annotations

import re
from itertools import filterfalse

_WORD = re.compile(r"[\w']+", re.UNICODE)
_STOP = frozenset(
    "a an and are as at be but by for from has have i in is it its of on or so that the this to was "
    "were what when where which who will with you your my me".split()
)


def terms(text: str) -> list[str]:
    return list(filterfalse(_STOP.__contains__, _WORD.findall(text.lower())))  # C-level filter: cold builds
