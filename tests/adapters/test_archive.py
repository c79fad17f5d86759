"""Upload/download zips: round trip, and every refusal (paths, links, encryption, bombs, junk)."""

from __future__ import annotations

import gzip
import io
import pickle
import random
import stat
import struct
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable

import pytest

from service.adapters.archive import ArchiveError, _read_capped, pack_zip, unpack_upload, unpack_upload_zip
from tests.factories import GIB, pax_sparse_bomb, sparse_bomb

FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes(range(256)) * 40}
CAP = 10 * 1024 * 1024


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _patch_central(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of every central-directory record (what ZipFile.infolist() reads)."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        struct.pack_into(fmt, out, pos + offset, value)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def test_round_trip_and_deterministic() -> None:
    data = pack_zip(FILES)
    assert data == pack_zip(dict(reversed(list(FILES.items()))))
    assert unpack_upload_zip(data, CAP) == FILES


def test_pack_refuses_path_names() -> None:
    with pytest.raises(ArchiveError):
        pack_zip({"a/b": b"x"})


def test_single_top_level_folder_is_stripped() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("myadapter/", b"")
        for name, data in FILES.items():
            zf.writestr(f"myadapter/{name}", data)
    assert unpack_upload_zip(buf.getvalue(), CAP) == FILES


def test_mixed_folders_refused() -> None:
    data = _zip({"a/adapter_config.json": b"{}", "b/adapter_model.safetensors": b"x"})
    with pytest.raises(ArchiveError, match="directory component"):
        unpack_upload_zip(data, CAP)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "..\\x", "C:/x", "a//b", "./x"])
def test_path_like_names_refused(name: str) -> None:
    with pytest.raises(ArchiveError, match="name"):
        unpack_upload_zip(_zip({name: b"x", "adapter_config.json": b"{}"}), CAP)


def test_nested_directory_refused() -> None:
    with pytest.raises(ArchiveError, match="directory"):
        unpack_upload_zip(_zip({"a/b/c": b"x"}), CAP)


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # the test writes a duplicate on purpose
def test_duplicate_names_refused() -> None:
    with pytest.raises(ArchiveError, match="duplicate"):
        unpack_upload_zip(_dup_zip(), CAP)


def _dup_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x", b"1")
        zf.writestr("x", b"2")
    return buf.getvalue()


def test_symlink_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("adapter_model.safetensors")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        unpack_upload_zip(buf.getvalue(), CAP)


def test_encrypted_refused() -> None:
    data = _patch_central(_zip({"x": b"secret"}), 8, "<H", 0x1)  # general purpose flag bit 0
    with pytest.raises(ArchiveError, match="encrypted"):
        unpack_upload_zip(data, CAP)


def test_zip_bomb_refused() -> None:
    buf = io.BytesIO()  # 200 MB of zeros, streamed: ~200 KB compressed, low memory
    zeros = bytes(1 << 20)
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("adapter_model.safetensors", "w", force_zip64=True) as f,
    ):
        for _ in range(200):
            f.write(zeros)
    with pytest.raises(ArchiveError, match=r"ratio|size limit|more than"):
        unpack_upload_zip(buf.getvalue(), CAP)


def test_declared_size_over_cap_refused() -> None:
    data = _zip({"x": bytes(range(256)) * 8192}, compression=zipfile.ZIP_STORED)  # 2 MB, ratio 1
    with pytest.raises(ArchiveError, match="more than"):
        unpack_upload_zip(data, 1024 * 1024)


def test_header_lying_about_size_refused() -> None:
    data = _zip({"x": bytes(20 * 1024 * 1024)})  # ~20 KB compressed
    lying = _patch_central(data, 24, "<I", 1000)  # uncompressed size field claims 1000 bytes
    with pytest.raises(ArchiveError):
        unpack_upload_zip(lying, CAP)


