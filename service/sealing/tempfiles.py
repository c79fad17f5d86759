"""Temp files that never hold plaintext on disk: sealed under a random key that lives only in this object
(upload bodies being received, downloads and exports being sent). When the file is closed the key is gone, so
whatever the disk kept of it (a crash, a copied volume, a recovered block) stays closed. Same segmented format
as sealed files (service.sealing.cipher). Knows nothing of users or what the files hold."""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import IO, cast

from service.sealing import cipher

log = logging.getLogger(__name__)

_AD = b"oppu-temp-file"


class SealedTempFile:
    """Written sequentially first (not seekable then: zipfile writes data descriptors instead of seeking
    back), then read and seeked any number of times once `done_writing()` (or the first read) ends the
    writing. `seek(0, 2)` then gives the plaintext size."""

    def __init__(self) -> None:
        self.closed = False
        self._raw: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed with this object
        self._key = cipher.new_key()
        self._writer: cipher.SealedWriter | None = cipher.SealedWriter(self._raw, self._key, 0, _AD)
        self._reader: cipher.SealedReader | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writer is not None

    def seekable(self) -> bool:
        return self._writer is None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._writer is None:
            raise io.UnsupportedOperation("a sealed temp file is written once, before it is read")
        return self._writer.write(data)

    def _reading(self) -> cipher.SealedReader:
        if self._reader is None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                self._raw.flush()
            self._reader = cipher.SealedReader(self._raw, self._key, _AD)
        return self._reader

    def done_writing(self) -> None:
        self._reading()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self._writer is not None:
            raise io.UnsupportedOperation("a sealed temp file seeks once its writing is done")
        return self._reading().seek(offset, whence)

    def tell(self) -> int:
        if self._writer is not None:
            return self._writer.plain_size
        return self._reading().tell()

    def read(self, size: int | None = -1) -> bytes:
        return self._reading().read(size)

    def __enter__(self) -> SealedTempFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(cipher.SEGMENT):
            yield chunk

    def as_io(self) -> IO[bytes]:
        """Typed for callers that take a binary file (it is one, duck-typed)."""
        return cast(IO[bytes], self)

    def flush(self) -> None:
        pass  # segments reach the disk as they fill; the last one when reading starts

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            self._key = b""
            self.closed = True


def memory_dir() -> str | None:
    """A memory-backed folder for plaintext that a library insists on writing to files (PEFT's save): /dev/shm
    where it is writable, else None (the system temp dir)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    _warn_no_memory_dir()
    return None


@functools.cache
def _warn_no_memory_dir() -> None:
    log.warning(
        "/dev/shm is not writable: plaintext that a library writes to files (a trained LoRA's PEFT save) goes to "
        "the system temp dir, on disk, for the moment it takes (a crash can leave it there)"
    )
