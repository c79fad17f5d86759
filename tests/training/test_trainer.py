import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from service.adapters.archive import pack_zip
from service.adapters.peft_format import AdapterWeights, merge_lora, read_adapter_files, unmerge
from service.config import ALL_TARGET_MODULES, Settings
from service.inference.loader import LoadedModel, load_model
from service.inference.tokens import encode_prompt, encode_target, stop_token_ids
from service.prompts import PromptParts
from service.training.examples import TrainExample
from service.training.llama_forward import IGNORE
from service.training.trainer import (
    LoraTrainConfig,
    SharedInputDropout,
    TrainingCancelled,
    TrainOutput,
    collate,
    collate_packed,
    encode_example,
    shared_prefix,
    target_loss,
    train_lora,
)
from tests.conftest import bearer, create_user, running_app
from tests.factories import Item
from tests.models import tiny_model_dir

WORD = TrainExample("1", "Say the word", "zebracorn")



# A random tiny model needs every projection and a high lr to memorise one answer in 30 steps.
MEMORISE = LoraTrainConfig(
    target_modules=ALL_TARGET_MODULES, lr=5e-3, epochs=30, batch_size=1, warmup_ratio=0.0, dropout=0.0
)
QUICK = LoraTrainConfig(lr=1e-3, epochs=2, batch_size=2)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    settings = Settings(model=str(tiny_model_dir()), data_dir=tmp_path_factory.mktemp("data"), dtype="float32")
    return load_model(settings)


@pytest.fixture(scope="module")
def memorised(lm: LoadedModel) -> TrainOutput:
    return train_lora(lm.model, lm.tokenizer, [WORD], MEMORISE, base_model_name="tiny-base")


@pytest.fixture
def fresh(lm: LoadedModel) -> Iterator[Any]:
    yield copy.deepcopy(lm.model)


def _examples(n: int = 5) -> list[TrainExample]:
    return [TrainExample(str(i), f"Review {i}: the soup was", f"warm and salty {'!' * i}") for i in range(n)]


def _greedy(model: Any, tokenizer: Any, prompt: str, n: int = 4) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :]))


def test_loss_only_on_target_tokens(lm: LoadedModel) -> None:
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    prompt = encode_prompt(lm.tokenizer, WORD.prompt)
    target = encode_target(lm.tokenizer, WORD.target, stop)
    ids, labels = encode_example(lm.tokenizer, WORD, stop, 512)
    assert ids == prompt + target
    assert labels == [IGNORE] * len(prompt) + target
    short = TrainExample("2", "x", "y")
    batch = collate([(ids, labels), encode_example(lm.tokenizer, short, stop, 512)], pad_id=0)
    n_short = len(encode_example(lm.tokenizer, short, stop, 512)[0])
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (len(ids) - n_short)
    assert (batch["labels"][1, n_short:] == IGNORE).all()
    assert (batch["labels"] != IGNORE).sum() == len(target) + len(encode_target(lm.tokenizer, "y", stop))


def test_a_request_too_long_alone_loses_its_start_inside_the_template(lm: LoadedModel) -> None:
    # The whole templated prompt was cut from the left: the system prompt and `<|im_start|>user` went first, so
    # the adapter learned from prompts that serving never sends.
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    long = TrainExample("3", "old context " * 100 + "newest words", "the answer")
    target = encode_target(lm.tokenizer, long.target, stop)
    ids, labels = encode_example(lm.tokenizer, long, stop, 48)
    assert len(ids) <= 48 and ids[-len(target) :] == target and labels[-len(target) :] == target
    template = encode_prompt(lm.tokenizer, "")  # the chat template around an empty user turn
    head = next(i for i, (a, b) in enumerate(zip(template, encode_prompt(lm.tokenizer, "x"), strict=False)) if a != b)
    prompt = ids[: -len(target)]
    assert prompt[:head] == template[:head] and prompt[-(len(template) - head) :] == template[head:]
    assert lm.tokenizer.decode(prompt).count("newest words") == 1 and len(prompt) >= 48 - len(target) - 2


