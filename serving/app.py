"""The serving API: FastAPI around the engine and the adapter registry.

    GET  /healthz                       no token
    POST /v1/classify, /v1/classify/batch
    GET  /v1/adapters, /v1/adapters/rollback[?to=N|base] (what a rollback would serve)
    POST /v1/adapters/promote, /v1/adapters/rollback {to?, expected_current?} (token required)
    GET  /v1/models;    POST /v1/chat/completions (OpenAI-compatible, streaming too)
    GET  /metrics                       Prometheus

Every endpoint but /healthz takes ``Authorization: Bearer $SERVING_API_KEY`` when the key is set;
promote and rollback refuse to run without one. Domain errors become JSON here and only here.
Request bodies are bounded (``SERVING_MAX_BODY_BYTES``, 413), chat requests by messages and
characters (422, serving/limits.py); prompts are tokenized in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from core.errors import Conflict, FinetuneError, Forbidden, NotFound
from core.label_scoring import (
    AnswerStyle,
    Head,
    empty_head,
    finish,
    plan_scoring,
    read_requests,
    reasoning_head,
)
from core.protocol import Message, parse_answer, render_prompt, render_prompt_text
from core.settings import Settings
from serving.adapters import AdapterRegistry, LoadedAdapter
from serving.engine import AdapterRefused, Engine, build_engine
from serving.limits import BodyLimit, check_chat
from storage.promotions import RollbackTo

log = logging.getLogger(__name__)

STATUS = {NotFound: 404, Conflict: 409, Forbidden: 403, AdapterRefused: 422}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serving_requests_total",
            "Requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "serving_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.adapter = Gauge(
            "serving_current_checkpoint", "Checkpoint id serving (0: base)", registry=self.registry
        )
        self.swaps = Counter(
            "serving_adapter_swaps_total", "Promotions and rollbacks", registry=self.registry
        )


class State:
    def __init__(
        self, settings: Settings, engine: Engine, registry: AdapterRegistry, tokenizer: Any
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = Metrics()


def _state(request: Request) -> State:
    return request.app.state.serving  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(_state)]


def _check_token(state: State, authorization: str | None, *, required: bool) -> None:
    key = state.settings.serving_api_key
    if key is None:
        if required:
            raise Forbidden("promote and rollback need SERVING_API_KEY set on the server")
        return
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


def require_token(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    _check_token(state, authorization, required=False)


def require_admin(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    _check_token(state, authorization, required=True)


Reasoning = Literal["on", "off"]


class ClassifyRequest(BaseModel):
    text: str = Field(description="the text to classify, e.g. a news headline")
    model: str | None = Field(None, description="base, current (default) or checkpoint-N")
    reasoning: Reasoning | None = Field(
        None,
        description="on (default for data with reasoning): think, then score the labels; "
        "off: score the labels right after an empty <think> block (faster)",
    )


class ClassifyBatchRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=256)
    model: str | None = None
    reasoning: Reasoning | None = None


class PromoteRequest(BaseModel):
    checkpoint_id: int
    by: str = Field("api", max_length=32, description="who decided (a Slack user id)")


class RollbackRequest(BaseModel):
    by: str = Field("api", max_length=32)
    to: int | Literal["base"] | None = Field(
        None, description="a checkpoint that served before, or base; default: one step back"
    )
    expected_current: int | Literal["base"] | None = Field(
        None, description="refuse with 409 unless this serves now (what the confirmation showed)"
    )


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False


def _describe(adapter: LoadedAdapter | None) -> dict[str, Any]:
    if adapter is None:
        return {"adapter": None, "checkpoint_id": None}
    return {"adapter": adapter.name, "checkpoint_id": adapter.checkpoint_id}


def _serving(checkpoint_id: int | None) -> dict[str, Any]:
    if checkpoint_id is None:
        return {"adapter": None, "checkpoint_id": None}
    return {"adapter": f"checkpoint-{checkpoint_id}", "checkpoint_id": checkpoint_id}


def _rollback_to(value: str | None) -> RollbackTo:
    if value is None:
        return None
    if value == "base":
        return "base"
    if value.isdigit():
        return int(value)
    raise HTTPException(422, f"to={value!r}: name a checkpoint number or base")


async def classify_one(
    state: State, text: str, adapter: LoadedAdapter | None, reasoning: str | None = None
) -> dict[str, Any]:
    """A checkpoint with a label set answers a label from it with its probability
    (``core.label_scoring``, as evaluation scores it); without one, free text."""
    stripped = text.strip()
    if not stripped:
        raise HTTPException(422, "text is empty: send the headline to classify")
    limit = state.settings.serving_max_text_chars
    if len(stripped) > limit:
        raise HTTPException(
            422, f"text is {len(stripped)} characters; at most {limit} are accepted"
        )
    messages = (adapter.frame if adapter is not None else state.registry.frame()).conversation(
        stripped
    )
    prompt = await asyncio.to_thread(render_prompt, state.tokenizer, messages)  # off the loop
    room = state.settings.serving_max_model_len - len(prompt)
    if room < 8:
        raise HTTPException(
            422,
            f"text is too long: its prompt is {len(prompt)} tokens and the "
            f"model takes {state.settings.serving_max_model_len}",
        )
    started = time.perf_counter()
    lora_id = adapter.lora_id if adapter is not None else None
    source = adapter if adapter is not None else state.registry.current
    labels = source.labels if source is not None else None
    budget = min(state.settings.serving_max_new_tokens, room)
    if labels:
        style = AnswerStyle.from_dict(source.meta.get("answer_style") if source else None)
        answer = await _classify_labels(
            state, messages, prompt, labels, style, reasoning, budget, lora_id
        )
    else:
        completion = await state.engine.generate(prompt, max_tokens=budget, lora_id=lora_id)
        parsed = parse_answer(completion.text)
        answer = {
            "kind": "free_text",
            "answer": parsed.label or completion.text.strip(),
            "label": None,
            "confidence": None,
            "uncertain": None,
            "scores": None,
            "reasoning": parsed.reasoning,
            "truncated": parsed.truncated or not completion.finished,
            "raw": completion.text,
        }
    answer["model"] = _describe(adapter)
    answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return answer


async def _classify_labels(
    state: State,
    messages: list[Message],
    prompt: list[int],
    labels: list[str],
    style: AnswerStyle,
    reasoning: str | None,
    budget: int,
    lora_id: int | None,
) -> dict[str, Any]:
    if reasoning == "on" and not style.reasoning:
        raise HTTPException(
            422, "reasoning=on: this model was trained on answers without reasoning"
        )
    head: Head
    if style.reasoning and reasoning != "off":
        thought = await state.engine.reason(prompt, max_tokens=budget, lora_id=lora_id)
        head = reasoning_head(thought.text, finished_by_close=thought.finished)
    else:
        prompt_text = await asyncio.to_thread(render_prompt_text, state.tokenizer, messages)
        head = empty_head(prompt_text=prompt_text, style=style)
    plan = await asyncio.to_thread(
        plan_scoring, state.tokenizer, prompt, head.text, labels, separator=style.separator
    )
    scored = finish(plan, await state.engine.read(read_requests(plan), lora_id=lora_id))
    threshold = state.settings.serving_min_confidence
    uncertain = threshold is not None and scored.confidence < threshold
    return {
        "kind": "label",
        "answer": "uncertain" if uncertain else scored.label,
        "label": scored.label,
        "confidence": round(scored.confidence, 6),
        "uncertain": uncertain,
        "min_confidence": threshold,
        "scores": scored.scores,
        "reasoning": head.reasoning,
        "reasoning_mode": head.mode,
        "reasoning_cut": head.cut,
    }


async def _follow(state: State, every: float) -> None:
    """Keep this replica on what storage says is promoted (another replica may have changed it)."""
    while True:
        await asyncio.sleep(every)
        try:
            if await state.registry.sync():
                current = state.registry.current
                state.metrics.adapter.set(current.checkpoint_id if current else 0)
                state.metrics.swaps.inc()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("checking storage for promotions failed; trying again in %.0f s", every)


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from runner.models import base_model_build, base_model_name, load_tokenizer, model_dir_for
        from storage.artifacts import ArtifactStore
        from storage.db import make_engine
        from storage.migrate import check_schema

        db = make_engine(settings.db_url)
        check_schema(db)
        model_dir = model_dir_for(settings, base_model_name(settings))
        assert model_dir is not None
        built = engine or build_engine(settings, model_dir)
        tokenizer = load_tokenizer(model_dir)
        registry = AdapterRegistry(
            built,
            db=db,
            store=ArtifactStore(settings.artifact_dir),
            base_model=base_model_name(settings),
            max_lora_rank=settings.serving_max_lora_rank,
            tokenizer=tokenizer,
            base_build=base_model_build(base_model_name(settings)),
        )
        await registry.restore()
        state = State(settings, built, registry, tokenizer)
        state.metrics.adapter.set(registry.current.checkpoint_id if registry.current else 0)
        app.state.serving = state
        log.info(
            "serving %s with %s; current adapter: %s",
            base_model_name(settings),
            built.backend,
            registry.current.name if registry.current else "none (base)",
        )
        follower = (
            asyncio.create_task(_follow(state, settings.serving_sync_seconds))
            if settings.serving_sync_seconds > 0
            else None
        )
        yield
        if follower is not None:
            follower.cancel()
        await built.shutdown()
        db.dispose()

    app = FastAPI(title="finetune-bot serving", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.serving_max_body_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        state = getattr(request.app.state, "serving", None)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        if state is not None and endpoint != "/metrics":
            state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(FinetuneError)
    async def domain_error(request: Request, exc: FinetuneError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 422)
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:8]
        log.exception("unexpected error %s on %s", error_id, request.url.path)
        return JSONResponse(
            {"error": {"code": "internal", "message": "internal error", "error_id": error_id}}, 500
        )

    @app.get("/healthz")
    async def healthz(state: StateDep) -> dict[str, Any]:
        return {
            "status": "ok",
            "backend": state.engine.backend,
            "current": _describe(state.registry.current),
        }

    @app.get("/metrics", dependencies=[Depends(require_token)])
    async def metrics(state: StateDep) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(state.metrics.registry).decode())

    @app.post("/v1/classify", dependencies=[Depends(require_token)])
    async def classify(body: ClassifyRequest, state: StateDep) -> dict[str, Any]:
        adapter = state.registry.resolve(body.model)  # read once: one adapter per answer
        return await classify_one(state, body.text, adapter, body.reasoning)

    @app.post("/v1/classify/batch", dependencies=[Depends(require_token)])
    async def classify_batch(body: ClassifyBatchRequest, state: StateDep) -> dict[str, Any]:
        adapter = state.registry.resolve(body.model)
        results = await asyncio.gather(
            *(classify_one(state, t, adapter, body.reasoning) for t in body.texts)
        )
        return {"results": list(results)}

    @app.get("/v1/adapters", dependencies=[Depends(require_token)])
    async def adapters(state: StateDep) -> dict[str, Any]:
        from storage.db import new_session
        from storage.promotions import promotion_history

        with new_session(state.registry.db) as session:
            history = [
                {
                    "checkpoint_id": p.checkpoint_id,
                    "previous_checkpoint_id": p.previous_checkpoint_id,
                    "action": p.action,
                    "by": p.decided_by,
                    "at": p.created_at.isoformat(),
                }
                for p in promotion_history(session)
            ]
        return {
            "current": _describe(state.registry.current),
            "loaded": [_describe(a) for a in state.registry.loaded.values()],
            "swaps": state.registry.swaps,
            "history": history,
        }

    @app.post("/v1/adapters/promote", dependencies=[Depends(require_admin)])
    async def promote(body: PromoteRequest, state: StateDep) -> dict[str, Any]:
        started = time.perf_counter()
        adapter = await state.registry.promote(body.checkpoint_id, by=body.by)
        state.metrics.swaps.inc()
        state.metrics.adapter.set(adapter.checkpoint_id)
        return {
            "current": _describe(adapter),
            "swap_ms": round((time.perf_counter() - started) * 1000, 1),
        }

    @app.get("/v1/adapters/rollback", dependencies=[Depends(require_token)])
    async def rollback_plan(state: StateDep, to: str | None = None) -> dict[str, Any]:
        """What serves now and what a rollback (to ``to``: a checkpoint id or base) would serve;
        409 when nothing can be rolled back (to it)."""
        current, target = await asyncio.to_thread(state.registry.rollback_plan, _rollback_to(to))
        return {"current": _serving(current), "target": _serving(target)}

    @app.post("/v1/adapters/rollback", dependencies=[Depends(require_admin)])
    async def rollback(body: RollbackRequest, state: StateDep) -> dict[str, Any]:
        previous, adapter = await state.registry.rollback(
            by=body.by, to=body.to, expected_current=body.expected_current
        )
        state.metrics.swaps.inc()
        state.metrics.adapter.set(adapter.checkpoint_id if adapter else 0)
        return {"current": _describe(adapter), "previous": _serving(previous)}

    @app.get("/v1/models", dependencies=[Depends(require_token)])
    async def models(state: StateDep) -> dict[str, Any]:
        names = ["base"] + [a.name for a in state.registry.loaded.values()]
        if state.registry.current is not None:
            names.insert(1, "current")
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "owned_by": "finetune-bot", "created": 0}
                for n in names
            ],
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(require_token)])
    async def chat(body: ChatRequest, state: StateDep) -> Any:
        settings = state.settings
        check_chat(
            [(m.role, m.content) for m in body.messages],
            max_messages=settings.serving_max_messages,
            max_chars=settings.serving_max_chat_chars,
        )
        adapter = state.registry.resolve(body.model)
        messages = [Message(m.role, m.content) for m in body.messages]
        prompt = await asyncio.to_thread(render_prompt, state.tokenizer, messages)  # off the loop
        room = settings.serving_max_model_len - len(prompt)
        if room < 1:
            raise HTTPException(
                422,
                f"messages: the prompt is {len(prompt)} tokens and leaves no room for an answer "
                f"in the model's {settings.serving_max_model_len} (SERVING_MAX_MODEL_LEN)",
            )
        max_tokens = min(body.max_tokens or settings.serving_max_new_tokens, room)
        lora_id = adapter.lora_id if adapter is not None else None
        name = adapter.name if adapter is not None else "base"
        created, request_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:

            async def events() -> AsyncIterator[str]:
                async for delta in state.engine.stream(
                    prompt, max_tokens=max_tokens, lora_id=lora_id
                ):
                    chunk = {
                        "id": request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": name,
                        "choices": [
                            {"index": 0, "delta": {"content": delta}, "finish_reason": None}
                        ],
                    }
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                end = {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                }
                yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        completion = await state.engine.generate(prompt, max_tokens=max_tokens, lora_id=lora_id)
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": "stop" if completion.finished else "length",
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }

    return app
