"""Reading a stored adapter folder (peft_format.read_adapter_dir): plaintext and sealed files read alike, a file
sealed in place while a load looks at it, and malformed safetensors headers as format errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from service.adapters import peft_format
from service.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    file_purpose,
    read_adapter_dir,
    tensors_in,
)
from service.sealing.cipher import is_sealed_file
from tests.factories import make_lora, make_sealer
from tests.models import tiny_model

MAX_SCALE = 256.0


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peft")
    return make_lora(tiny_model(), root / "lora", seed=1, r=4, targets=("q_proj", "v_proj"))


def modules_equal(a: Any, b: Any) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(a.modules[k].a, b.modules[k].a) and torch.equal(a.modules[k].b, b.modules[k].b) for k in a.modules
    )


def test_files_sealed_in_place_while_a_load_looks_at_them_still_load(
    adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`oppu keys seal-existing` replaces a plaintext file by its sealed copy (os.replace). A load that saw the
    plaintext magic read the file again by path, found the sealed one and failed (the request's 503)."""
    seal = make_sealer(tmp_path / "keyring").user("alice")
    folder = tmp_path / "v1"
    folder.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (folder / name).write_bytes((adapter_dir / name).read_bytes())
    expected = read_adapter_dir(folder, max_scale=MAX_SCALE)
    real_check = is_sealed_file

    def check_then_seal_in_place(head: bytes) -> bool:
        sealed = real_check(head)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            path, fresh = folder / name, folder / f".{name}.sealing"
            if not real_check(path.read_bytes()[:16]):
                fresh.write_bytes(seal.seal_bytes(file_purpose(name), path.read_bytes()))
                fresh.replace(path)
                break
        return sealed

    monkeypatch.setattr(peft_format, "is_sealed_file", check_then_seal_in_place)
    assert modules_equal(read_adapter_dir(folder, max_scale=MAX_SCALE, seal=seal), expected)
    assert all(real_check((folder / n).read_bytes()[:16]) for n in (CONFIG_NAME, WEIGHTS_NAME))
    monkeypatch.setattr(peft_format, "is_sealed_file", real_check)
    assert modules_equal(read_adapter_dir(folder, max_scale=MAX_SCALE, seal=seal), expected)  # now sealed


def test_a_sealed_file_without_its_owners_key_is_a_format_error(adapter_dir: Path, tmp_path: Path) -> None:
    seal = make_sealer(tmp_path / "keyring").user("alice")
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / CONFIG_NAME).write_bytes((adapter_dir / CONFIG_NAME).read_bytes())
    weights = (adapter_dir / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(seal.seal_bytes(file_purpose(WEIGHTS_NAME), weights))
    with pytest.raises(AdapterFormatError, match="sealed"):
        read_adapter_dir(folder, max_scale=MAX_SCALE)


def safetensors_blob(header: Any, data: bytes = b"\0" * 16) -> torch.Tensor:
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"t": {"dtype": "F32", "shape": [2, 2]}},
        {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}},
        {"t": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 16]}},
        {"t": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}},
        {"t": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}},
        {"t": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}},
    ],
)
def test_malformed_weights_headers_are_format_errors(header: Any) -> None:
    with pytest.raises(AdapterFormatError):
        tensors_in(safetensors_blob(header))


def test_an_empty_weights_file_is_a_format_error(adapter_dir: Path, tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_bytes((adapter_dir / CONFIG_NAME).read_bytes())
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(AdapterFormatError):
        read_adapter_dir(tmp_path, max_scale=MAX_SCALE)