def test_a_prompt_over_budget_drops_context_by_the_serving_rule(lm: LoadedModel) -> None:
    """Retrieved items from the lowest-ranked, then the profile; the target keeps at least half the length."""
    items = [Item(f"i{n}", None, f"item {n} " + "words " * 30) for n in range(3)]
    parts = PromptParts("the request", tuple(items), "a profile " * 40)
    example = TrainExample("9", parts.build(), "the answer", parts=parts)
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    target = encode_target(lm.tokenizer, example.target, stop)
    full = encode_prompt(lm.tokenizer, example.prompt)
    levels = [encode_prompt(lm.tokenizer, text) for text in parts.levels()]
    assert [len(x) for x in levels] == sorted((len(x) for x in levels), reverse=True) and levels[0] == full
    for n, expected in enumerate(levels[1:], start=1):  # each budget keeps the most context that fits
        budget = len(expected) + len(target)
        ids, _ = encode_example(lm.tokenizer, example, stop, budget)
        assert ids == expected + target, n
    long_target = replace(example, target="answer " * 200)
    ids, labels = encode_example(lm.tokenizer, long_target, stop, 128)
    assert len(ids) <= 128 and sum(label != IGNORE for label in labels) == 64  # half: its start, no stop token
    assert ids[: len(ids) - 64] == next(x for x in levels if len(x) <= 64)


def test_memorises_target_and_files_load_with_peft(
    lm: LoadedModel, memorised: TrainOutput, fresh: Any, tmp_path: Path
) -> None:
    from peft import PeftModel

    assert memorised.steps == 30 and memorised.examples == 1
    assert memorised.epoch_losses[-1] < memorised.epoch_losses[0] - 0.5
    assert not _greedy(lm.model, lm.tokenizer, WORD.prompt).startswith("zebracorn")
    config = json.loads(memorised.files["adapter_config.json"])
    assert config["base_model_name_or_path"] == "tiny-base" and config["r"] == MEMORISE.rank
    assert set(config["target_modules"]) == set(ALL_TARGET_MODULES)
    for name, data in memorised.files.items():
        (tmp_path / name).write_bytes(data)
    with_lora = PeftModel.from_pretrained(fresh, str(tmp_path))
    assert _greedy(with_lora, lm.tokenizer, WORD.prompt).startswith("zebracorn")


def test_target_only_head_matches_the_models_own_loss(lm: LoadedModel) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=4, target_modules=["q_proj"]))
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    batch = collate([encode_example(lm.tokenizer, ex, stop, 512) for ex in _examples()], pad_id=2)
    with torch.no_grad():
        torch.testing.assert_close(target_loss(peft_model, batch), peft_model(**batch).loss)


def _shaped_examples(n: int = 6) -> list[TrainExample]:
    """MovieLens-shaped prompts: a long common start (template + retrieval header), then each its own."""
    head = "Here are some of this user's past items:\n- [rating] "
    return [TrainExample(str(i), f"{head}Movie {i} ({1990 + i}) | drama{' x' * i}", f"{i % 5}.5") for i in range(n)]


