"""The ciphertext formats (AES-256-GCM from the `cryptography` package; nothing home-made), on bytes only.

- **Tokens** (SQL text columns): ``s1.<key version>.<base64url(nonce 12 | ciphertext | tag 16)>``, one AEAD
  message under a random nonce.
- **Sealed files** (adapter weights and configs in the store, temp files): a segmented stream so a file can
  be read and sent in chunks, never whole, and a truncated, reordered or spliced file fails to open (the
  construction of Tink's streaming AEAD / the STREAM paper): header ``MAGIC | key version (4, BE) | nonce
  prefix (7)``, then segments of up to SEGMENT plaintext bytes, each ``ciphertext | tag``, under the nonce
  ``prefix | segment index (4, BE) | last (1)``. Every segment's associated data is the caller's binding
  (owner, purpose) plus the header, so a sealed file copied to another owner or role fails too.

Every message is bound to associated data that names its owner and purpose: moved elsewhere, it does not
open (InvalidTag, reported as SealBroken). Knows nothing of users, keys' origin, SQL or files' meaning.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import mmap
import os
import struct
from collections.abc import Callable
from typing import IO, Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
NONCE = 12
TAG = 16
TOKEN_PREFIX = "s1."
MAGIC = b"OPPUSEAL"  # 8 bytes: never the start of a safetensors file (a u64 header length) or of JSON
_PREFIX = 7
HEADER = len(MAGIC) + 4 + _PREFIX
SEGMENT = 256 * 1024  # plaintext bytes per sealed segment (one is held in memory per open file)
_SEALED_SEGMENT = SEGMENT + TAG


class SealBroken(Exception):
    """A ciphertext that does not open under this key and binding: tampered with, truncated, or moved from
    another owner's row or file."""


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


# --- tokens (SQL values) ---


def seal_token(key: bytes, version: int, plaintext: bytes, ad: bytes) -> str:
    nonce = os.urandom(NONCE)
    body = nonce + AESGCM(key).encrypt(nonce, plaintext, _token_ad(version, ad))
    return f"{TOKEN_PREFIX}{version}.{base64.urlsafe_b64encode(body).decode('ascii')}"


def token_version(token: str) -> int:
    """The data-key version a token was sealed under (SealBroken if it is no token)."""
    if not token.startswith(TOKEN_PREFIX):
        raise SealBroken("not a sealed value")
    version, dot, _ = token[len(TOKEN_PREFIX) :].partition(".")
    # ASCII digits only: str.isdigit() also accepts "\u00b2" (int() raises ValueError) and "\u0663" (int() reads 3).
    if not dot or not (version.isascii() and version.isdigit()) or len(version) > 9:
        raise SealBroken("not a sealed value")
    return int(version)


def open_token(key: bytes, token: str, ad: bytes) -> bytes:
    version = token_version(token)
    try:
        body = base64.urlsafe_b64decode(token.rsplit(".", 1)[1])
    except (binascii.Error, ValueError) as exc:
        raise SealBroken("a sealed value is damaged") from exc
    if len(body) < NONCE + TAG:
        raise SealBroken("a sealed value is damaged")
    try:
        return AESGCM(key).decrypt(body[:NONCE], body[NONCE:], _token_ad(version, ad))
    except InvalidTag as exc:
        raise SealBroken("a sealed value does not open under its owner's key (damaged or moved)") from exc


def _token_ad(version: int, ad: bytes) -> bytes:
    return b"oppu-token-v1|" + str(version).encode() + b"|" + ad


# --- sealed files (segmented) ---


def is_sealed_file(head: bytes | bytearray) -> bool:
    return head[: len(MAGIC)] == MAGIC


def file_version(header: bytes | bytearray) -> int:
    """The data-key version a sealed file was written under."""
    if len(header) < HEADER or not is_sealed_file(header):
        raise SealBroken("not a sealed file")
    return int(struct.unpack(">I", header[len(MAGIC) : len(MAGIC) + 4])[0])


