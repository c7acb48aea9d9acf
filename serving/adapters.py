"""The adapters the engine serves, and the one that answers now.

Promotion: validate the checkpoint (files, base model, protocol, rank, a configuration vLLM can
serve) → load it under a new LoRA id → warm it with one request → record the promotion in storage
(refused, 409, when the checkpoint was rejected meanwhile: storage compares and sets; the adapter
is unloaded again) → switch ``current`` (one assignment: a request reads it once, so each answer
comes wholly from one adapter) → unload adapters older than the previous one (kept for a fast
rollback).

Rollback: what storage's history says served before the current checkpoint was put in place
(``storage.promotions.rollback_target``), loaded and warmed the same way, recorded, switched.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as DbEngine

from core.enums import CheckpointStatus
from core.errors import Conflict, NotFound
from core.protocol import PROTOCOL_VERSION, Message, PromptFrame, render_prompt
from serving.engine import AdapterRefused, Engine
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.evaluations import current_promotion
from storage.models import Checkpoint
from storage.promotions import (
    RollbackTo,
    record_promotion,
    rollback_target,
    serving_history,
    serving_name,
)

log = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "meta.json")


@dataclass(frozen=True)
class LoadedAdapter:
    lora_id: int
    checkpoint_id: int
    path: Path
    meta: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return f"checkpoint-{self.checkpoint_id}"

    @property
    def labels(self) -> list[str] | None:
        return self.meta.get("labels")

    @property
    def frame(self) -> PromptFrame:
        return PromptFrame.from_dict(self.meta.get("prompt_frame") or {})


def _build(name: str | None) -> str:
    return f"build {name}" if name else "an unrecorded (older) build"


class AdapterRegistry:
    def __init__(
        self,
        engine: Engine,
        *,
        db: DbEngine,
        store: ArtifactStore,
        base_model: str,
        max_lora_rank: int,
        tokenizer: Any,
        base_build: str | None = None,
    ) -> None:
        self.engine = engine
        self.db = db
        self.store = store
        self.base_model = base_model
        self.base_build = base_build  # runner.models.base_model_build: the tiny model's build
        self.max_lora_rank = max_lora_rank
        self.tokenizer = tokenizer
        self.current: LoadedAdapter | None = None
        self.loaded: dict[int, LoadedAdapter] = {}  # by checkpoint id
        self.swaps = 0
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._unservable: set[int | None] = set()  # promoted elsewhere, refused here: not retried

    # Validation ------------------------------------------------------------------------------

    def validate(self, checkpoint_id: int) -> tuple[Checkpoint, Path, dict[str, Any]]:
        """The checkpoint, its folder and meta.json, or AdapterRefused/NotFound saying why not."""
        with new_session(self.db) as session:
            checkpoint = session.get(Checkpoint, checkpoint_id)
        if checkpoint is None:
            raise NotFound(f"no checkpoint {checkpoint_id}")
        if checkpoint.status == CheckpointStatus.rejected:
            by = f" by {checkpoint.decided_by}" if checkpoint.decided_by else ""
            raise AdapterRefused(f"checkpoint {checkpoint_id} was rejected{by}")
        path = self.store.path(checkpoint.path)
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise AdapterRefused(
                f"checkpoint {checkpoint_id} is incomplete: {', '.join(missing)} "
                f"missing in {checkpoint.path}"
            )
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        problems = []
        if meta.get("stage") == "pt":
            problems.append(
                "it is continued pre-training (stage=pt), a base for SFT jobs "
                f"(base=checkpoint-{checkpoint_id}), not a classifier"
            )
        if not meta.get("adapter", True):
            problems.append("it is a whole model (freeze/full), not a LoRA adapter")
        if meta.get("base_model") != self.base_model:
            problems.append(
                f"it was trained on {meta.get('base_model')}, this server runs {self.base_model}"
            )
        elif meta.get("base_build") != self.base_build:
            problems.append(
                f"it was trained on {_build(meta.get('base_build'))} of {self.base_model}, "
                f"this server runs {_build(self.base_build)}"
            )
        if meta.get("protocol_version") != PROTOCOL_VERSION:
            problems.append(
                f"its prompt protocol is version {meta.get('protocol_version')}, "
                f"serving speaks version {PROTOCOL_VERSION}"
            )
        rank = int(config.get("r", 0))
        if rank > self.max_lora_rank:
            problems.append(
                f"its LoRA rank {rank} is above the server's max_lora_rank {self.max_lora_rank}"
            )
        if config.get("use_dora"):
            problems.append("it is a DoRA adapter")
        if config.get("modules_to_save"):
            problems.append(f"it trains modules_to_save {config['modules_to_save']}")
        if config.get("bias", "none") != "none":
            problems.append("it trains biases")
        targets = config.get("target_modules") or []
        if any(t in ("lm_head", "embed_tokens") for t in targets):
            problems.append("it puts LoRA on lm_head or embed_tokens")
        if problems:
            raise AdapterRefused(
                f"checkpoint {checkpoint_id} cannot be served: " + "; ".join(problems)
            )
        return checkpoint, path, meta

    # Loading and switching -------------------------------------------------------------------

    async def _load(self, checkpoint_id: int) -> LoadedAdapter:
        if checkpoint_id in self.loaded:
            return self.loaded[checkpoint_id]
        _, path, meta = self.validate(checkpoint_id)
        adapter = LoadedAdapter(next(self._ids), checkpoint_id, path, meta)
        await self.engine.add_adapter(adapter.lora_id, adapter.name, path)
        try:  # warm it: the first answer after the switch should not pay the load
            prompt = render_prompt(self.tokenizer, adapter.frame.conversation("预热"))
            await self.engine.generate(prompt, max_tokens=1, lora_id=adapter.lora_id)
        except Exception:
            await self.engine.remove_adapter(adapter.lora_id)
            raise
        self.loaded[checkpoint_id] = adapter
        return adapter

    async def _switch(self, target: LoadedAdapter | None) -> None:
        previous = self.current
        self.current = target
        self.swaps += 1
        keep = {a.checkpoint_id for a in (target, previous) if a is not None}
        for checkpoint_id in [c for c in self.loaded if c not in keep]:
            stale = self.loaded.pop(checkpoint_id)
            await self.engine.remove_adapter(stale.lora_id)

    async def promote(self, checkpoint_id: int, *, by: str) -> LoadedAdapter:
        async with self._lock:
            if self.current is not None and self.current.checkpoint_id == checkpoint_id:
                raise Conflict(f"checkpoint {checkpoint_id} is already serving")
            fresh = checkpoint_id not in self.loaded
            adapter = await self._load(checkpoint_id)
            try:
                previous = await asyncio.to_thread(self._storage_target)  # this replica may lag
                # Recorded first: a failed write changes nothing. Off the event loop: the write
                # may wait for a Reject committing on the same row, and requests go on meanwhile.
                # record_promotion refuses a checkpoint rejected since validate() read it.
                await asyncio.to_thread(self._record_promotion, checkpoint_id, previous, by)
            except BaseException:
                if fresh and self.loaded.get(checkpoint_id) is adapter:  # not served: unload it
                    del self.loaded[checkpoint_id]
                    await self.engine.remove_adapter(adapter.lora_id)
                raise
            await self._switch(adapter)
            log.info(
                "promoted checkpoint %d",
                checkpoint_id,
                extra={
                    "event": "promote",
                    "checkpoint_id": checkpoint_id,
                    "lora_id": adapter.lora_id,
                    "by": by,
                    "previous": previous,
                },
            )
            return adapter

    def _record_promotion(self, checkpoint_id: int, previous: int | None, by: str) -> None:
        with new_session(self.db) as session:
            record_promotion(
                session,
                checkpoint_id=checkpoint_id,
                previous_checkpoint_id=previous,
                action="promote",
                decided_by=by,
            )

    def rollback_plan(self, to: RollbackTo = None) -> tuple[int | None, int | None]:
        """(what serves now, what a rollback would serve) as storage records them, or Conflict
        saying why nothing can be rolled back (to ``to``)."""
        with new_session(self.db) as session:
            history = serving_history(session)
        return history.current, rollback_target(history, to)

    async def rollback(
        self, *, by: str, to: RollbackTo = None, expected_current: RollbackTo = None
    ) -> tuple[int | None, LoadedAdapter | None]:
        """Serve what served before the current checkpoint was put in place (``to``: jump to a
        checkpoint, or ``"base"``, that served before). ``expected_current``: refuse (Conflict)
        unless this is what serves now, as the confirmation showed. Returns (the checkpoint left,
        the adapter serving now; None: the base model)."""
        async with self._lock:
            current, target_id = await asyncio.to_thread(self.rollback_plan, to)
            if expected_current is not None:
                expected = None if expected_current == "base" else expected_current
                if expected != current:
                    raise Conflict(
                        f"what serves changed since the rollback was shown: {serving_name(current)} "
                        f"serves now, not {serving_name(expected)}; nothing was rolled back"
                    )
            target = await self._load(target_id) if target_id is not None else None
            if (
                await asyncio.to_thread(self._storage_target) != current
            ):  # another replica, meanwhile
                raise Conflict(
                    "another promotion or rollback was recorded meanwhile; nothing was rolled back"
                )
            with new_session(self.db) as session:  # recorded first: a failed write changes nothing
                record_promotion(
                    session,
                    checkpoint_id=target_id,
                    previous_checkpoint_id=current,
                    action="rollback",
                    decided_by=by,
                )
            await self._switch(target)
            log.info(
                "rolled back from %s to %s by %s",
                serving_name(current),
                serving_name(target_id),
                by,
                extra={
                    "event": "rollback",
                    "checkpoint_id": target_id,
                    "previous": current,
                    "by": by,
                },
            )
            return current, target

    async def sync(self) -> bool:
        """Follow a promotion or rollback made through another replica: serve what storage says
        is current, without recording anything. True when this replica switched."""
        # A database round trip every few seconds: off the event loop, which serves requests.
        if await asyncio.to_thread(self._storage_target) == self._current_id():
            return False
        async with self._lock:  # re-read under the lock: our own promote may be mid-way
            target = self._storage_target()
            if target == self._current_id() or target in self._unservable:
                return False
            try:
                adapter = await self._load(target) if target is not None else None
            except (AdapterRefused, NotFound) as exc:
                self._unservable.add(target)
                log.error("cannot follow the promotion of checkpoint %s: %s", target, exc)
                return False
            await self._switch(adapter)
        log.info(
            "following a change made through another replica: now serving %s",
            f"checkpoint {target}" if target is not None else "the base model",
            extra={"event": "sync", "checkpoint_id": target},
        )
        return True

    def _storage_target(self) -> int | None:
        with new_session(self.db) as session:
            promotion = current_promotion(session)
        return promotion.checkpoint_id if promotion is not None else None

    def _current_id(self) -> int | None:
        return self.current.checkpoint_id if self.current is not None else None

    async def restore(self) -> None:
        """At start: serve what storage says is promoted."""
        with new_session(self.db) as session:
            promotion = current_promotion(session)
        if promotion is None or promotion.checkpoint_id is None:
            return
        try:
            adapter = await self._load(promotion.checkpoint_id)
        except (AdapterRefused, NotFound) as exc:
            log.error(
                "the promoted checkpoint %d cannot be served (%s); serving the base model",
                promotion.checkpoint_id,
                exc,
            )
            return
        self.current = adapter

    def resolve(self, model: str | None) -> LoadedAdapter | None:
        """The adapter a request names: None/"current" → the promoted one, "base" → none,
        "checkpoint-N" → that checkpoint if it is loaded."""
        if model in (None, "", "current"):
            return self.current
        if model == "base" or model == self.base_model:
            return None
        for adapter in self.loaded.values():
            if model in (adapter.name, str(adapter.checkpoint_id)):
                return adapter
        raise NotFound(
            f"model {model!r} is not loaded: use base, current or one of "
            + ", ".join(a.name for a in self.loaded.values())
            if self.loaded
            else f"model {model!r} is not loaded: use base or current"
        )

    def frame(self) -> PromptFrame:
        """How a bare text is framed: the promoted adapter's training frame, so the base model
        and the fine-tuned one are asked exactly the same question."""
        return self.current.frame if self.current is not None else PromptFrame()

    def conversation(self, text: str) -> list[Message]:
        return self.frame().conversation(text)