def _lora_grads(peft_model: Any) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in peft_model.parameters() if p.requires_grad and p.grad is not None])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_answer_only_logits_and_shared_prefix_give_the_full_logits_loss(lm: LoadedModel, attn: str) -> None:
    """The fast loss (vocab projection at answer positions only; the common prompt start run once and its
    cache repeated per row) equals the model's own full-logits loss in fp32, and so do the LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(lm.model)
    model.set_attn_implementation(attn)
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    rows = [encode_example(lm.tokenizer, ex, stop, 512) for ex in _shaped_examples()]
    batch = collate(rows, pad_id=2)
    prefix = shared_prefix(rows)
    assert prefix >= 10 and len({len(ids) for ids, _ in rows}) > 1  # a real shared start, padded rows
    losses, grads = [], []
    for run in ("full", "answer_only", "shared_prefix"):
        peft_model.zero_grad()
        if run == "full":
            loss = peft_model(**batch, use_cache=False).loss  # logits at every position
        else:
            loss = target_loss(peft_model, batch, prefix if run == "shared_prefix" else 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_lora_grads(peft_model))
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, grads[0], rtol=1e-4, atol=1e-6)


def test_shared_prefix_stops_before_the_first_answer() -> None:
    a = ([1] * 20 + [5, 6, 7], [IGNORE] * 20 + [5, 6, 7])
    b = ([1] * 12 + [2] * 8 + [5], [IGNORE] * 20 + [5])
    early = ([1] * 10 + [9, 9], [IGNORE] * 10 + [9, 9])  # its answer starts at 10: its input 9 must be computed
    assert shared_prefix([a, b]) == 12
    assert shared_prefix([a, a]) == 19  # identical rows: all but the position predicting the first answer
    assert shared_prefix([a, early]) == 9
    assert shared_prefix([a]) == 0  # nothing to share
    assert shared_prefix([a, ([1] * 5 + [3] * 15 + [5], [IGNORE] * 20 + [5])]) == 0  # below MIN_SHARED_PREFIX


def test_shared_input_dropout_rate_scale_and_sharing() -> None:
    drop = SharedInputDropout(0.05)
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    out = drop(x)
    assert drop(x) is out  # q, k, v reading one tensor get one mask
    dropped = (out == 0).float().mean().item()
    assert 0.048 < dropped < 0.052 and abs(out.mean().item() - 1.0) < 0.005  # rate p, expectation kept
    assert torch.allclose(out[out != 0], torch.tensor(32768 / (32768 - 1638)))
    other = drop(x.clone())
    assert not torch.equal(other, out)  # another input, another mask
    drop.clear()
    assert not torch.equal(drop(x), out)
    drop.eval()
    assert drop(x) is x


def test_fast_paths_train_like_the_plain_path(lm: LoadedModel) -> None:
    """The shared prefix and the cheap dropout change the cost, not what is learnt: with dropout off the
    adapters match; with dropout on both learn the same amount."""
    examples = _shaped_examples(8)
    plain = LoraTrainConfig(lr=1e-3, epochs=3, batch_size=4, share_prefix=False, fast_dropout=False)
    runs = {
        (share, fast, p): train_lora(
            lm.model, lm.tokenizer, examples, replace(plain, share_prefix=share, fast_dropout=fast, dropout=p),
            base_model_name="t",
        )
        for share, fast, p in ((False, False, 0.0), (True, True, 0.0), (False, False, 0.05), (True, True, 0.05))
    }  # fmt: skip
    same, plain_run = runs[True, True, 0.0].epoch_losses, runs[False, False, 0.0].epoch_losses
    torch.testing.assert_close(torch.tensor(same), torch.tensor(plain_run), rtol=1e-4, atol=0)  # summation order
    fast, slow = runs[True, True, 0.05].epoch_losses, runs[False, False, 0.05].epoch_losses
    assert fast[-1] < fast[0] and slow[-1] < slow[0]
    assert abs(fast[-1] - slow[-1]) < 0.1 * slow[0]


def _wrapped_pair(lm: LoadedModel, config: LoraTrainConfig) -> tuple[Any, Any]:
    """The same LoRA model twice (same seed, same init): PEFT's forward and the fast LoRA forward."""
    from service.training.trainer import _wrap

    cpu = torch.device("cpu")
    out = []
    for fast in (False, True):
        torch.manual_seed(0)
        model, _ = _wrap(lm.model, replace(config, fast_lora=fast), cpu)
        with torch.no_grad():  # B is zero at init: a random B makes every LoRA term count in the comparison
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        out.append(model.train())
    return out[0], out[1]