def sealed_size(plain_size: int) -> int:
    segments = max(1, -(-plain_size // SEGMENT))
    return HEADER + plain_size + segments * TAG


class _Segments:
    """The nonce and associated data of each segment of one sealed file."""

    def __init__(self, key: bytes, header: bytes, ad: bytes) -> None:
        self._aead = AESGCM(key)
        self._prefix = header[len(MAGIC) + 4 : HEADER]
        self._ad = b"oppu-file-v1|" + header + b"|" + ad

    def _nonce(self, index: int, last: bool) -> bytes:
        return self._prefix + struct.pack(">IB", index, 1 if last else 0)

    def seal(self, index: int, chunk: bytes, last: bool) -> bytes:
        return self._aead.encrypt(self._nonce(index, last), chunk, self._ad)

    def open_into(self, index: int, blob: memoryview, out: memoryview, last: bool) -> None:
        if len(blob) < TAG:
            raise SealBroken("a sealed file is truncated")
        try:
            self._aead.decrypt_into(self._nonce(index, last), blob, self._ad, out)
        except InvalidTag as exc:
            raise SealBroken("a sealed file does not open under its owner's key (damaged, truncated or moved)") from exc

    def open(self, index: int, blob: bytes, last: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index, last), blob, self._ad)
        except InvalidTag as exc:
            raise SealBroken("a sealed file does not open under its owner's key (damaged, truncated or moved)") from exc


def _header(version: int) -> bytes:
    return MAGIC + struct.pack(">I", version) + os.urandom(_PREFIX)


def seal_bytes(key: bytes, version: int, data: bytes, ad: bytes) -> bytes:
    """A whole file's sealed form (same format as SealedWriter)."""
    out = io.BytesIO()
    writer = SealedWriter(out, key, version, ad)
    writer.write(data)
    writer.close()
    return out.getvalue()


def _layout(sealed_body: int) -> tuple[int, int]:
    """(segments, plaintext size) of a sealed file whose body (after the header) is `sealed_body` bytes."""
    count = max(1, -(-sealed_body // _SEALED_SEGMENT))
    size = sealed_body - count * TAG
    if sealed_body - (count - 1) * _SEALED_SEGMENT < TAG:  # the last segment is shorter than its tag
        raise SealBroken("a sealed file is truncated")
    return count, size


def open_stream(key: bytes, fh: io.BufferedIOBase, ad: bytes, allocate: Callable[[int], Any] = bytearray) -> Any:
    """A whole sealed file's plaintext, read from `fh` (at its start) segment by segment through one small buffer
    and decrypted straight into the result: one pass over the data and one large allocation, like reading a
    plaintext file. `allocate(n)` makes the result (any writable buffer of n bytes: e.g. a tensor's memory,
    which the tensors are then views of)."""
    header = fh.read(HEADER)
    file_version(header)
    body = fh.seek(0, os.SEEK_END) - HEADER
    fh.seek(HEADER)
    chunk = memoryview(bytearray(_SEALED_SEGMENT))

    def segment(_: int) -> memoryview:
        return chunk[: fh.readinto(chunk)]

    return _open_segments(key, header, body, segment, ad, allocate)


def open_file(
    key: bytes | Callable[[int], bytes],
    source: str | os.PathLike[str] | IO[bytes],
    ad: bytes,
    allocate: Callable[[int], Any] = bytearray,
) -> Any:
    """open_stream for a file on disk, decrypted straight from its pages in the page cache (mapped read-only,
    private): no copy of the ciphertext is made (an adapter's cold load: ~20% less time than reading it).
    `source`: a path, or a file the caller already opened (read from its start, left open): a caller that
    looked at the file's first bytes reads the same file, not one that replaced it meanwhile.
    `key` may be the key of the file's version (header -> key): read from the same open file as the rest, so a
    file replaced meanwhile (a re-seal under a new version) is opened whole, the old file or the new one."""
    with contextlib.ExitStack() as stack:
        fh = source if hasattr(source, "fileno") else stack.enter_context(open(cast(str, source), "rb"))
        fh = cast(IO[bytes], fh)
        size = os.fstat(fh.fileno()).st_size
        if size <= HEADER:
            fh.seek(0)
            version = file_version(fh.read(HEADER))  # too short: its error
            fh.seek(0)
            return open_stream(key(version) if callable(key) else key, cast(io.BufferedIOBase, fh), ad, allocate)
        mapped = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    view = memoryview(mapped)
    try:
        header = bytes(view[:HEADER])
        version = file_version(header)
        if callable(key):
            key = key(version)

        def segment(index: int) -> memoryview:
            start = HEADER + index * _SEALED_SEGMENT
            return view[start : start + _SEALED_SEGMENT]

        return _open_segments(key, header, size - HEADER, segment, ad, allocate)
    finally:
        with contextlib.suppress(BufferError):  # a slice held by an exception's frames: unmapped when collected
            view.release()
            mapped.close()


def _open_segments(
    key: bytes,
    header: bytes,
    body: int,
    segment: Callable[[int], memoryview],
    ad: bytes,
    allocate: Callable[[int], Any],
) -> Any:
    """The one decryption loop of sealed files: `segment(i)` gives the i-th sealed segment (ciphertext | tag), each
    is opened into its place in `allocate(plaintext size)`."""
    count, size = _layout(body)
    segments = _Segments(key, header, ad)
    out = allocate(size)
    target = memoryview(out).cast("B")
    for index in range(count):
        blob = segment(index)
        plain = target[index * SEGMENT : index * SEGMENT + len(blob) - TAG]
        if len(plain) != len(blob) - TAG:  # a short read
            raise SealBroken("a sealed file is truncated")
        segments.open_into(index, blob, plain, last=index == count - 1)
    return out


def open_bytes(key: bytes, blob: bytes | bytearray | memoryview, ad: bytes) -> bytearray:
    result: bytearray = open_stream(key, io.BytesIO(blob), ad)
    return result


class SealedWriter:
    """Writes plaintext as a sealed file to `raw` (sequential only). `close()` writes the last segment; it
    does not close `raw`."""

    def __init__(self, raw: IO[bytes], key: bytes, version: int, ad: bytes) -> None:
        self.closed = False
        header = _header(version)
        self._raw, self._segments = raw, _Segments(key, header, ad)
        self._buffer = bytearray()
        self._index, self.plain_size = 0, 0
        raw.write(header)

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._buffer += view
        self.plain_size += len(view)
        while len(self._buffer) > SEGMENT:  # keep one segment back: the last one is sealed as last
            self._raw.write(self._segments.seal(self._index, bytes(self._buffer[:SEGMENT]), last=False))
            del self._buffer[:SEGMENT]
            self._index += 1
        return len(view)

    def close(self) -> None:
        if not self.closed:
            self._raw.write(self._segments.seal(self._index, bytes(self._buffer), last=True))
            self._buffer.clear()
            self.closed = True


class SealedReader:
    """Reads a sealed file's plaintext from `raw` (seekable: segments are opened as reads reach them). A
    file-like object (read, seek, tell): `as_io` types it for callers that take IO[bytes]."""

    def __init__(self, raw: IO[bytes], key: bytes, ad: bytes) -> None:
        raw.seek(0)
        header = raw.read(HEADER)
        file_version(header)  # SealBroken when it is no sealed file
        self._raw, self._segments = raw, _Segments(key, header, ad)
        self._count, self.size = _layout(raw.seek(0, os.SEEK_END) - HEADER)
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> SealedReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def as_io(self) -> IO[bytes]:
        return cast(IO[bytes], self)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _segment(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        self._raw.seek(HEADER + index * _SEALED_SEGMENT)
        blob = self._raw.read(_SEALED_SEGMENT)
        plain = self._segments.open(index, blob, last=index == self._count - 1)
        self._cached = (index, plain)
        return plain

    def read(self, size: int | None = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        parts = []
        while self._pos < end:
            index, offset = divmod(self._pos, SEGMENT)
            chunk = self._segment(index)[offset : offset + end - self._pos]
            parts.append(chunk)
            self._pos += len(chunk)
        if not parts and self.size == 0 and self._cached is None:
            self._segment(0)  # an empty file still proves its one (last) segment
        return b"".join(parts)
