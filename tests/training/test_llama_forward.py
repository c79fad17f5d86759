import copy
from dataclasses import replace
from typing import Any

import pytest
import torch

from service.config import ALL_TARGET_MODULES, Settings
from service.inference.loader import LoadedModel, load_model
from service.inference.tokens import stop_token_ids
from service.training import llama_forward
from service.training.examples import TrainExample
from service.training.trainer import (
    LoraTrainConfig,
    _wrap,
    collate,
    encode_example,
    shared_prefix,
    target_loss,
    train_lora,
)
from tests.models import tiny_model_dir


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    settings = Settings(model=str(tiny_model_dir()), data_dir=tmp_path_factory.mktemp("data"), dtype="float32")
    return load_model(settings)


def _shaped_examples(n: int = 6) -> list[TrainExample]:
    """MovieLens-shaped prompts: a long common start, then each its own, answers of different lengths."""
    head = "Here are some of this user's past items:\n- [rating] "
    return [
        TrainExample(str(i), f"{head}Movie {i} ({1990 + i}) | drama{' x' * i}", f"{i % 5}.5{' really' * (i % 3)}")
        for i in range(n)
    ]


def _batch(lm: LoadedModel, n: int = 6) -> tuple[dict[str, torch.Tensor], int]:
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    rows = [encode_example(lm.tokenizer, ex, stop, 512) for ex in _shaped_examples(n)]
    return collate(rows, pad_id=2), shared_prefix(rows)


