"""Archives in/out for adapter download/upload, entirely in memory (never extracts to disk): zip out; zip or
.tar.gz in (what `save_pretrained` wrote, as is or in one folder).

Refuses anything odd in an upload: path-like names, links, devices, sparse files, encryption, duplicates
and bombs (declared AND actual sizes and the compression ratio are capped; a member's declared size is
checked against what is left of the budget BEFORE it is read). Only the names the caller keeps are read, in
bounded chunks; the others are checked by name and type and passed over. Knows nothing of what the files
contain.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Collection, Iterable, Mapping
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_RATIO = 200
# zipfile.ZipFile reads and parses the whole central directory before anything can be counted: 19 MB of it
# can list 400k members (~1.7 s, +125 MB). Its size is read from the end record first (a few members with
# bare names take ~100 bytes each).
MAX_CENTRAL_DIRECTORY = 64 * 1024
_EOCD, _EOCD64_LOCATOR, _EOCD64 = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_CHUNK = 64 * 1024
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # deterministic archives: same files -> same bytes


class ArchiveError(ValueError):
    """An upload archive was refused; the message says why."""


def _check_bare(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00:"):
        raise ArchiveError(f"invalid file name {name!r}: only bare file names are allowed")


def pack_zip(files: Mapping[str, bytes]) -> bytes:
    """Deterministic deflated zip of bare-named files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            zf.writestr(_zip_info(name, len(files[name])), bytes(files[name]))
    return buf.getvalue()


