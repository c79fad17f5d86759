"""The builtin engine: continuous batching of mixed-adapter rows on one thread that owns every forward pass.

At every step finished rows leave and waiting rows join (up to the KV lanes and the adapter slots, taken
round-robin over tenants); each row keeps its lane and its adapter slot pinned for its lifetime; prompt
chunks share each step's token budget with the decoding rows. The shared task LoRA is merged into the
base weights once no row is running (new rows wait for it; running rows finish on the weights they began).
A row that fails (unreadable adapter, non-finite logits, sampling error, deadline) ends alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from service.adapters.cache import AdapterCache, SlotsBusy
from service.adapters.peft_format import AdapterWeights, base_linear, merge_lora, read_adapter_dir, unmerge
from service.adapters.slots import LoraSlots
from service.engine.base import EngineFront, EngineLimits, Started
from service.engine.builtin.executor import Executor, head_dim
from service.engine.builtin.kv import KVLanes
from service.engine.builtin.packed import PackedLinears
from service.engine.builtin.sampler import Choice, RowDecoder, choose
from service.engine.builtin.scheduler import Row, Step, plan_step
from service.engine.types import (
    AdapterRef,
    EngineRequest,
    EngineStats,
    Finished,
    FinishReason,
    StepInfo,
    TokenEvent,
)
from service.errors import AdapterUnavailable, GenerationFailed, ServiceError
from service.inference.loader import LoadedModel
from service.inference.threads import release_pool

log = logging.getLogger(__name__)
# How many steps rows for resident adapters may overtake a row that waits for a free adapter slot.
SLOT_WAIT_STEPS = 32


class BuiltinEngine(EngineFront[Row]):
    def __init__(
        self,
        loaded: LoadedModel,
        cache: AdapterCache,
        slots: LoraSlots,
        *,
        max_rows: int,
        max_model_len: int,
        max_batch_tokens: int,
        window_s: float,
        queue_max: int,
        queue_per_tenant: int,
        max_scale: float,
        fair_share: bool = True,
        packed_weights: bool = False,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> None:
        if max_batch_tokens < max_rows:
            raise ValueError("the step token budget must hold one token per row (max_batch_tokens >= rows)")
        super().__init__(
            capacity=max_rows, queue_max=queue_max, queue_per_tenant=queue_per_tenant, fair_share=fair_share
        )
        self._loaded = loaded
        self._cache = cache
        config = loaded.model.config
        self.kv = KVLanes(
            layers=int(config.num_hidden_layers),
            lanes=max_rows,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
            head_dim=head_dim(config),
            capacity=max_model_len,
            device=loaded.device,
            dtype=loaded.dtype,
        )
        self._executor = Executor(loaded.model, self.kv, slots)
        # After the slots wrapped their Linears: the base Linears inside them are packed too.
        self.packed = PackedLinears(loaded.model) if packed_weights else None
        log.info("builtin engine: %s", f"{len(self.packed)} Linears packed" if self.packed else "plain weights")
        self.max_batch_tokens = max_batch_tokens
        self._window_s = window_s
        self._max_scale = max_scale
        self.on_step: list[Callable[[StepInfo], None]] = [on_step] if on_step is not None else []
        self._shared_version: int | None = None
        self._shared_originals: dict[str, torch.Tensor] = {}
        self._pending: tuple[AdapterWeights | None, int | None] | None = None
        self._shared_lock = threading.Lock()
        self._shared_switch = threading.Lock()  # use_shared's calls, one at a time (never held by the engine thread)
        self._shared_read_at = float("-inf")  # when the newest shared version the engine follows was read
        self._slot_blocked = False  # this admission round: a row waits too long for a slot

    # --- identity and capacity ---
    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def context_length(self) -> int:
        return self.kv.capacity

    @property
    def limits(self) -> EngineLimits:
        # a scored continuation runs whole in one step, beside one decode token of every other lane
        return EngineLimits(self.kv.capacity, self.max_batch_tokens - self.kv.lanes + 1)

    @property
    def model(self) -> torch.nn.Module:
        model: torch.nn.Module = self._loaded.model
        return model

    @property
    def cache(self) -> AdapterCache:
        return self._cache

    def stats(self) -> EngineStats:
        running_adapters, waiting_adapters = self._adapter_owners()
        return EngineStats(
            waiting=len(self._waiting),
            running=len(self._running),
            adapter_slots=self._cache.num_slots,
            slots_in_use=len(self._cache.slot_keys()),
            slots_pinned=len(self._cache.pinned()),
            healthy=self.healthy,
            running_adapters=running_adapters,
            waiting_adapters=waiting_adapters,
            extra={"kv_lanes": self.kv.lanes, "kv_lanes_free": self.kv.free, "kv_bytes": self.kv.bytes},
        )

    # --- lifecycle ---
    def start(self) -> None:
        self._apply_shared()  # start-up: no row can run yet
        release_pool()  # the merge ran on the caller's thread: its OpenMP pool goes
        super().start()

    # --- shared task LoRA ---
    @property
    def shared_version(self) -> int | None:
        """The shared version rows will run on once pending changes are applied."""
        with self._shared_lock:
            return self._pending[1] if self._pending is not None else self._shared_version

    @property
    def applied_shared(self) -> tuple[int | None, dict[str, torch.Tensor]]:
        """The shared version merged into the weights now, and the originals of the weights it changed."""
        return self._shared_version, self._shared_originals

    def use_shared(self, adapter: AdapterRef | None, read_at: float | None = None) -> None:
        """The current shared task LoRA (None: none), read from SQL at `read_at` (None: now). Applied before any
        row queued after this call runs; rows already running finish on the weights they started with. The
        newest read wins: a request prepared before a new version's notice does not switch the engine back
        (its row is refused at its start instead: `_start`)."""
        version = adapter.version if adapter is not None else None
        read_at = time.monotonic() if read_at is None else read_at
        # One switch at a time, its weights read inside: once a call returns, the target is its version or a newer
        # read's (a row queued after it never meets a target still unset while another call reads the weights).
        with self._shared_switch:
            with self._shared_lock:
                if read_at < self._shared_read_at:
                    return
                self._shared_read_at = read_at
                if version == (self._pending[1] if self._pending is not None else self._shared_version):
                    return
            weights = None
            if adapter is not None:
                try:
                    weights = read_adapter_dir(adapter.directory, max_scale=self._max_scale, seal=adapter.seal)
                except Exception as exc:  # files pruned or damaged: this request fails with 503, not 500
                    log.warning("shared adapter v%s could not be loaded: %r", version, exc)
                    raise AdapterUnavailable(exc) from exc
            with self._shared_lock:
                self._pending = (weights, version)
        self._wake.set()

    def _apply_shared(self) -> None:
        # Under the lock from start to end: until the merge is done, `shared_version` must keep answering with
        # the pending version, never with the one being replaced.
        with self._shared_lock:
            if self._pending is None:
                return
            weights, version = self._pending
            touched = set(self._shared_originals)
            unmerge(self._loaded.model, self._shared_originals)
            self._shared_originals = merge_lora(self._loaded.model, weights) if weights is not None else {}
            if self.packed is not None:  # the unmerge and the merge changed these weights in place
                touched |= set(self._shared_originals)
                self.packed.refresh(base_linear(self._loaded.model, path) for path in touched)
            # Should any of it raise, _pending stays set: no row joins, and the next tick redoes it all.
            self._shared_version, self._pending = version, None

    # --- adapters ---
    def drop_owner(self, owner_key: str) -> None:
        self._cache.drop_owner(owner_key)

    # --- rows ---
    def _new_row(self, request: EngineRequest, sink: Callable[[object], None]) -> Row:
        if request.adapter is not None:
            self._cache.prefetch(request.adapter)  # disk -> host here, not on the engine's thread (503 if unreadable)
        self.use_shared(request.shared, request.shared_read_at)  # applied before this row runs, if the newest
        return Row(request, sink, RowDecoder.for_params(request.sampling, self._loaded.device))

    def submit(self, row: Row) -> None:
        row.submitted_step = self._steps
        super().submit(row)

    def _has_room(self) -> bool:
        return self.kv.free > 0

    # --- the engine thread ---
    def _tick(self) -> bool:
        """One scheduling iteration; False when there was nothing to run. A pending shared LoRA is merged
        once no row runs; until then no row joins."""
        self._reap()
        if self._pending is not None and not self._running:
            self._apply_shared()
        if self._pending is None:
            if not self._running and len(self._waiting) and self._window_s > 0:
                self._stopping.wait(self._window_s)  # idle: let requests arriving together share the first step
            self._admit()
        return self._step()

    def _step(self) -> bool:
        step = plan_step(self._running, self.max_batch_tokens)
        if step is None:
            return False
        started = time.perf_counter()
        try:
            logits = self._executor.forward(step.batch)
        except Exception as exc:  # a model-level fault: the rows of this step fail, the engine goes on
            log.exception("forward failed for a step of %d rows", len(step.samples))
            self._step_outcome(False)  # before the requesters hear of it
            self._fail_step(step, exc)
            return True
        self._step_outcome(True)
        try:
            generated = self._advance(step, logits)
        except Exception as exc:  # a fault after the forward: this step's rows end (none is left half-advanced)
            log.exception("advancing a step of %d rows failed", len(step.samples))
            self._fail_step(step, exc)
            generated = 0
        self._steps += 1
        self._report(step, generated, time.perf_counter() - started)
        return True

    def _fail_step(self, step: Step, exc: Exception) -> None:
        # A forward that raised may have written K/V in some layers first: its lanes zero those positions too
        # when their rows end below (lanes whose rows already left in this step were zeroed then).
        running = {r.lane for r in self._running}
        for lane, store in zip(step.batch.lanes, step.batch.stores, strict=True):
            if lane in running:
                self.kv.mark_written(lane, store + 1)
        for row in {id(r): r for r in self._step_rows(step)}.values():
            self._end(row, GenerationFailed.internal(exc))

    def _on_admission_round(self) -> None:
        self._slot_blocked = False

    def _went_idle(self) -> None:
        # Its OpenMP pool must not slow another thread's torch work (a training) while it waits. Not done by
        # the vLLM engine: vLLM may have pinned its pool's threads to CPUs, and a new pool would lose that.
        release_pool()

    def _start(self, row: Row) -> Started:
        """A row joins with a KV lane and its adapter pinned in a slot.

        A row waiting for a slot (all pinned) keeps its place; rows behind it whose adapter is already in a
        slot may overtake it (they batch at no cost), but only for SLOT_WAIT_STEPS steps: after that rows
        needing an adapter wait behind it, so that a steady stream of rows for the resident adapters cannot
        keep every slot pinned forever. Rows without an adapter pin nothing and always join."""
        named = row.request.shared.version if row.request.shared is not None else None
        if named != self._shared_version:  # rows join only once no change is pending: this is the current one
            row.sink(AdapterUnavailable("the shared task adapter changed while this request waited"))
            return "dropped"
        if self._slot_blocked and row.request.adapter is not None:
            return "keep"
        try:
            (row.slot,) = self._cache.acquire([row.request.adapter])
        except SlotsBusy:  # every slot is pinned by running rows: it keeps its turn for the next free one
            self._slot_blocked = self._slot_blocked or self._steps - row.submitted_step > SLOT_WAIT_STEPS
            return "keep"
        except Exception as exc:
            log.warning("adapter %s could not be loaded: %r", row.request.adapter, exc)
            # The owner erased meanwhile (410) stays itself; a read that failed otherwise is 503, retry.
            row.sink(exc if isinstance(exc, ServiceError) else AdapterUnavailable(exc))
            return "dropped"
        lane = self.kv.acquire()
        assert lane is not None
        row.lane = lane
        return "started"

    def _advance(self, step: Step, logits: torch.Tensor) -> int:
        for row, n in step.prefilled:
            row.prefilled += n
            row.kv_len += n
        for sample in step.samples:
            if sample.row.decoding and sample.row.output:
                sample.row.kv_len += 1  # its previous token was written this step
        for row, n in step.continued:  # counted before scoring, which may end the row (its lane zeroed to kv_len)
            conts = row.request.continuations[row.next_continuation : row.next_continuation + n]
            row.next_continuation += n
            row.kv_len += sum(len(c) for c in conts)
        self._score(step, logits)
        for row, _ in step.continued:
            if row.scored and row in self._running:
                self._finish(row, "length")
        choices = choose([s.row.decoder for s in step.samples], logits[[s.index for s in step.samples]])
        generated = 0
        for sample, choice in zip(step.samples, choices, strict=True):
            if isinstance(choice, BaseException):
                self._end(sample.row, choice)
                continue
            try:
                generated += self._emit(sample.row, choice)
            except GenerationFailed as exc:  # its grammar refusing the token (its own schema): that row alone ends
                self._end(sample.row, exc)
            except Exception as exc:  # any other fault while recording it: that row alone ends
                log.exception("recording a token failed for one row")
                self._end(sample.row, GenerationFailed.internal(exc))
        for row, _ in step.prefilled:  # a row asking for no tokens at all ends once its prompt is in
            if row.decoding and not row.scoring and row.request.sampling.max_new_tokens == 0:
                self._finish(row, "length")
        return generated

    def _score(self, step: Step, logits: torch.Tensor) -> None:
        """Scoring rows: keep the distribution after the prompt (it scores each continuation's first token);
        record the logprob of every later continuation token."""
        if not step.scores:
            return
        rows = logits[[s.index for s in step.scores]]
        finite = torch.isfinite(rows).all(dim=-1).tolist()
        lps = torch.log_softmax(rows, dim=-1)
        for s, ok, lp in zip(step.scores, finite, lps, strict=True):
            row, conts = s.row, s.row.request.continuations
            if not ok:
                self._end(row, GenerationFailed.non_finite())
            elif row in self._running and s.continuation < 0:
                row.prompt_end_logprobs = lp.clone()
                row.continuation_logprobs = [[float(lp[c[0]])] for c in conts]
            elif row in self._running:
                row.continuation_logprobs[s.continuation].append(float(lp[conts[s.continuation][s.token]]))

    def _emit(self, row: Row, choice: Choice) -> int:
        """Record a sampled token; returns 1 if it was emitted (0 when it ended the row as a stop)."""
        p = row.request.sampling
        row.decoder.observe(choice.token_id)
        if row.first_step is None:
            row.first_step = self._steps
        if choice.token_id in p.stop_token_ids and not p.ignore_eos:
            self._finish(row, "stop")
            return 0
        row.output.append(choice.token_id)
        row.sink(TokenEvent(choice.token_id, choice.logprob, choice.top))
        if len(row.output) >= p.max_new_tokens:
            self._finish(row, "length")
        return 1

    def _finish(self, row: Row, reason: FinishReason) -> None:
        if self._release(row):
            logprobs = tuple(tuple(lps) for lps in row.continuation_logprobs)
            row.sink(Finished(reason, row.prompt_len, logprobs))

    def _release(self, row: Row) -> bool:
        """The row leaves: its lane (zeroed where it wrote) and its slot pin are freed BEFORE the requester
        hears of the end. False if it had left already."""
        if row not in self._running:
            return False
        self.kv.release(row.lane, row.kv_len)
        self._cache.release([row.request.adapter])
        self._running.remove(row)
        return True

    @staticmethod
    def _step_rows(step: Step) -> list[Row]:
        rows = [s.row for s in step.samples] + [s.row for s in step.scores] + [r for r, _ in step.prefilled]
        return rows + [r for r, _ in step.continued]

    def _report(self, step: Step, generated: int, seconds: float) -> None:
        prefill = sum(c.length for c in step.batch.chunks)
        info = StepInfo(
            self._steps, len(step.batch.token_ids), step.batch.n_decode, prefill, generated, len(self._running), seconds
        )
        for hook in self.on_step:
            hook(info)