def _model(lm: LoadedModel, targets: tuple[str, ...], dropout: float = 0.0) -> Any:
    """A wrapped training model with random LoRA B (zero at init would hide every LoRA term)."""
    config = LoraTrainConfig(target_modules=targets, dropout=dropout, mixed_precision="no")
    torch.manual_seed(0)
    model, _ = _wrap(lm.model, config, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.train()


def _loss_and_grads(
    loss_fn: Any, model: Any, batch: dict[str, torch.Tensor], prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = loss_fn(model, batch, prefix)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize(
    "targets", [("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"), ALL_TARGET_MODULES]
)
@pytest.mark.parametrize("with_prefix", [True, False])
def test_the_fused_forward_gives_the_hf_loss_and_lora_gradients(
    lm: LoadedModel, targets: tuple[str, ...], with_prefix: bool
) -> None:
    """Same loss and same gradient for every LoRA weight as trainer.target_loss (HF's modules) in fp32: padded
    rows, answers of several tokens, the shared prompt start once or every row whole, GQA (4 heads, 2 KV)."""
    batch, prefix = _batch(lm)
    assert prefix >= 10 and bool((batch["attention_mask"] == 0).any())  # a real shared start, padded rows
    prefix = prefix if with_prefix else 0
    model = _model(lm, targets)
    assert llama_forward.supports(model.get_base_model())
    want_loss, want = _loss_and_grads(target_loss, model, batch, prefix)
    assert want.abs().max() > 1e-3 and int((want != 0).sum()) > 0.5 * want.numel()  # not a comparison of zeros
    got_loss, got = _loss_and_grads(llama_forward.target_loss, model, batch, prefix)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_prefix_of_its_own_row_count_and_a_single_row(lm: LoadedModel) -> None:
    """One row (nothing shared) and a batch whose rows are all the same length (no padding)."""
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    model = _model(lm, ("q_proj", "k_proj", "v_proj", "o_proj"))
    one = collate([encode_example(lm.tokenizer, _shaped_examples(1)[0], stop, 512)], pad_id=2)
    same = [TrainExample(str(i), f"Rate movie {i}", "4.5") for i in range(3)]
    rows = [encode_example(lm.tokenizer, ex, stop, 512) for ex in same]
    for batch, prefix in ((one, 0), (collate(rows, pad_id=2), shared_prefix(rows))):
        want_loss, want = _loss_and_grads(target_loss, model, batch, prefix)
        got_loss, got = _loss_and_grads(llama_forward.target_loss, model, batch, prefix)
        torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_models_it_cannot_reproduce_are_not_supported(lm: LoadedModel) -> None:
    model = copy.deepcopy(lm.model)
    assert llama_forward.supports(model)
    for key, value in (
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("attention_dropout", 0.1),
        ("model_type", "qwen2"),
    ):
        other = copy.deepcopy(model)
        setattr(other.config, key, value)
        assert not llama_forward.supports(other), key


def test_training_with_it_matches_training_without_it(lm: LoadedModel) -> None:
    """The trainer uses the fused forward by default where supported: with dropout off the adapters it trains
    match the HF-module path's step for step; with dropout on both learn the same amount."""
    examples = _shaped_examples(8)
    base = LoraTrainConfig(lr=1e-3, epochs=3, batch_size=4, mixed_precision="no")
    runs = {
        (fused, p): train_lora(
            lm.model, lm.tokenizer, examples, replace(base, fused_forward=fused, dropout=p), base_model_name="t"
        )
        for fused in (False, True)
        for p in (0.0, 0.05)
    }
    torch.testing.assert_close(
        torch.tensor(runs[True, 0.0].epoch_losses), torch.tensor(runs[False, 0.0].epoch_losses), rtol=1e-4, atol=0
    )
    fused, plain = runs[True, 0.05].epoch_losses, runs[False, 0.05].epoch_losses
    assert fused[-1] < fused[0] and plain[-1] < plain[0]
    assert abs(fused[-1] - plain[-1]) < 0.1 * plain[0]


def test_rms_norm_keeps_hf_fp32_variance_under_bf16_autocast(lm: LoadedModel) -> None:
    """Under bf16 autocast (how bf16 training runs) the norm's variance stays fp32, as in HF's LlamaRMSNorm:
    autocast would otherwise run its vecdot in bf16. Output and input gradient match HF's module in bf16."""
    norm = copy.deepcopy(lm.model.get_decoder().layers[0].input_layernorm).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    torch.manual_seed(0)
    x = (torch.randn(64, norm.weight.shape[0]) * 3 + 1).to(torch.bfloat16)
    grad = torch.randn(64, norm.weight.shape[0]).to(torch.bfloat16)
    outs, grads = [], []
    for fn in (norm, lambda h: llama_forward._rms_norm(norm, h)):
        h = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h)
        out.backward(grad)
        assert out.dtype == torch.bfloat16 and h.grad is not None
        outs.append(out.float())
        grads.append(h.grad.float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2**-8, atol=1e-3)
    torch.testing.assert_close(grads[1], grads[0], rtol=2**-7, atol=1e-2)


def test_rms_norm_with_a_trainable_weight_gives_the_weight_its_gradient(lm: LoadedModel) -> None:
    """_RMSNorm treats the weight as frozen (no gradient for it); a trainable norm weight takes the module's
    own forward, so the weight's gradient is HF's."""
    norm = copy.deepcopy(lm.model.get_decoder().layers[0].input_layernorm).requires_grad_(True)
    x = torch.randn(16, norm.weight.shape[0])
    torch.autograd.backward(llama_forward._rms_norm(norm, x).square().sum())
    got = norm.weight.grad
    assert got is not None and got.abs().sum() > 0
    norm.weight.grad = None
    norm(x).square().sum().backward()
    torch.testing.assert_close(got, norm.weight.grad)


def test_the_fused_forward_in_bf16_follows_the_hf_loss(lm: LoadedModel) -> None:
    """bf16 weights under bf16 autocast, as the trainer runs where bf16 is native: the loss and the LoRA
    gradients follow HF's modules within bf16 rounding (the exact match is the fp32 test's)."""
    batch, prefix = _batch(lm)
    model = _model(lm, ("q_proj", "k_proj", "v_proj", "o_proj"))
    model.get_base_model().to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights stay fp32 (trainer: fp32 LoRA and AdamW state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(target_loss, model, batch, prefix)
        got_loss, got = _loss_and_grads(llama_forward.target_loss, model, batch, prefix)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=0)
    cosine = torch.nn.functional.cosine_similarity(got.float(), want.float(), dim=0)
    assert cosine > 0.99, cosine
