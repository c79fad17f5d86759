"""The answer-token loss of a PEFT-wrapped llama-family decoder in fewer, larger ops than HF's modules.

Owns one training forward: the layer math of a llama decoder (RMSNorm, rotary, grouped-query attention,
SwiGLU MLP) over the flat tokens of one step, reading the frozen weights and the LoRA weights of the PEFT
modules in place. It returns what trainer.target_loss returns, rounding aside (tests compare loss and
gradients), and knows nothing of batching policy, optimisers, jobs or adapter files.

Where the time goes otherwise (a 2-core CPU, 100 MovieLens items, fp32): the shared prompt start ran as a
separate forward of ~40 tokens per step, so every projection of every layer ran twice, once at a matrix
height where the CPU reaches half its rate; the last layer computed queries, output projection and MLP for
every prompt token though only the answer positions reach the loss; each LoRA projection read its input
with two small matmuls of its own; RMSNorm and rotary were ~15 autograd elementwise passes each. Here the
prefix and the rows' tokens go through each projection as one matrix, the last layer works on the answer
positions only (keys and values still for every token), the LoRA projections that read one input share one
down-projection matmul, and RMSNorm and rotary have their input gradients written out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of positions that carry no loss (prompt and padding), in both losses' batches
_CONFIG_REQUIREMENTS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def supports(base_model: Any) -> bool:
    """Whether this forward reproduces the model's own: plain llama layers (no biases, SiLU, no attention
    dropout, default or scaled rotary through the model's own rotary module)."""
    config = getattr(base_model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return False
    if any(getattr(config, key, value) != value for key, value in _CONFIG_REQUIREMENTS.items()):
        return False
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return False
    head = base_model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return False
    decoder = base_model.get_decoder()
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    return all(hasattr(decoder, name) for name in needed) and all(
        hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in decoder.layers
    )


_Lora = tuple[torch.Tensor, torch.Tensor, float, Any]  # A [r, in], B [out, r], scaling, the input's dropout


def _parts(module: Any) -> tuple[torch.Tensor, _Lora | None]:
    """(frozen weight, its LoRA or None) of a Linear or a PEFT LoRA Linear ("default" adapter)."""
    if hasattr(module, "base_layer"):
        lora = (
            module.lora_A["default"].weight,
            module.lora_B["default"].weight,
            float(module.scaling["default"]),
            module.lora_dropout["default"],
        )
        return module.base_layer.weight, lora
    return module.weight, None


def _project(x: torch.Tensor, modules: Sequence[Any]) -> list[torch.Tensor]:
    """Each module's output for one 2-D input. The LoRA modules among them share one dropped input (the
    SharedInputDropout contract) and one matmul with their A matrices stacked; each B is an addmm onto its
    frozen output, the scale (and dropout's folded 1/(1-p)) as addmm's alpha."""
    parts = [_parts(m) for m in modules]
    outs = [F.linear(x, weight) for weight, _ in parts]
    loras = [(i, lora) for i, (_, lora) in enumerate(parts) if lora is not None]
    if not loras:
        return outs
    dropout = loras[0][1][3]
    dropped = dropout(x)
    fold = dropout.scale() if hasattr(dropout, "scale") else 1.0
    stacked = F.linear(dropped, torch.cat([a for _, (a, _, _, _) in loras]) if len(loras) > 1 else loras[0][1][0])
    at = 0
    for i, (a, b, scale, _) in loras:
        rank = a.shape[0]
        h = stacked[:, at : at + rank] if len(loras) > 1 else stacked
        outs[i] = torch.addmm(outs[i], h, b.t(), alpha=scale * fold)
        at += rank
    return outs


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm with a frozen weight (variance in fp32, weight applied in the input dtype) and its input
    gradient written out: dx = r (g w - x^ mean(g w x^)). Autograd's own graph of it was ~10 elementwise
    passes backward; this is 4 (a third of the time at 600 x 576). A bf16 input is saved as it is (half the
    memory of the fp32 x^, which backward recomputes). Autocast is off inside: it runs vecdot in bf16, and
    HF's variance is fp32 (the bf16 variance also cost two casts each way)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            x = h.to(torch.float32)
            r = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps))
            normed = x * r
            ctx.save_for_backward(normed if h.dtype == torch.float32 else h, r, weight)
            return weight * normed.to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        saved, r, weight = ctx.saved_tensors
        with torch.autocast(saved.device.type, enabled=False):
            normed = saved if saved.dtype == torch.float32 else saved.to(torch.float32) * r
            gw = (grad * weight).to(torch.float32)
            mean = torch.linalg.vecdot(gw, normed).unsqueeze(-1).div_(normed.shape[-1])
            return torch.addcmul(gw, normed, mean, value=-1).mul_(r).to(grad.dtype), None, None