def _zip_info(name: str, size: int, folder: str = "") -> zipfile.ZipInfo:
    _check_bare(name)
    info = zipfile.ZipInfo(f"{folder}/{name}" if folder else name, date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.file_size = size  # known up front: the same bytes as pack_zip (zip64 only where needed)
    return info


def pack_zip_to(out: IO[bytes], files: Mapping[str, IO[bytes]]) -> None:
    """pack_zip's archive written to `out` from open files, in chunks: neither the files nor the archive are
    ever whole in memory (a download of a large adapter costs a chunk, not its size)."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        add_files(zf, files)


def add_files(zf: zipfile.ZipFile, files: Mapping[str, IO[bytes]], folder: str = "") -> None:
    """Open files written into an archive being written (at its root, or under `folder/`), in chunks."""
    for name in sorted(files):
        src = files[name]
        size = src.seek(0, io.SEEK_END)
        src.seek(0)
        with zf.open(_zip_info(name, size, folder), "w") as dest:
            while chunk := src.read(_CHUNK):
                dest.write(chunk)


def _parts(name: str) -> list[str]:
    """Split a member name, refusing absolute, parent, backslash and empty/dot components."""
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"member name {name!r} contains a backslash or NUL")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"member name {name!r} is an absolute path")
    parts = name.split("/")
    if parts[-1] == "":  # a directory entry "x/"
        parts = parts[:-1]
    if any(p in ("", ".", "..") for p in parts) or not parts:
        raise ArchiveError(f"member name {name!r} contains '..', '.' or an empty path component")
    return parts


def _check_member(info: zipfile.ZipInfo) -> None:
    if info.flag_bits & 0x1:
        raise ArchiveError(f"member {info.filename!r} is encrypted")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ArchiveError(f"member {info.filename!r} is a symbolic link")
    if info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise ArchiveError(f"member {info.filename!r} has a compression ratio over {MAX_RATIO}")


def _plan(members: Iterable[tuple[str, bool]]) -> dict[str, str]:
    """Map bare output names to member names (name, is_dir); strip one top-level folder if ALL members
    share it."""
    split = [(name, is_dir, _parts(name)) for name, is_dir in members]
    files = [(name, parts) for name, is_dir, parts in split if not is_dir]
    dirs = [parts for _, is_dir, parts in split if is_dir]
    prefixes = {parts[0] for _, parts in files if len(parts) == 2}
    strip = len(prefixes) == 1 and all(len(p) == 2 for _, p in files) and all(d == [*prefixes] for d in dirs)
    if dirs and not strip:
        raise ArchiveError("archive contains directories; put the files at the top level")
    plan: dict[str, str] = {}
    for member, parts in files:
        if len(parts) != (2 if strip else 1):
            raise ArchiveError(f"member name {member!r} has a directory component")
        name = parts[-1]
        if name in plan:
            raise ArchiveError(f"duplicate member name {name!r}")
        plan[name] = member
    return plan


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """Decompress in chunks and stop at the budget, whatever the header claims."""
    out = bytearray()
    with zf.open(info) as f:
        while chunk := f.read(_CHUNK):
            out += chunk
            if len(out) > budget:
                raise ArchiveError("archive decompresses to more than the size limit")
            if len(out) > MAX_RATIO * max(info.compress_size, 1):
                raise ArchiveError(f"member {info.filename!r} has a compression ratio over {MAX_RATIO}")
    return bytes(out)


def _file(data: bytes | IO[bytes]) -> IO[bytes]:
    return io.BytesIO(data) if isinstance(data, bytes | bytearray) else data


def _size(f: IO[bytes]) -> int:
    pos = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return end


def unpack_upload_zip(
    data: bytes | IO[bytes], max_total_bytes: int, max_members: int = 16, keep: Collection[str] | None = None
) -> dict[str, bytes]:
    """Bare file name -> content (only the names in `keep`, if given), or ArchiveError saying why the upload
    was refused."""
    f = _file(data)
    entries, directory = _central_directory(f)
    if entries > max_members:
        raise ArchiveError(f"archive declares {entries} members (max {max_members})")
    if directory > MAX_CENTRAL_DIRECTORY:
        raise ArchiveError(f"archive's central directory is {directory} bytes (max {MAX_CENTRAL_DIRECTORY})")
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise ArchiveError(f"archive has {len(infos)} members (max {max_members})")
            for info in infos:
                if "\x00" in info.orig_filename:  # zipfile cuts .filename at a NUL: check the raw name
                    raise ArchiveError(f"member name contains a NUL byte: {info.orig_filename!r}")
                _check_member(info)
            by_name = {info.filename: info for info in infos}
            # (ZipInfo.is_dir() fails on an empty name: _plan refuses that name first)
            members = [(i.filename, i.filename.endswith("/")) for i in infos]
            plan = {name: by_name[member] for name, member in _plan(members).items()}
            if not plan:
                raise ArchiveError("archive contains no files")
            plan = {name: info for name, info in plan.items() if keep is None or name in keep}
            if sum(info.file_size for info in plan.values()) > max_total_bytes:
                raise ArchiveError(f"archive declares more than {max_total_bytes} bytes uncompressed")
            out: dict[str, bytes] = {}
            budget = max_total_bytes
            for name, info in plan.items():
                out[name] = _read_capped(zf, info, budget)
                budget -= len(out[name])
            return out
    except ArchiveError:
        raise
    # lzma.LZMAError is no OSError (bz2's and zlib's data errors are, or are listed): a damaged LZMA member;
    # UnicodeDecodeError: a member name flagged as UTF-8 that is not UTF-8
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as e:
        raise ArchiveError(f"not a valid zip archive: {e}") from e
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression / encryption
        raise ArchiveError(f"unsupported zip archive: {e}") from e


def _central_directory(f: IO[bytes]) -> tuple[int, int]:
    """(members, central directory bytes) as the end records declare them, the bytes zipfile will read and
    parse; ArchiveError where there is no end record. A zip64 locator right before the end record makes
    zipfile use the zip64 record, whatever the classic one says (CPython reads the record just before the
    locator; the locator's own offset names one too): the largest of what they declare counts."""
    start, end = f.tell(), _size(f)
    tail_len = min(end, 22 + 0xFFFF)  # the end record (22 bytes) and at most a 64 KiB comment after it
    f.seek(end - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        f.seek(start)
        raise ArchiveError("not a valid zip archive: no end of central directory record")
    entries, size = struct.unpack_from("<HI", tail, at + 10)
    zip64 = entries == 0xFFFF or size == 0xFFFFFFFF
    locator = at >= 20 and tail[at - 20 : at - 16] == _EOCD64_LOCATOR
    if zip64 and not locator:
        f.seek(start)
        raise ArchiveError("not a valid zip archive: zip64 end record missing")
    if locator:
        (offset,) = struct.unpack_from("<Q", tail, at - 12)
        records = [_zip64_record(f, end - tail_len + at - 20 - 56), _zip64_record(f, offset)]
        found = [r for r in records if r is not None]
        if zip64 and not found:
            f.seek(start)
            raise ArchiveError("not a valid zip archive: bad zip64 end record")
        # the classic record's 0xFFFF / 0xFFFFFFFF are "see zip64" sentinels, not counts
        entries = max([0 if entries == 0xFFFF else entries, *(r[0] for r in found)])
        size = max([0 if size == 0xFFFFFFFF else size, *(r[1] for r in found)])
    f.seek(start)
    return entries, size


def _zip64_record(f: IO[bytes], offset: int) -> tuple[int, int] | None:
    """(members, central directory bytes) of a zip64 end record at `offset`, None where there is none."""
    if offset < 0:
        return None
    f.seek(offset)
    record = f.read(56)
    if len(record) < 56 or record[:4] != _EOCD64:
        return None
    entries, size = struct.unpack_from("<QQ", record, 32)
    return entries, size


class _Reads(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _CappedReader(io.RawIOBase):
    """A read-only stream that fails once more than `cap` bytes were read through it (a gzip bomb stops
    there, whatever the archive claims)."""

    def __init__(self, inner: _Reads, cap: int) -> None:
        self._inner, self._left = inner, cap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inner.read(min(len(view), self._left + 1))
        if len(data) > self._left:
            raise ArchiveError("archive decompresses to more than the size limit")
        self._left -= len(data)
        view[: len(data)] = data
        return len(data)


def _tar_member_ok(info: tarfile.TarInfo) -> None:
    if "\x00" in info.name:
        raise ArchiveError(f"member name contains a NUL byte: {info.name!r}")
    if info.issym() or info.islnk():
        raise ArchiveError(f"member {info.name!r} is a link")
    # tarfile fills a sparse file's holes with NULs in memory without reading the stream: no cap would see a
    # 1 GiB hole declared by 80 bytes. PEFT files are never sparse.
    sparse_pax = any(key.startswith("GNU.sparse.") for key in info.pax_headers)
    if info.issparse() or info.type == tarfile.GNUTYPE_SPARSE or sparse_pax:
        raise ArchiveError(f"member {info.name!r} is a sparse file")
    if not (info.isfile() or info.isdir()):
        raise ArchiveError(f"member {info.name!r} is not a regular file or directory (device, fifo, ...)")


def _tar_name(info: tarfile.TarInfo) -> str | None:
    """The member's name without the "./" that `tar -C folder .` puts in front; None for the root itself."""
    name = info.name
    while name.startswith("./"):
        name = name[2:]
    if name.endswith("/") and not info.isdir():
        raise ArchiveError(f"file member {info.name!r} is named like a directory")
    name = name.removesuffix("/")
    if name in ("", "."):
        if not info.isdir():
            raise ArchiveError(f"member name {info.name!r} is not a file name")
        return None
    return name


def _read_member(body: IO[bytes] | None, declared: int) -> bytes:
    """A member's content in bounded chunks; it must be exactly its declared (already budgeted) size."""
    out = io.BytesIO()
    while body is not None and (chunk := body.read(min(_CHUNK, declared + 1 - out.tell()))):
        out.write(chunk)
        if out.tell() > declared:
            raise ArchiveError("a member holds more than its declared size")
    if out.tell() != declared:
        raise ArchiveError("a member holds less than its declared size")
    return out.getvalue()


def unpack_upload_targz(
    data: bytes | IO[bytes], max_total_bytes: int, max_members: int = 16, keep: Collection[str] | None = None
) -> dict[str, bytes]:
    """Bare file name -> content from a .tar.gz, with the zip's member rules and limits; only the names in
    `keep` (if given) are read, the others are passed over in the stream."""
    f = _file(data)
    # Headers take 512 bytes per member plus padding: allow them on top of the content budget.
    cap = max_total_bytes + (max_members + 2) * 1024
    cap = min(cap, MAX_RATIO * max(_size(f), 1))
    budget = min(max_total_bytes, cap)  # what the members may still declare, kept or not
    members: list[tuple[str, bool]] = []
    contents: dict[str, bytes] = {}
    try:
        raw = _CappedReader(gzip.GzipFile(fileobj=f, mode="rb"), cap)
        with tarfile.open(fileobj=io.BufferedReader(raw), mode="r|") as tf:
            for info in tf:
                if len(members) >= max_members:
                    raise ArchiveError(f"archive has more than {max_members} members")
                _tar_member_ok(info)
                name = _tar_name(info)
                if name is None:
                    continue  # the archive's own root ("." from `tar czf a.tgz -C folder .`)
                members.append((name + ("/" if info.isdir() else ""), info.isdir()))
                if not info.isfile():
                    continue
                if info.size > budget:  # before a byte of it is read
                    raise ArchiveError(f"member {info.name!r} declares {info.size} bytes, over the size limit")
                budget -= info.size
                if keep is None or name.rsplit("/", 1)[-1] in keep:
                    contents[name] = _read_member(tf.extractfile(info), info.size)
    except ArchiveError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"not a valid .tar.gz archive: {e}") from e
    plan = _plan(members)
    if not plan:
        raise ArchiveError("archive contains no files")
    return {name: contents[member] for name, member in plan.items() if member in contents}


def unpack_upload(
    data: bytes | IO[bytes], max_total_bytes: int, keep: Collection[str] | None = None
) -> dict[str, bytes]:
    """A zip or a .tar.gz (told apart by their magic bytes), from bytes or a seekable file; only the names in
    `keep` are read and returned (None: all)."""
    f = _file(data)
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return unpack_upload_targz(f, max_total_bytes, keep=keep)
    return unpack_upload_zip(f, max_total_bytes, keep=keep)
