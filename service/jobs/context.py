"""JobContext: what job bodies need (settings, the session factory, the store, the queue) and the training
model they share, loaded lazily in the process that trains. Built by the composition root (API process,
`oppu worker`, `oppu train`) and handed in: nothing under service/jobs imports the composition root."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.adapters.peft_format import merge_lora, read_adapter_dir, unmerge
from service.adapters.service import AdapterContext
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.config import Settings
from service.engine.types import AdapterRef
from service.inference.loader import LoadedModel, load_model
from service.jobs.queue import JobQueue
from service.jobs.service import shared_retrainer


@dataclass
class JobContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: AdapterStore
    queue: JobQueue
    on_progress: Callable[[float], None] | None = None  # e.g. a progress bar for `oppu train`
    # A data-key rotation's wait before re-sealing; None: OPPU_KEY_RECHECK_S + a margin (tests shorten it).
    key_settle_s: float | None = None
    # Set when the process shuts down: the running job stops at its next progress check (a training step, a
    # rotation's settle tick) and is left as it was; embedded mode runs it again at the next start.
    stopping: threading.Event = field(default_factory=threading.Event)
    _loaded: LoadedModel | None = None
    _spec: BaseModelSpec | None = None
    _shared: AdapterRef | None = None  # the shared version merged into the training model
    _shared_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # one job trains at a time per process

    def base(self) -> tuple[LoadedModel, BaseModelSpec]:
        if self._loaded is None:
            self._loaded = load_model(self.settings)
            self._spec = BaseModelSpec.from_model(self._loaded.model, self._loaded.name)
        assert self._spec is not None
        return self._loaded, self._spec

    def adapter_context(self) -> AdapterContext:
        _, spec = self.base()
        return AdapterContext(
            store=self.store,
            spec=spec,
            limits=ValidationLimits.from_settings(self.settings),
            keep_versions=self.settings.adapter_keep_versions,
            shared_on_erase=self.settings.shared_on_erase,
            retrain_shared=shared_retrainer(self.queue),
        )

    def training_model(self, shared: AdapterRef | None) -> Any:
        """The base model with the given shared LoRA merged (user LoRAs train on top of it)."""
        loaded, _ = self.base()
        if shared != self._shared:
            unmerge(loaded.model, self._shared_originals)
            self._shared_originals = {}
            self._shared = None  # the plain base now: a read or merge below that fails must not leave the old name
            if shared is not None:
                weights = read_adapter_dir(
                    shared.directory, max_scale=self.settings.adapter_max_scale, seal=shared.seal
                )
                self._shared_originals = merge_lora(loaded.model, weights)
            self._shared = shared
        return loaded.model