def test_actual_read_stops_at_budget() -> None:
    data = _zip({"x": bytes(range(256)) * 4096}, compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(io.BytesIO(data)) as zf, pytest.raises(ArchiveError, match="size limit"):
        _read_capped(zf, zf.infolist()[0], 100_000)


@pytest.mark.parametrize("junk", [b"", b"hello world", pickle.dumps({"a": 1}), pack_zip(FILES)[:100]])
def test_not_a_zip(junk: bytes) -> None:
    with pytest.raises(ArchiveError, match="zip"):
        unpack_upload_zip(junk, CAP)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_damaged_compressed_member_is_refused_whatever_the_method(method: int) -> None:
    """A corrupt LZMA member raised lzma.LZMAError, which is no OSError: the upload answered 500."""
    data = bytearray(_zip(FILES, method))
    start = data.find(b"adapter_model.safetensors") + len("adapter_model.safetensors") + 8
    data[start : start + 40] = bytes(b ^ 0x55 for b in data[start : start + 40])
    with pytest.raises(ArchiveError):
        unpack_upload_zip(bytes(data), CAP)


def test_too_many_members() -> None:
    with pytest.raises(ArchiveError, match="members"):
        unpack_upload_zip(_zip({f"f{i}": b"x" for i in range(17)}), CAP)
    assert len(unpack_upload_zip(_zip({f"f{i}": b"x" for i in range(16)}), CAP)) == 16


def test_empty_archive_refused() -> None:
    with pytest.raises(ArchiveError, match="no files"):
        unpack_upload_zip(_zip({}), CAP)


# --- .tar.gz uploads: the zip's rules ---


def _targz(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """members: (name, content (None: a directory), tar type flag)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                info.linkname = "/etc/passwd"
            if data is not None and kind == tarfile.REGTYPE:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _files(prefix: str = "") -> list[tuple[str, bytes | None, bytes]]:
    return [(prefix + n, d, tarfile.REGTYPE) for n, d in FILES.items()]


@pytest.mark.parametrize(
    "members",
    [
        _files(),
        [("adapter", None, tarfile.DIRTYPE), *_files("adapter/")],
        [(".", None, tarfile.DIRTYPE), *_files("./")],  # `tar czf a.tgz -C folder .`
        [*_files(), ("README.md", b"# model card", tarfile.REGTYPE)],
    ],
)
def test_targz_of_a_folder_unpacks_like_the_zip(members: list[tuple[str, bytes | None, bytes]]) -> None:
    got = unpack_upload(_targz(members), CAP)
    assert {k: v for k, v in got.items() if k in FILES} == FILES


@pytest.mark.parametrize(
    ("members", "fragment"),
    [
        ([*_files(), ("evil", b"", tarfile.SYMTYPE)], "link"),
        ([*_files(), ("evil", b"", tarfile.LNKTYPE)], "link"),
        ([*_files(), ("dev", b"", tarfile.CHRTYPE)], "not a regular file"),
        ([*_files(), ("dev", b"", tarfile.BLKTYPE)], "not a regular file"),
        ([*_files(), ("fifo", b"", tarfile.FIFOTYPE)], "not a regular file"),
        ([("../adapter_config.json", b"{}", tarfile.REGTYPE)], "'..'"),
        ([("/etc/adapter_config.json", b"{}", tarfile.REGTYPE)], "absolute"),
        ([("a/b/adapter_config.json", b"{}", tarfile.REGTYPE)], "directory"),
        ([*_files(), *_files()], "duplicate"),
        ([(f"f{i}", b"", tarfile.REGTYPE) for i in range(17)], "members"),
        ([("a\\b", b"", tarfile.REGTYPE)], "backslash"),
    ],
)
def test_hostile_targz_members_are_refused(members: list[tuple[str, bytes | None, bytes]], fragment: str) -> None:
    with pytest.raises(ArchiveError, match=fragment):
        unpack_upload(_targz(members), CAP)


def test_targz_bombs_stop_at_the_cap() -> None:
    bomb = _targz([("adapter_model.safetensors", b"\0" * (4 * CAP), tarfile.REGTYPE)])
    assert len(bomb) < CAP // 100  # compresses ~1000:1
    with pytest.raises(ArchiveError, match="size limit"):
        unpack_upload(bomb, CAP)
    with pytest.raises(ArchiveError, match="not a valid"):
        unpack_upload(b"\x1f\x8b" + b"garbage" * 10, CAP)


# --- members that cost more than they weigh (issue 23 N1): refused before anything is read ---


def declared_only(name: str, size: int) -> bytes:
    """A regular member whose header declares `size` bytes and whose data never comes."""
    info = tarfile.TarInfo(name)
    info.size = size
    return gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024), 9, mtime=0)


@pytest.mark.parametrize("bomb", [sparse_bomb, pax_sparse_bomb], ids=["gnu", "pax"])
def test_sparse_members_are_refused(bomb: Callable[[int], bytes]) -> None:
    data = bomb(GIB)
    assert len(data) < 256
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="sparse"):
            unpack_upload(data, CAP)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "README.md"])
def test_a_declared_size_over_the_budget_is_refused_before_reading(name: str) -> None:
    with pytest.raises(ArchiveError, match="declares"):
        unpack_upload(declared_only(name, GIB), CAP)
    big = _targz([("adapter_model.safetensors", bytes(range(256)) * 64, tarfile.REGTYPE)])  # 16 KiB, ratio ~1
    with pytest.raises(ArchiveError, match="declares"):
        unpack_upload(big, 8 * 1024)


def test_only_kept_names_are_read() -> None:
    members = [*_files(), ("README.md", b"# card", tarfile.REGTYPE)]
    assert unpack_upload(_targz(members), CAP, keep=set(FILES)) == FILES
    assert unpack_upload(_zip({**FILES, "README.md": b"# card"}), CAP, keep=set(FILES)) == FILES
    # A skipped member still obeys the name and type rules.
    with pytest.raises(ArchiveError, match="link"):
        unpack_upload(_targz([*_files(), ("evil", b"", tarfile.SYMTYPE)]), CAP, keep=set(FILES))
    # A big skipped member costs no memory: it is passed over, never held.
    noise = _targz([*_files(), ("README.md", random.Random(0).randbytes(8 << 20), tarfile.REGTYPE)])  # 8 MiB
    tracemalloc.start()
    try:
        assert unpack_upload(noise, CAP, keep=set(FILES)) == FILES
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def _no_zipfile(*_: object, **__: object) -> zipfile.ZipFile:
    raise AssertionError("zipfile.ZipFile was opened: the end record's counts were not checked first")


def test_too_many_members_are_refused_from_the_end_record(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _zip({f"f{i}": b"x" for i in range(17)})
    monkeypatch.setattr(zipfile, "ZipFile", _no_zipfile)  # before the central directory is parsed
    with pytest.raises(ArchiveError, match="declares 17 members"):
        unpack_upload_zip(data, CAP)


def test_an_oversized_central_directory_is_refused_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # 400k members listed in 19 MB of central directory took ~1.7 s and +125 MB inside zipfile; here 2 members
    # whose directory entries carry 40 KB comments each.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in FILES:
            info = zipfile.ZipInfo(name)
            info.comment = b"c" * 40_000
            zf.writestr(info, FILES[name])
    monkeypatch.setattr(zipfile, "ZipFile", _no_zipfile)
    with pytest.raises(ArchiveError, match="central directory is"):
        unpack_upload_zip(buf.getvalue(), CAP)


def test_a_zip64_end_record_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        m.setattr(zipfile, "ZIP64_LIMIT", 16)  # forces the zip64 end record (and extras) on a small archive
        with zipfile.ZipFile(buf, "w") as zf:
            for name, content in FILES.items():
                zf.writestr(name, content)
    data = bytearray(buf.getvalue())
    # As archivers that always write zip64 do: the classic end record holds only the "see zip64" sentinels.
    struct.pack_into("<HHI", data, data.rfind(b"PK\x05\x06") + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF)
    assert unpack_upload_zip(bytes(data), CAP) == FILES
    locator = data.rfind(b"PK\x06\x07")
    data[locator : locator + 4] = b"XXXX"
    with pytest.raises(ArchiveError, match="zip64 end record missing"):
        unpack_upload_zip(bytes(data), CAP)


def test_a_zip64_record_cannot_smuggle_a_larger_central_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # zipfile reads the zip64 record before the locator whenever a locator is there, whatever the classic end
    # record says: a classic record declaring 1 member in 100 bytes must not let 17 through unchecked.
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        m.setattr(zipfile, "ZIP64_LIMIT", 16)  # a zip64 end record + locator on a small archive
        with zipfile.ZipFile(buf, "w") as zf:
            for i in range(17):
                zf.writestr(f"f{i}", b"x")
    data = bytearray(buf.getvalue())
    struct.pack_into("<HHI", data, data.rfind(b"PK\x05\x06") + 8, 1, 1, 100)
    monkeypatch.setattr(zipfile, "ZipFile", _no_zipfile)
    with pytest.raises(ArchiveError, match="declares 17 members"):
        unpack_upload_zip(bytes(data), CAP)


@pytest.mark.parametrize("header", ["central", "local"])
def test_a_member_name_flagged_utf8_that_is_not_is_refused(header: str) -> None:
    name = b"adapter_config.json"
    data = bytearray(_zip({name.decode(): b"{}"}))
    at = data.find(b"PK\x01\x02") if header == "central" else 0
    flags_at, name_at = (at + 8, at + 46) if header == "central" else (at + 6, at + 30)
    struct.pack_into("<H", data, flags_at, struct.unpack_from("<H", data, flags_at)[0] | 0x800)
    data[name_at : name_at + len(name)] = b"\xff" + name[1:]
    with pytest.raises(ArchiveError):  # was UnicodeDecodeError: a 500 for the upload
        unpack_upload_zip(bytes(data), CAP, keep={name.decode()})