_apply_rms_norm: Callable[..., torch.Tensor] = _RMSNorm.apply


def _rms_norm(module: Any, h: torch.Tensor) -> torch.Tensor:
    """Through _RMSNorm while the norm's weight is frozen (always, in LoRA training); a trainable weight needs
    its gradient, which _RMSNorm does not compute, so the module's own forward runs then."""
    if not module.weight.requires_grad:
        return _apply_rms_norm(h, module.weight, module.variance_epsilon)
    out: torch.Tensor = module(h)
    return out


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


class _Rotary(torch.autograd.Function):
    """Rotary embedding as x cos + swap(x) sin', sin' = sin with its first half negated (HF's rotate_half
    folded into the sine), and the input gradient g cos + swap(g) swap(sin'): 3 passes each way instead of
    autograd's ~5 forward and ~9 backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return torch.addcmul(x * cos, _swap_halves(x), signed_sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, signed_sin = ctx.saved_tensors
        return torch.addcmul(grad * cos, _swap_halves(grad), _swap_halves(signed_sin)), None, None


_apply_rotary: Callable[..., torch.Tensor] = _Rotary.apply


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [tokens, heads, head_dim] with per-token cos/sin' [tokens, 1, head_dim]."""
    return _apply_rotary(x, cos, signed_sin)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Eager grouped-query attention of queries already scaled by 1/sqrt(d). q [b, T, Hq, d]; k, v [b, S, Hkv,
    d]; bias [b, T, S] (0 or the dtype's min). Each KV head's query heads go in as one matrix of queries: K and
    V are never repeated per head. Returns [b * T, Hq * d]."""
    b, t, heads, d = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    groups = heads // kv_heads
    qh = q.reshape(b, t, kv_heads, groups, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * t, d)
    scores = torch.matmul(qh, k.permute(0, 2, 3, 1)).view(b, kv_heads, groups, t, s) + bias[:, None, None]
    # Softmax in the scores' dtype: the CPU kernel accumulates bf16 in fp32 and rounds once, as HF's fp32
    # softmax then .to(bf16) does, without its casts forward and backward (bf16 attention: 4.5 -> 2.7 ms).
    probs = torch.softmax(scores, dim=-1).view(b, kv_heads, groups * t, s)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3)).view(b, kv_heads, groups, t, d)
    return out.permute(0, 3, 1, 2, 4).reshape(b * t, heads * d)


@dataclass(frozen=True)
class _Layout:
    """One step's flat tokens: the prefix once, then every row's remaining `rest` tokens (padding included,
    masked as keys), and what each layer needs of that layout."""

    rows: int
    rest: int
    prefix: int
    heads: int
    kv_heads: int
    head_dim: int
    cos: torch.Tensor  # [tokens, 1, head_dim]
    signed_sin: torch.Tensor
    q_cos: torch.Tensor  # the queries' rotation also carries attention's 1/sqrt(d): no multiply of the scores
    q_signed_sin: torch.Tensor
    row_bias: torch.Tensor  # [rows, rest, prefix + rest]: the prefix always visible, causal in the row, no padding
    prefix_bias: torch.Tensor  # [1, prefix, prefix]: causal
    chosen: torch.Tensor  # flat indices of the tokens whose next token is a target
    row_of: torch.Tensor  # their row
    at: torch.Tensor  # their position in the row's rest


def _layout(
    decoder: Any, config: Any, h: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, prefix: int
) -> _Layout:
    rows, width = valid.shape
    rest, device = width - prefix, h.device
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    positions = torch.cat(
        [torch.arange(prefix, device=device), torch.arange(prefix, width, device=device).repeat(rows)]
    )
    cos, sin = decoder.rotary_emb(h, positions[None])
    half = head_dim // 2
    cos, sin = cos[0, :, None], torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)
    scaling = decoder.layers[0].self_attn.scaling
    low = torch.finfo(h.dtype).min
    causal = torch.ones(rest, rest, dtype=torch.bool, device=device).tril()
    row_keys = torch.cat([torch.ones(rows, rest, prefix, dtype=torch.bool, device=device),
                          causal[None] & valid[:, None, prefix:]], dim=2)  # fmt: skip
    prefix_keys = torch.ones(1, prefix, prefix, dtype=torch.bool, device=device).tril()
    row_of, at = keep.nonzero(as_tuple=True)
    return _Layout(
        rows=rows, rest=rest, prefix=prefix, heads=heads, kv_heads=config.num_key_value_heads, head_dim=head_dim,
        cos=cos, signed_sin=sin, q_cos=cos * scaling, q_signed_sin=sin * scaling,
        row_bias=torch.zeros(row_keys.shape, dtype=h.dtype, device=device).masked_fill_(~row_keys, low),
        prefix_bias=torch.zeros(prefix_keys.shape, dtype=h.dtype, device=device).masked_fill_(~prefix_keys, low),
        chosen=prefix + row_of * rest + at, row_of=row_of, at=at,
    )  # fmt: skip


def _attention(attn: Any, x: torch.Tensor, lay: _Layout, last: bool) -> torch.Tensor:
    """The attention block's output (before the residual): for every flat token, or in the last layer for
    the chosen tokens only (their queries; keys and values of every token)."""
    p, heads, d = lay.prefix, lay.heads, lay.head_dim
    if last:
        k, v = _project(x, [attn.k_proj, attn.v_proj])
        (q,) = _project(x[lay.chosen], [attn.q_proj])
        q = _rotate(q.view(-1, heads, d), lay.q_cos[lay.chosen], lay.q_signed_sin[lay.chosen])
    else:
        q, k, v = _project(x, [attn.q_proj, attn.k_proj, attn.v_proj])
        q = _rotate(q.view(-1, heads, d), lay.q_cos, lay.q_signed_sin)
    k = _rotate(k.view(-1, lay.kv_heads, d), lay.cos, lay.signed_sin)
    v = v.view(-1, lay.kv_heads, d)
    by_row = (lay.rows, lay.rest, lay.kv_heads, d)
    k_rows = torch.cat([k[None, :p].expand(lay.rows, -1, -1, -1), k[p:].view(by_row)], 1)
    v_rows = torch.cat([v[None, :p].expand(lay.rows, -1, -1, -1), v[p:].view(by_row)], 1)
    if last:
        bias = lay.row_bias[lay.row_of, lay.at][:, None]
        out = _attend(q[:, None], k_rows[lay.row_of], v_rows[lay.row_of], bias)
    else:
        out = _attend(q[p:].view(lay.rows, lay.rest, heads, d), k_rows, v_rows, lay.row_bias)
        if p:
            out = torch.cat([_attend(q[None, :p], k[None, :p], v[None, :p], lay.prefix_bias), out])
    (o,) = _project(out, [attn.o_proj])
    return o


def target_loss(peft_model: Any, batch: dict[str, torch.Tensor], prefix: int = 0) -> torch.Tensor:
    """Mean cross-entropy over the target tokens, as trainer.target_loss (same batch and prefix contract:
    right-padded rows whose first `prefix` tokens are the same in every row)."""
    base = peft_model.get_base_model()
    decoder = base.get_decoder()
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    h = decoder.embed_tokens(torch.cat([ids[0, :prefix], ids[:, prefix:].reshape(-1)]))
    # Row token t predicts label t + 1; the prefix predicts no target (shared_prefix ends before the first).
    keep = labels[:, prefix + 1 :] != IGNORE
    lay = _layout(decoder, base.config, h, valid, keep, prefix)
    for index, layer in enumerate(decoder.layers):
        last = index == len(decoder.layers) - 1  # only the answer positions' queries, o_proj and MLP count
        h = (h[lay.chosen] if last else h) + _attention(layer.self_attn, _rms_norm(layer.input_layernorm, h), lay, last)
        mlp = layer.mlp
        gate, up = _project(_rms_norm(layer.post_attention_layernorm, h), [mlp.gate_proj, mlp.up_proj])
        (down,) = _project(F.silu(gate) * up, [mlp.down_proj])
        h = h + down
    head = base.get_output_embeddings()
    # (W h^T)^T: the vocabulary matrix as the left operand ran ~1.4x faster at these few rows, both ways.
    logits = torch.mm(head.weight, _rms_norm(decoder.norm, h).t()).t()
    # fp32 and row-major in one copy: .float() keeps the transposed layout, over whose strided rows the loss
    # forward and backward took 4.5 ms against 3.9 (32 x 49152, bf16 AMX box).
    rows = logits.to(torch.float32, memory_format=torch.contiguous_format)
    return F.cross_entropy(rows, labels[:, prefix + 1 :][keep])
