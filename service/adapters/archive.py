"""Zip in/out for adapter download/upload, entirely in memory (never extracts to disk).

Refuses anything odd in an upload: path-like names, links, encryption, duplicates and zip bombs
(declared AND actual sizes are capped). Knows nothing of what the files contain.
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from collections.abc import Mapping

MAX_RATIO = 200
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
            _check_bare(name)
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, bytes(files[name]))
    return buf.getvalue()


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


def _plan(infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Map bare output names to members; strip one top-level folder if ALL members share it."""
    split = [(info, _parts(info.filename)) for info in infos]
    files = [(info, parts) for info, parts in split if not info.is_dir()]
    dirs = [parts for info, parts in split if info.is_dir()]
    prefixes = {parts[0] for _, parts in files if len(parts) == 2}
    strip = len(prefixes) == 1 and all(len(p) == 2 for _, p in files) and all(d == [*prefixes] for d in dirs)
    if dirs and not strip:
        raise ArchiveError("archive contains directories; put the files at the top level")
    plan: dict[str, zipfile.ZipInfo] = {}
    for info, parts in files:
        if len(parts) != (2 if strip else 1):
            raise ArchiveError(f"member name {info.filename!r} has a directory component")
        name = parts[-1]
        if name in plan:
            raise ArchiveError(f"duplicate member name {name!r}")
        plan[name] = info
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


def unpack_upload_zip(data: bytes, max_total_bytes: int, max_members: int = 16) -> dict[str, bytes]:
    """Bare file name -> content, or ArchiveError saying why the upload was refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise ArchiveError(f"archive has {len(infos)} members (max {max_members})")
            for info in infos:
                if "\x00" in info.orig_filename:  # zipfile cuts .filename at a NUL: check the raw name
                    raise ArchiveError(f"member name contains a NUL byte: {info.orig_filename!r}")
                _check_member(info)
            plan = _plan(infos)
            if not plan:
                raise ArchiveError("archive contains no files")
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
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as e:
        raise ArchiveError(f"not a valid zip archive: {e}") from e
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression / encryption
        raise ArchiveError(f"unsupported zip archive: {e}") from e
