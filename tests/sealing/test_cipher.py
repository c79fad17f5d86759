"""Tokens and sealed files: round trips at segment edges, and every way a ciphertext can be misused fails
(another owner's binding, truncation, a dropped or swapped segment, a flipped bit)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from service.sealing import cipher
from service.sealing.cipher import SEGMENT, SealBroken
from service.sealing.tempfiles import SealedTempFile

KEY = bytes(range(32))


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 7])
def test_a_sealed_file_opens_to_its_plaintext_and_hides_it(size: int, tmp_path: Path) -> None:
    data = (b"canary-" * (size // 7 + 1))[:size]
    blob = cipher.seal_bytes(KEY, 3, data, b"alice|adapter")
    assert len(blob) == cipher.sealed_size(size)
    assert cipher.file_version(blob) == 3
    assert cipher.open_bytes(KEY, blob, b"alice|adapter") == data
    (tmp_path / "sealed").write_bytes(blob)  # from disk: decrypted from the mapped file
    assert cipher.open_file(KEY, tmp_path / "sealed", b"alice|adapter") == data
    if size >= 7:
        assert b"canary-" not in blob
    reader = cipher.SealedReader(io.BytesIO(blob), KEY, b"alice|adapter")
    reader.seek(size // 2)
    assert reader.read(100) == data[size // 2 : size // 2 + 100]


def test_a_sealed_file_moved_truncated_or_spliced_does_not_open() -> None:
    data = os.urandom(3 * SEGMENT)
    blob = cipher.seal_bytes(KEY, 1, data, b"alice|weights")
    with pytest.raises(SealBroken):
        cipher.open_bytes(KEY, blob, b"bob|weights")  # another owner
    with pytest.raises(SealBroken):
        cipher.open_bytes(KEY, blob, b"alice|config")  # another role
    seg = SEGMENT + cipher.TAG
    with pytest.raises(SealBroken):  # cut at a segment boundary: the new last segment was not sealed as last
        cipher.open_bytes(KEY, blob[: cipher.HEADER + 2 * seg], b"alice|weights")
    swapped = blob[: cipher.HEADER] + blob[cipher.HEADER + seg : cipher.HEADER + 2 * seg]
    swapped += blob[cipher.HEADER : cipher.HEADER + seg] + blob[cipher.HEADER + 2 * seg :]
    with pytest.raises(SealBroken):
        cipher.open_bytes(KEY, swapped, b"alice|weights")
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(SealBroken):
        cipher.open_bytes(KEY, bytes(flipped), b"alice|weights")
    with pytest.raises(SealBroken):
        cipher.open_bytes(bytes(32), blob, b"alice|weights")  # another key


@pytest.mark.parametrize("cut", [1, cipher.TAG - 1, cipher.TAG, SEGMENT])
def test_a_file_cut_anywhere_fails_cleanly_from_disk_and_from_memory(cut: int, tmp_path: Path) -> None:
    """Also a last segment shorter than its tag: SealBroken (the request's 409), never another error."""
    blob = cipher.seal_bytes(KEY, 1, os.urandom(2 * SEGMENT + 100), b"alice|weights")
    path = tmp_path / "cut"
    path.write_bytes(blob[: cipher.HEADER + SEGMENT + cipher.TAG + cut])
    with pytest.raises(SealBroken):
        cipher.open_file(KEY, path, b"alice|weights")
    with pytest.raises(SealBroken):
        cipher.open_bytes(KEY, path.read_bytes(), b"alice|weights")
    path.write_bytes(blob[: cipher.HEADER - 1])
    with pytest.raises(SealBroken):
        cipher.open_file(KEY, path, b"alice|weights")


def test_tokens_are_bound_to_their_owner_and_carry_their_key_version() -> None:
    token = cipher.seal_token(KEY, 7, b"zebracorn", b"alice|history")
    assert token.startswith("s1.7.") and "zebracorn" not in token
    assert cipher.token_version(token) == 7
    assert cipher.open_token(KEY, token, b"alice|history") == b"zebracorn"
    assert cipher.seal_token(KEY, 7, b"zebracorn", b"alice|history") != token  # a fresh nonce each time
    for bad_ad in (b"bob|history", b"alice|profile"):
        with pytest.raises(SealBroken):
            cipher.open_token(KEY, token, bad_ad)
    for damaged in ("plain text", "s1.x.abc", token[:-4], "s1.7.!!!"):
        with pytest.raises(SealBroken):
            cipher.open_token(KEY, damaged, b"alice|history")


def test_a_temp_file_holds_no_plaintext_on_disk_and_reads_back_as_written() -> None:
    temp = SealedTempFile()
    with zipfile.ZipFile(temp.as_io(), "w", compression=zipfile.ZIP_STORED) as zf:  # stored: the canary as is
        zf.writestr("history.jsonl", b"canary-zebracorn " * 50_000)
    temp.done_writing()
    raw = temp._raw  # the file on disk
    raw.seek(0)
    on_disk = raw.read()
    assert b"canary-zebracorn" not in on_disk and len(on_disk) > 850_000
    size = temp.seek(0, 2)
    temp.seek(0)
    with zipfile.ZipFile(temp.as_io()) as zf:
        assert zf.read("history.jsonl") == b"canary-zebracorn " * 50_000
    assert temp.tell() <= size
    temp.close()


@pytest.mark.parametrize("version", ["\u00b2", "1\u00b2", "\u0663", "\uff13", "\U0001d7d5"])
def test_a_token_whose_version_is_a_non_ascii_digit_is_no_token(version: str) -> None:
    # str.isdigit() accepts these: "s1.².…" made int() raise ValueError (a profile read answered 500, a rotation
    # job failed every attempt), and "s1.٣.…" was read as version 3. Only ASCII digits name a version.
    token = cipher.seal_token(KEY, 3, b"zebracorn", b"alice|history")
    forged = f"s1.{version}." + token.rsplit(".", 1)[1]
    with pytest.raises(SealBroken):
        cipher.token_version(forged)
    with pytest.raises(SealBroken):
        cipher.open_token(KEY, forged, b"alice|history")