@pytest.mark.parametrize(("share", "dropout"), [(False, 0.0), (True, 0.1)])
def test_fast_lora_forward_gives_peft_loss_and_gradients(lm: LoadedModel, share: bool, dropout: float) -> None:
    """The fused LoRA forward (scale on the rank-r intermediate, the add inside addmm, the shared dropout's
    1/(1-p) folded into that scale) gives PEFT's own loss and LoRA gradients: with dropout off, and with the
    shared dropout on (the same masks: the RNG is reseeded before each run)."""
    config = LoraTrainConfig(
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), dropout=dropout, fast_dropout=share,
        share_prefix=share, mixed_precision="no",
    )  # fmt: skip
    plain, fast = _wrapped_pair(lm, config)
    layers = lm.model.config.num_hidden_layers
    assert sum(isinstance(m.forward, functools.partial) for m in fast.modules()) == 4 * layers
    assert not any(isinstance(m.forward, functools.partial) for m in plain.modules())
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    rows = [encode_example(lm.tokenizer, ex, stop, 512) for ex in _shaped_examples()]
    batch, prefix = collate(rows, pad_id=2), shared_prefix(rows) if share else 0
    results = []
    for model in (plain, fast):
        torch.manual_seed(1)
        loss = target_loss(model, batch, prefix)
        torch.autograd.backward(loss)
        results.append((loss.detach(), _lora_grads(model)))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert grad_a.abs().max() > 1e-3  # the comparison is not between zeros
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_give_the_padded_loss(lm: LoadedModel, attn: str) -> None:
    """Examples packed into shared rows (no padding, each attending only to itself) give the same loss as
    one padded row each: nothing leaks across an example boundary."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(lm.model)
    model.set_attn_implementation(attn)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    rows = [encode_example(lm.tokenizer, ex, stop, 512) for ex in _examples(7)]
    packed = collate_packed(rows, max_len=2 * max(len(r[0]) for r in rows), pad_id=2)
    assert packed["input_ids"].shape[0] < len(rows)  # really packed
    with torch.no_grad():
        torch.testing.assert_close(target_loss(peft_model, packed), target_loss(peft_model, collate(rows, pad_id=2)))


def test_min_steps_adds_epochs_for_small_histories(lm: LoadedModel) -> None:
    config = LoraTrainConfig(lr=1e-3, epochs=1, batch_size=2, min_steps=7)
    assert config.epochs_for(5) == 3 and config.epochs_for(40) == 1
    out = train_lora(lm.model, lm.tokenizer, _examples(5), config, base_model_name="tiny")
    assert out.steps == 9 and out.epochs == 3 and len(out.epoch_losses) == 3


def test_callers_model_and_rng_unchanged(lm: LoadedModel) -> None:
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    modules = dict(lm.model.named_modules())
    rng = torch.get_rng_state()
    attn = lm.model.config._attn_implementation
    train_lora(lm.model, lm.tokenizer, _examples(), QUICK, base_model_name="tiny")
    assert torch.equal(rng, torch.get_rng_state()) and lm.model.config._attn_implementation == attn
    assert dict(lm.model.named_modules()) == modules and not lm.model.training
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_same_seed_same_bytes(lm: LoadedModel) -> None:
    a = train_lora(lm.model, lm.tokenizer, _examples(), QUICK, base_model_name="tiny")
    b = train_lora(lm.model, lm.tokenizer, _examples(), QUICK, base_model_name="tiny")
    c = train_lora(lm.model, lm.tokenizer, _examples(), LoraTrainConfig(lr=1e-3, seed=1), base_model_name="tiny")
    assert a.files == b.files and a.final_loss == b.final_loss
    assert a.files["adapter_model.safetensors"] != c.files["adapter_model.safetensors"]
    stop = stop_token_ids(lm.tokenizer, lm.model.config)
    lengths = [len(encode_example(lm.tokenizer, ex, stop, 512)[0]) for ex in _examples()]
    assert a.steps == 6 and a.tokens == 2 * sum(lengths)


def test_merge_changes_outputs_in_place_and_unmerge_restores(
    lm: LoadedModel, memorised: TrainOutput, fresh: Any
) -> None:
    params = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    same_objects = dict(fresh.named_parameters())
    modules = dict(fresh.named_modules())
    originals = merge_lora(fresh, read_adapter_files(memorised.files, max_scale=256.0))
    assert dict(fresh.named_parameters()) == same_objects and dict(fresh.named_modules()) == modules
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh.get_parameter(name), params[name])
    assert _greedy(fresh, lm.tokenizer, WORD.prompt).startswith("zebracorn")
    unmerge(fresh, originals)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, params[n]), n


def test_a_merge_failing_half_way_leaves_the_model_as_it_was(memorised: TrainOutput, fresh: Any) -> None:
    """The training model is shared by every training of the process: a merge that failed on its last module
    left the earlier ones merged, with no originals to undo them."""
    params = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    weights = read_adapter_files(memorised.files, max_scale=256.0)
    last = next(iter(weights.modules.values()))
    broken = AdapterWeights(weights.rank, {**weights.modules, "model.layers.0.self_attn.no_such_proj": last})
    with pytest.raises(Exception):  # noqa: B017  (whatever the lookup raises: the model is what is checked)
        merge_lora(fresh, broken)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, params[n]), n


def test_merge_rejects_incomplete_files() -> None:
    with pytest.raises(ValueError, match="missing"):
        read_adapter_files({"adapter_config.json": b"{}"}, max_scale=256.0)


def test_should_stop_cancels_between_steps_and_progress_reports(lm: LoadedModel) -> None:
    seen: list[float] = []
    calls = iter([False, False, True])
    with pytest.raises(TrainingCancelled):
        train_lora(
            lm.model,
            lm.tokenizer,
            _examples(),
            QUICK,
            base_model_name="t",
            progress=seen.append,
            should_stop=lambda: next(calls),
        )
    assert seen == [1 / 6, 2 / 6]
    out = train_lora(lm.model, lm.tokenizer, _examples(), QUICK, base_model_name="t", progress=seen.append)
    assert seen[-1] == 1.0 and out.steps == 6


def test_paper_defaults() -> None:
    shared, user = LoraTrainConfig.shared_default(), LoraTrainConfig.user_default()
    assert shared.target_modules == ("q_proj", "k_proj", "v_proj") and shared.epochs == 3
    assert user.target_modules == ("q_proj", "v_proj") and user.epochs == 2
    for c in (shared, user):
        assert (c.rank, c.alpha, c.dropout, c.lr, c.batch_size, c.warmup_ratio, c.max_grad_norm) == (
            8,
            8.0,
            0.05,
            1e-4,
            16,
            0.1,
            0.3,
        )
    with pytest.raises(ValueError):
        LoraTrainConfig(epochs=0)


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": 0.0},
        {"target_modules": ()},
        {"warmup_ratio": 1.0},
        {"dropout": 1.0},
        {"alpha": 0.0},
        {"max_grad_norm": 0.0},
        {"batch_size": 0},
        {"top_layers": -1},
    ],
)
def test_a_config_that_cannot_train_is_refused_when_made(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LoraTrainConfig(**bad)


@pytest.fixture(scope="module")
def memorised_bf16(lm: LoadedModel) -> TrainOutput:
    return train_lora(
        lm.model, lm.tokenizer, [WORD], replace(MEMORISE, mixed_precision="bf16"), base_model_name=lm.name
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_trained_under_bf16_autocast_serves_in_fp32_and_bf16(
    memorised_bf16: TrainOutput, dtype: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """What a bf16 box trains (autocast; fp32 LoRA weights on disk) is served through the app in either
    dtype: uploaded, its answer comes back greedy; without it, it does not."""
    assert memorised_bf16.compute_dtype == "bfloat16"
    assert memorised_bf16.epoch_losses[-1] < memorised_bf16.epoch_losses[0] - 0.5
    body = {"prompt": WORD.prompt, "max_new_tokens": 4, "temperature": 0, "retrieval_k": 0, "use_profile": False}
    with running_app(tmp_path, tiny_model_path, dtype=dtype, device="cpu") as client:
        assert client.get("/readyz").json()["dtype"] == dtype
        key = create_user(client, "amy")
        upload = client.put(
            "/users/amy/adapter",
            content=pack_zip(memorised_bf16.files),
            headers={**bearer(key), "Content-Type": "application/zip"},
        )
        assert upload.status_code == 201, upload.text
        r = client.post("/users/amy/generate", json=body, headers=bearer(key))
        assert r.status_code == 200 and r.json()["adapter_version"] == 1, r.text
        assert r.json()["text"].startswith("zebracorn"), r.json()
        r = client.post("/users/amy/generate", json={**body, "use_adapter": False}, headers=bearer(key))
        assert not r.json()["text"].startswith("zebracorn")


def test_fast_dropout_is_the_default_in_every_dtype_and_can_be_turned_off(lm: LoadedModel) -> None:
    from service.training.trainer import _wrap

    cpu = torch.device("cpu")
    assert len(_wrap(lm.model, LoraTrainConfig(mixed_precision="no"), cpu)[1]) > 0
    assert len(_wrap(lm.model, LoraTrainConfig(mixed_precision="bf16"), cpu)[1]) > 0
    assert _wrap(lm.model, LoraTrainConfig(mixed_precision="no", fast_dropout=False), cpu)[1] == []
    assert _wrap(lm.model, LoraTrainConfig(mixed_precision="no", dropout=0.0), cpu)[1] == []


def test_top_layers_trains_lora_in_the_last_layers_only_and_it_serves(lm: LoadedModel, fresh: Any) -> None:
    assert LoraTrainConfig.from_settings(Settings(train_user_top_layers=2), stage="user").top_layers == 2
    assert LoraTrainConfig.from_settings(Settings(train_user_top_layers=2), stage="shared").top_layers == 0
    layers = int(lm.model.config.num_hidden_layers)
    out = train_lora(
        lm.model, lm.tokenizer, [WORD], replace(MEMORISE, top_layers=1), base_model_name="tiny-base"
    )
    weights = read_adapter_files(out.files, max_scale=256.0)
    assert weights.modules and {p.split(".")[2] for p in weights.modules} == {str(layers - 1)}
    assert json.loads(out.files["adapter_config.json"])["layers_to_transform"] == [layers - 1]
    base_answer = _greedy(fresh, lm.tokenizer, WORD.prompt)
    originals = merge_lora(fresh, weights)
    assert _greedy(fresh, lm.tokenizer, WORD.prompt) != base_answer  # it trained, and merges where it trained
    unmerge(fresh, originals)
