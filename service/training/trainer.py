"""PEFT LoRA training on a loaded causal LM (OPPU stages 1 and 2).

Owns tokenising examples into label-masked batches and the optimisation loop; knows nothing of SQL,
jobs or the adapter store: it takes examples in and hands the PEFT files back as bytes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from service.adapters.peft_format import PEFT_FILES
from service.config import SHARED_LORA_ALPHA, SHARED_LORA_RANK, SHARED_LORA_TARGETS, Settings
from service.inference.cpu import choose_dtype
from service.inference.threads import release_pool
from service.inference.tokens import encode_prompt, encode_target, stop_token_ids
from service.sealing.tempfiles import memory_dir
from service.training import llama_forward
from service.training.examples import TrainExample
from service.training.llama_forward import IGNORE

# Architectures whose logits are exactly lm_head(decoder hidden state), so the head can be applied to the
# target positions only (no logit scaling/softcapping to reproduce). Others take the plain forward.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# A batch's common prompt start shorter than this is not worth a separate forward.
MIN_SHARED_PREFIX = 8
# OPPU_DTYPE -> the trainer's mixed precision: training follows the served dtype's rule.
_MIXED_PRECISION = {"auto": "auto", "float32": "no", "bfloat16": "bf16", "float16": "auto"}


class TrainingCancelled(RuntimeError):
    """Raised between steps when `should_stop()` says so; nothing is returned or saved."""


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 16
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.3
    max_seq_len: int = 512
    seed: int = 0
    weight_decay: float = 0.0
    # Shuffle, then batch similar lengths together (HF `group_by_length`): far less padding per step.
    group_by_length: bool = True
    # Small histories still train: epochs repeat until at least this many optimizer steps were taken.
    min_steps: int = 0
    # The examples of a step are packed into rows of up to max_seq_len tokens (each attending only to itself,
    # position ids restarting per example): no padding computed. Off by default: with group_by_length the
    # padding is ~2% here, and the packed rows' longer attention made fp32 steps slower (bench/training.py).
    pack: bool = False
    # bf16 autocast with fp32 LoRA and AdamW state (OPPU trains with HF `bf16=True`). "auto" uses it where
    # bf16 matmuls are native (the rule of inference/cpu.choose_dtype: CUDA with bf16, CPUs with AMX or
    # AVX512-BF16), never on an AVX2-only CPU, where bf16 is emulated and far slower than fp32.
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    # The prompt start that all examples of a step share (chat template, system prompt, the retrieval
    # header) runs through the model ONCE per step, its keys/values repeated for every row: the same loss
    # (causal attention, the prefix sees nothing after it), a quarter fewer tokens on MovieLens prompts.
    # On in every dtype: with fast_dropout, on a quiet 2-vCPU Xeon without native bf16 (fp32) it took 100
    # MovieLens items from 52.7 to 36.8 s a user (bench/results/training-fp32.json; 62-92 to 45.0 s capped at
    # AVX2). An earlier measurement on the AMX box had both slower in fp32; not reproduced here. False: every
    # row whole (tests).
    share_prefix: bool = True
    # LoRA dropout masks from 16-bit random integers (p rounded to 1/32768), one mask per layer input that
    # several adapted projections read (q/k/v, gate/up): bernoulli_ per projection was ~30% of a step.
    fast_dropout: bool = True
    # LoRA projections as y = base(x) + ((dropout(x) A^T) * s) B^T with the add fused into one addmm: the
    # scale (and the dropout's 1/(1-p)) multiply the rank-r intermediate, not the (tokens x out) output, and
    # PEFT's per-call checks go. The same function, rounding aside. None: on wherever it can run (under
    # autocast, or with fp32 weights); False: PEFT's own forward. Measured on the AMX box (100 MovieLens items,
    # bf16): within noise of PEFT's forward (+-5%): the LoRA terms are a small part of a step there.
    fast_lora: bool | None = None
    # "auto": eager attention on CPU for rows up to 1024 tokens. SDPA's CPU flash kernel is slow for
    # training (measured: a bf16 step 1.5x slower); eager's score matrices are small at these lengths.
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    # The loss through llama_forward (the prefix and the rows in one matrix per projection, the last layer on
    # the answer positions only, LoRA A matmuls shared) instead of HF's modules: the same loss and gradients.
    # On where it can run: the models it supports, unpacked rows, and dropout off or shared (fast_dropout).
    fused_forward: bool = True
    # LoRA in the model's last `top_layers` decoder layers only (0: every layer). Below the lowest adapted
    # layer nothing needs a gradient, so the backward pass stops there.
    top_layers: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1 or self.max_seq_len < 2 or self.min_steps < 0:
            raise ValueError("rank, epochs, batch_size must be >= 1, min_steps >= 0 and max_seq_len >= 2")
        if not self.target_modules or not 0.0 <= self.warmup_ratio < 1.0 or self.lr <= 0:
            raise ValueError("need target modules, 0 <= warmup_ratio < 1 and lr > 0")
        if not 0.0 <= self.dropout < 1.0 or self.alpha <= 0 or self.max_grad_norm <= 0:
            raise ValueError("need 0 <= dropout < 1, alpha > 0 and max_grad_norm > 0")
        if self.top_layers < 0:
            raise ValueError("top_layers must be >= 0 (0: every layer)")

    def epochs_for(self, examples: int) -> int:
        """Epochs actually run: `epochs`, or more until `min_steps` optimizer steps are reached."""
        per_epoch = math.ceil(examples / self.batch_size)
        return max(self.epochs, math.ceil(self.min_steps / per_epoch)) if per_epoch else self.epochs

    @classmethod
    def from_settings(cls, settings: Settings, *, stage: Literal["user", "shared"]) -> LoraTrainConfig:
        """OPPU stage 2 (a user's LoRA) or stage 1 (the shared task LoRA) as the settings configure it."""
        s = settings
        base = cls.shared_default() if stage == "shared" else cls.user_default()
        base = replace(
            base,
            batch_size=s.train_batch_size,
            max_seq_len=s.train_max_seq_len,
            seed=s.train_seed,
            mixed_precision=_MIXED_PRECISION[s.dtype],  # type: ignore[arg-type]
        )
        if stage == "shared":
            return replace(base, lr=s.train_shared_lr, epochs=s.train_shared_epochs, min_steps=s.train_shared_min_steps)
        return replace(
            base,
            rank=s.train_user_rank,
            alpha=s.train_user_alpha,
            target_modules=tuple(s.train_user_target_modules),
            lr=s.train_user_lr,
            epochs=s.train_user_epochs,
            min_steps=s.train_user_min_steps,
            top_layers=s.train_user_top_layers,
        )

    @classmethod
    def shared_default(cls) -> LoraTrainConfig:
        """OPPU stage 1 (the task LoRA over all users): q/k/v, 3 epochs."""
        return cls(target_modules=SHARED_LORA_TARGETS, rank=SHARED_LORA_RANK, alpha=SHARED_LORA_ALPHA, epochs=3)

    @classmethod
    def user_default(cls) -> LoraTrainConfig:
        """OPPU stage 2 (one LoRA per user). Paper values, tuned for 7B models: raise lr for small ones."""
        return cls()


@dataclass(frozen=True)
class TrainOutput:
    files: dict[str, bytes]  # the PEFT adapter files, ready for the adapter store
    steps: int
    examples: int
    final_loss: float  # mean step loss of the last epoch
    seconds: float
    tokens: int = 0  # non-padding tokens processed (all epochs)
    padded_tokens: int = 0  # tokens including padding: (rows x batch width) summed over steps
    epoch_losses: tuple[float, ...] = ()
    compute_dtype: str = "float32"  # "bfloat16" when trained under autocast
    epochs: int = 0  # epochs run (min_steps may add some to the configured ones)


def encode_example(
    tokenizer: Any, example: TrainExample, stop_ids: frozenset[int], max_seq_len: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels): the served prompt then the target; the loss is on the target tokens only.

    Too long: the target keeps what the prompt leaves, but at least half of `max_seq_len` (its start); the
    prompt is fitted to the rest as serving fits one (`_fit_prompt`), never by cutting its template off.
    """
    prompt = encode_prompt(tokenizer, example.prompt)
    room = min(max_seq_len - 1, max(max_seq_len // 2, max_seq_len - len(prompt)))
    target = encode_target(tokenizer, example.target, stop_ids)[:room]
    if len(prompt) + len(target) > max_seq_len:
        prompt = _fit_prompt(tokenizer, example, max_seq_len - len(target))
    return [*prompt, *target], [IGNORE] * len(prompt) + target


def _fit_prompt(tokenizer: Any, example: TrainExample, budget: int) -> list[int]:
    """The example's prompt within `budget` tokens: with less context, by serving's rule (the lowest-ranked
    retrieved items, then the profile); if the request alone is still too long, its start is cut inside the
    user turn (the chat template around it is kept, and its newest words)."""
    parts = example.parts
    for text in parts.levels()[1:] if parts is not None else []:
        ids = encode_prompt(tokenizer, text)
        if len(ids) <= budget:
            return ids
    request = parts.request if parts is not None else example.prompt
    words = tokenizer.encode(request, add_special_tokens=False)
    ids, kept = encode_prompt(tokenizer, request), len(words)
    while len(ids) > budget and kept > 0:
        kept = max(0, kept - (len(ids) - budget))
        ids = encode_prompt(tokenizer, tokenizer.decode(words[len(words) - kept :]))
    return ids[len(ids) - budget :] if len(ids) > budget else ids  # a template longer than the budget itself


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads one batch to its own longest row (dynamic padding); padding is masked and unlabelled."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: Sequence[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packs one batch into rows of up to max_len tokens (first fit, longest first). Position ids restart at
    every example and there is no 2-D attention mask, so the model's masking keeps examples apart (block
    diagonal); padding is only the tail of the shorter packed rows, unlabelled, each pad its own block."""
    bins: list[list[int]] = []
    sizes: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        n = len(rows[i][0])
        slot = next((b for b, size in enumerate(sizes) if size + n <= max_len), None)
        if slot is None:
            bins.append([i])
            sizes.append(n)
        else:
            bins[slot].append(i)
            sizes[slot] += n
    width = max(sizes)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            row_ids, row_labels = rows[i]
            n = len(row_ids)
            ids[r, at : at + n] = torch.tensor(row_ids)
            labels[r, at : at + n] = torch.tensor(row_labels)
            positions[r, at : at + n] = torch.arange(n)
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def epoch_batches(lengths: Sequence[int], config: LoraTrainConfig, gen: torch.Generator) -> list[list[int]]:
    """One epoch's batches of example indices: seeded shuffle, optionally grouped by length."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    size = config.batch_size
    if not config.group_by_length:
        return [order[i : i + size] for i in range(0, len(order), size)]
    mega = size * 50  # as HF: sort within shuffled mega-batches, then shuffle the batches themselves
    batches: list[list[int]] = []
    for m in range(0, len(order), mega):
        chunk = sorted(order[m : m + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def autocast_dtype(config: LoraTrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast forward/backward to, or None for plain fp32 (fp16 would need loss scaling)."""
    if config.mixed_precision == "no":
        return None
    if config.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if choose_dtype("auto", device).dtype == torch.bfloat16 else None


def _first_target(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))


