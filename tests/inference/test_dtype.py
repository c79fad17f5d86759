"""OPPU_DTYPE=auto follows what the processor can do (issue 18 item 1), on faked capabilities: AMX and
AVX512-BF16 CPUs get bf16, an AVX2-only CPU fp32, CUDA keeps bf16/fp16; the loader, /readyz, the start-up
log and training's autocast all apply the same rule."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from service.config import Settings
from service.inference import cpu
from service.inference.cpu import CpuInfo, choose_dtype
from service.inference.loader import load_model
from service.training.trainer import LoraTrainConfig, autocast_dtype
from tests.conftest import app_state, running_app

AMX = CpuInfo("fake Sapphire Rapids", amx_bf16=True, avx512_bf16=True, avx2=True)
AVX512_BF16 = CpuInfo("fake Cooper Lake", amx_bf16=False, avx512_bf16=True, avx2=True)
AVX2 = CpuInfo("fake Haswell", amx_bf16=False, avx512_bf16=False, avx2=True)
CPU = torch.device("cpu")


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    cpu.cpu_info.cache_clear()
    return monkeypatch


def use(monkeypatch: pytest.MonkeyPatch, info: CpuInfo) -> None:
    monkeypatch.setattr(cpu, "cpu_info", lambda: info)


@pytest.mark.parametrize(
    ("info", "dtype", "reason"),
    [
        (AMX, torch.bfloat16, "cpu has amx_bf16"),
        (AVX512_BF16, torch.bfloat16, "cpu has avx512_bf16"),
        (AVX2, torch.float32, "cpu has no native bf16 matmul (neither amx_bf16 nor avx512_bf16)"),
    ],
)
def test_auto_on_cpu_follows_the_flags(info: CpuInfo, dtype: torch.dtype, reason: str) -> None:
    choice = choose_dtype("auto", CPU, cpu=info)
    assert (choice.dtype, choice.reason) == (dtype, reason)


def test_the_name_is_never_read() -> None:
    """A CPU named like a bf16 one but without the flags stays fp32 (the rule is by capability)."""
    lookalike = CpuInfo("Intel(R) Xeon(R) Platinum 8480+ (AMX)", amx_bf16=False, avx512_bf16=False, avx2=True)
    assert choose_dtype("auto", CPU, cpu=lookalike).dtype == torch.float32


def test_cuda_keeps_its_rule_and_explicit_settings_win() -> None:
    cuda = torch.device("cuda")
    assert choose_dtype("auto", cuda, cuda_bf16=True, cpu=AVX2).dtype == torch.bfloat16
    assert choose_dtype("auto", cuda, cuda_bf16=False, cpu=AMX).dtype == torch.float16
    for setting, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        choice = choose_dtype(setting, CPU, cpu=AMX if dtype == torch.float32 else AVX2)
        assert (choice.dtype, choice.reason) == (dtype, f"OPPU_DTYPE={setting}")


def test_detection_reads_torch_capabilities() -> None:
    """The real detection agrees with torch's own cpuinfo (what oneDNN dispatches on)."""
    info = cpu.cpu_info()
    caps = torch.cpu.get_capabilities()
    assert info.avx512_bf16 == bool(caps["avx512_bf16"]) and info.avx2 == bool(caps["avx2"])
    assert info.amx_bf16 == (bool(caps["amx_bf16"]) and torch.cpu._is_amx_tile_supported())


@pytest.mark.parametrize(("info", "dtype"), [(AMX, torch.bfloat16), (AVX2, torch.float32)])
def test_loader_loads_the_chosen_dtype_and_logs_why(
    fake_cpu: pytest.MonkeyPatch,
    info: CpuInfo,
    dtype: torch.dtype,
    tiny_model_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    use(fake_cpu, info)
    with caplog.at_level(logging.INFO, logger="service.inference.loader"):
        lm = load_model(Settings(model=str(tiny_model_path), data_dir=tmp_path, device="cpu", dtype="auto"))
    assert lm.dtype == dtype and next(lm.model.parameters()).dtype == dtype
    reason = choose_dtype("auto", CPU, cpu=info).reason
    assert lm.dtype_reason == reason
    assert f"model dtype {str(dtype).removeprefix('torch.')} on cpu: {reason}" in caplog.text


@pytest.mark.parametrize(
    ("info", "setting", "dtype", "reason"),
    [
        (AMX, "auto", "bfloat16", "cpu has amx_bf16"),
        (AVX512_BF16, "auto", "bfloat16", "cpu has avx512_bf16"),
        (AVX2, "auto", "float32", "cpu has no native bf16 matmul (neither amx_bf16 nor avx512_bf16)"),
        (AMX, "float32", "float32", "OPPU_DTYPE=float32"),
    ],
)
def test_readyz_says_which_dtype_and_why(
    fake_cpu: pytest.MonkeyPatch,
    info: CpuInfo,
    setting: str,
    dtype: str,
    reason: str,
    tiny_model_path: Path,
    tmp_path: Path,
) -> None:
    use(fake_cpu, info)
    with running_app(tmp_path, tiny_model_path, dtype=setting, device="cpu") as client:
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        assert (r.json()["dtype"], r.json()["dtype_reason"]) == (dtype, reason)
        loaded, _ = app_state(client).jobs.base()  # the app's own loader on the same settings
        assert str(loaded.dtype) == f"torch.{dtype}" and loaded.dtype_reason == reason


@pytest.mark.parametrize(("info", "dtype"), [(AMX, torch.bfloat16), (AVX512_BF16, torch.bfloat16), (AVX2, None)])
def test_training_autocast_follows_the_same_rule(
    fake_cpu: pytest.MonkeyPatch, info: CpuInfo, dtype: torch.dtype | None
) -> None:
    use(fake_cpu, info)
    assert autocast_dtype(LoraTrainConfig(), CPU) == dtype
    assert autocast_dtype(LoraTrainConfig(mixed_precision="no"), CPU) is None
    assert autocast_dtype(LoraTrainConfig(mixed_precision="bf16"), CPU) == torch.bfloat16


def test_training_mixed_precision_follows_oppu_dtype() -> None:
    expected = {"auto": "auto", "float32": "no", "bfloat16": "bf16", "float16": "auto"}
    for setting, mixed in expected.items():
        settings = Settings(dtype=setting)
        for stage in ("user", "shared"):
            assert LoraTrainConfig.from_settings(settings, stage=stage).mixed_precision == mixed