def shared_prefix(rows: Sequence[tuple[list[int], list[int]]]) -> int:
    """How many first tokens can run once for the whole batch: the rows' common prefix, ending before the
    position whose output predicts any row's first target token. 0 below MIN_SHARED_PREFIX or for one row."""
    if len(rows) < 2:
        return 0
    first = rows[0][0]
    n = min(_first_target(labels) for _, labels in rows) - 1
    for ids, _ in rows[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return n if n >= MIN_SHARED_PREFIX else 0


def target_loss(model: Any, batch: dict[str, torch.Tensor], prefix: int = 0) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of a batch, for a PEFT-wrapped causal LM. `prefix`: the
    first tokens are the same in every row (see shared_prefix) and run once, their cache repeated per row."""
    base = model.get_base_model()
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return model(**batch, use_cache=False).loss  # type: ignore[no-any-return]
    # Same loss as the model's own, but the vocab projection (49k wide) runs on target positions only
    # instead of every prompt token: the prompt is most of each row, the head a fifth of the FLOPs.
    decoder, ids, labels = base.get_decoder(), batch["input_ids"], batch["labels"]
    if prefix > 0:
        from transformers import DynamicCache

        # The cache goes in positionally: transformers 4 names that argument past_key_values, 5 cache.
        cache = DynamicCache()
        decoder(ids[:1, :prefix], None, None, cache, use_cache=True)
        cache.batch_repeat_interleave(ids.shape[0])  # differentiable: the prefix gets every row's gradient
        positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        # The mask covers prefix + rest (all ones over the prefix); padding stays masked.
        out = decoder(ids[:, prefix:], batch.get("attention_mask"), positions, cache, use_cache=True)
        hidden = out.last_hidden_state
        labels = labels[:, prefix:]
    else:
        hidden = decoder(
            input_ids=ids,
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
    labels = labels[:, 1:]
    keep = labels != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep])


class SharedInputDropout(torch.nn.Module):
    """LoRA dropout whose mask costs a quarter of bernoulli_'s random draws (16 bits per element, p rounded
    to 1/32768), and which hands the SAME dropped tensor to every projection that reads the same input
    (PEFT calls q, k and v with one hidden-state tensor). Each projection still sees its input dropped at
    rate p, scaled by 1/(1-p); only the masks of projections reading one tensor are now the same.

    With `fold` (set when the fast LoRA forward reads `scale()`), the 1/(1-p) is left to the consumer, which
    applies it to the rank-r intermediate: one elementwise pass over the input fewer, forward and backward."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = round(p * 32768)
        self.fold = False
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def scale(self) -> float:
        """The factor the consumer still owes the output (1.0 unless folded and active)."""
        return 32768 / (32768 - self.threshold) if self.fold and self.training and self.threshold else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        # The mask in x's dtype, then one multiply: cheaper forward and backward than masked_fill (a copy and
        # a fill) or a bool mask (promoted on every use).
        keep = ((draws.view(torch.int16)[:n].view(x.shape) & 0x7FFF) >= self.threshold).to(x.dtype)
        out = x * keep
        if not self.fold:  # a scale in a bf16 mask would round; on the product it is applied in fp32
            out = out * (32768 / (32768 - self.threshold))
        self._last = (x, out)
        return self._last[1]

    def clear(self) -> None:
        self._last = None


def _fast_lora_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA Linear forward for one plain adapter ("default", no bias, no variant, not merged), with the
    scale on the (tokens x r) intermediate and the residual add inside addmm."""
    result = module.base_layer(x)
    dropout = module.lora_dropout["default"]
    h = module.lora_A["default"](dropout(x))
    scale = module.scaling["default"] * (dropout.scale() if isinstance(dropout, SharedInputDropout) else 1.0)
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        (h * scale).reshape(-1, h.shape[-1]),
        module.lora_B["default"].weight.t(),
    )
    return flat.view(result.shape)


def _fast_loras(peft_model: Any, config: LoraTrainConfig, can_run: bool) -> int:
    """Installs _fast_lora_forward on every LoRA Linear (instance attribute: the saved files and the module
    tree are PEFT's own) and folds the shared dropouts' scale into it. All or none: one module left on PEFT's
    forward would miss the folded scale. Returns how many were installed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not (can_run if config.fast_lora is None else config.fast_lora):
        return 0
    loras = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    plain = all(
        type(m) is LoraLinear
        and list(m.lora_A) == ["default"]
        and not m.lora_variant
        and m.lora_B["default"].bias is None
        and not m.merged
        for m in loras
    )
    if not plain:
        return 0
    for module in loras:
        module.forward = functools.partial(_fast_lora_forward, module)
        dropout = module.lora_dropout["default"]
        if isinstance(dropout, SharedInputDropout):
            dropout.fold = True
    return len(loras)


def _private_copy(model: Any) -> Any:
    """A copy of the module tree for training: LoRA layers, train mode and dropout never reach the caller's
    model. The frozen base weights are only read while training, so the copy shares their storage (new
    Parameter objects: requires_grad and PEFT's wrapping stay on the copy) instead of cloning 135M weights
    per user; every caller trains on a model of its own that nothing writes meanwhile (jobs/context, eval)."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _wrap(model: Any, config: LoraTrainConfig, device: torch.device) -> tuple[Any, list[SharedInputDropout]]:
    from peft import LoraConfig, get_peft_model

    work = _private_copy(model)
    work.requires_grad_(False)
    attn = config.attn_implementation
    if attn == "auto" and device.type == "cpu" and config.max_seq_len <= 1024:
        attn = "eager"
    if attn != "auto" and hasattr(work, "set_attn_implementation"):
        work.set_attn_implementation(attn)
    n_layers = int(work.config.num_hidden_layers)
    layers = list(range(max(0, n_layers - config.top_layers), n_layers)) if config.top_layers else None
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
        target_modules=list(config.target_modules), task_type="CAUSAL_LM", layers_to_transform=layers,
    )  # fmt: skip
    peft_model = get_peft_model(work, lora)
    amp = autocast_dtype(config, device) is not None
    dropouts = _fast_dropouts(peft_model, config, amp)
    fp32 = all(p.dtype == torch.float32 for p in work.parameters())
    _fast_loras(peft_model, config, amp or fp32)  # after the dropouts: it folds their scale
    return peft_model, dropouts


def _fast_dropouts(peft_model: Any, config: LoraTrainConfig, autocast: bool) -> list[SharedInputDropout]:
    """Swaps PEFT's dropouts for SharedInputDropout, one per parent module (an attention or MLP block).
    Under autocast the LoRA input is no longer cast to fp32 first (autocast runs the LoRA matmuls in bf16
    anyway): the cast cost a copy per projection and gave each projection a different input tensor."""
    if not config.fast_dropout or config.dropout == 0.0:
        return []
    shared: dict[str, SharedInputDropout] = {}
    for name, module in peft_model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or "default" not in dropouts:
            continue
        parent = name.rsplit(".", 1)[0]
        dropouts["default"] = shared.setdefault(parent, SharedInputDropout(config.dropout))
        if autocast:
            module.cast_input_dtype_enabled = False
    return list(shared.values())


def _save(peft_model: Any, base_model_name: str) -> dict[str, bytes]:
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name
    # PEFT writes the files to a folder: a memory-backed one where there is (the weights are user data).
    with tempfile.TemporaryDirectory(prefix="oppu-lora-", dir=memory_dir()) as tmp:
        # False: we never train embeddings, and "auto" would look the base model up on the Hub.
        peft_model.save_pretrained(tmp, save_embedding_layers=False)
        return {name: (Path(tmp) / name).read_bytes() for name in sorted(PEFT_FILES)}


def train_lora(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TrainExample],
    config: LoraTrainConfig,
    *,
    base_model_name: str,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutput:
    """Trains a fresh LoRA on `examples` and returns its PEFT files; `model` itself is left untouched.

    Deterministic for a seed on a given device: LoRA init, dropout and shuffling all draw from RNGs seeded
    by `config.seed`, inside `fork_rng` so the caller's global RNG state is not disturbed either.
    """
    if not examples:
        raise ValueError("no training examples")
    started = time.perf_counter()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model.config)
    rows = [encode_example(tokenizer, ex, stop_ids, config.max_seq_len) for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    config = replace(config, epochs=config.epochs_for(len(rows)))
    total = math.ceil(len(rows) / config.batch_size) * config.epochs
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        peft_model, dropouts = _wrap(model, config, device)
        try:
            epoch_losses, tokens, padded = _optimise(
                peft_model, rows, pad_id, config, device, total, progress, should_stop, dropouts
            )
            files = _save(peft_model, base_model_name)
        finally:
            del peft_model  # the copy and its optimiser state go now, not at the next gc
            release_pool()  # an idle OpenMP pool of this thread would slow the engine's steps
    return TrainOutput(
        files=files,
        steps=total,
        examples=len(rows),
        final_loss=epoch_losses[-1],
        seconds=time.perf_counter() - started,
        tokens=tokens,
        padded_tokens=padded,
        epoch_losses=tuple(epoch_losses),
        epochs=config.epochs,
        compute_dtype=str(autocast_dtype(config, device) or torch.float32).removeprefix("torch."),
    )


def _fused(peft_model: Any, config: LoraTrainConfig) -> bool:
    """Whether the step's loss goes through llama_forward (see LoraTrainConfig.fused_forward)."""
    usable = not config.pack and (config.dropout == 0.0 or config.fast_dropout)
    if not config.fused_forward or not usable:
        return False
    return llama_forward.supports(peft_model.get_base_model())


def _optimise(
    peft_model: Any,
    rows: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    config: LoraTrainConfig,
    device: torch.device,
    total: int,
    progress: Callable[[float], None] | None,
    should_stop: Callable[[], bool] | None,
    dropouts: Sequence[SharedInputDropout] = (),
) -> tuple[list[float], int, int]:
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in peft_model.parameters() if p.requires_grad]
    # fused: one kernel over all LoRA tensors instead of ~10 ops per tensor per step (same update rule).
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    sched = get_linear_schedule_with_warmup(optim, math.ceil(total * config.warmup_ratio), total)
    gen = torch.Generator().manual_seed(config.seed)
    lengths = [len(ids) for ids, _ in rows]
    amp = autocast_dtype(config, device)
    loss_of = llama_forward.target_loss if _fused(peft_model, config) else target_loss
    peft_model.train()
    step, tokens, padded, epoch_losses = 0, 0, 0, []
    for _ in range(config.epochs):
        losses: list[float] = []
        for idx in epoch_batches(lengths, config, gen):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"stopped after {step} of {total} steps")
            chosen = [rows[i] for i in idx]
            packed = collate_packed(chosen, config.max_seq_len, pad_id) if config.pack else collate(chosen, pad_id)
            prefix = shared_prefix(chosen) if config.share_prefix and not config.pack else 0
            batch = {k: v.to(device) for k, v in packed.items()}
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                loss = loss_of(peft_model, batch, prefix)
            torch.autograd.backward(loss)
            for dropout in dropouts:
                dropout.clear()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += sum(lengths[i] for i in idx)
            padded += batch["input_ids"].numel()
            step += 1
            if progress is not None:
                progress(step / total)
        epoch_losses.append(sum(losses) / len(losses))
    return epoch_losses, tokens, padded
