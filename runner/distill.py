"""Datasets from a teacher (issue 17 item 4): a labelled dataset whose answers are only labels
gets its reasoning written by a teacher model behind any OpenAI-compatible
``/chat/completions`` endpoint (our own serving included), kept only where the teacher's parsed
label equals the gold one (rejection sampling, up to ``tries`` asks a sample), and stored as a
new dataset version with its provenance.

Every finished sample (kept or given up) is appended to a journal under
``ARTIFACT_DIR/distill/`` and fsynced before the next is counted, keyed by the source split,
teacher, model and prompt: a teacher that errors or times out stops the run with what was done
kept, and the same command resumes where it stopped. The eval split is copied unchanged: it is
never sent to the teacher nor mixed with training data.

    python -m runner distill --dataset news --teacher http://gpu:8000/v1 --model current
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import ConfigError, FinetuneError
from core.protocol import THINK_CLOSE, THINK_OPEN, Message, answer_of, match_label, parse_answer

log = logging.getLogger(__name__)

PROMPT = (
    "你是一名新闻分类专家。请判断用户给出的文本属于哪个类别（{labels}）。先在 <think> 与 </think> "
    "之间简要写出推理，然后只回答类别名称。"
)


class TeacherFailed(FinetuneError):
    """The teacher stopped answering; what was finished is kept in the journal. ``cause`` says
    how in a few words (``unreachable``, ``timed out``, ``HTTP 503``); ``done`` of ``total``
    samples are finished (set once the run has stopped)."""

    code = "teacher_failed"

    def __init__(self, message: str, *, cause: str = "", done: int = 0, total: int = 0) -> None:
        super().__init__(message)
        self.cause, self.done, self.total = cause, done, total


class DistillStopped(FinetuneError):
    """``stopping`` said stop (a cancel, the runner shutting down): finished samples are kept."""

    code = "distill_stopped"

    def __init__(self, message: str, *, done: int, total: int) -> None:
        super().__init__(message)
        self.done, self.total = done, total


def _cause(exc: Exception, status: int | None) -> str:
    import httpx

    if status is not None:
        return f"HTTP {status}"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "unreachable"
    return type(exc).__name__


@dataclass(frozen=True)
class Teacher:
    url: str  # the API base, e.g. http://host:8000/v1
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_tokens: int = 512
    temperature: float = 0.7  # for the second and later tries; the first is greedy
    instruction: bool = True  # False: samples sent as they are (a teacher tuned for this task)


@dataclass(frozen=True)
class DistillLimits:
    tries: int = 3
    concurrency: int = 4
    requests_per_second: float = 10.0


def _system(labels: Sequence[str]) -> str:
    return PROMPT.format(labels="、".join(labels))


def _prompt(teacher: Teacher, labels: Sequence[str]) -> str | None:
    return _system(labels) if teacher.instruction else None


def teacher_messages(
    history: Sequence[Message], labels: Sequence[str], *, instruction: bool = True
) -> list[dict[str, str]]:
    """The request's messages: the instruction leads the last user turn rather than a system
    message (DeepSeek-R1's usage notes ask for no system prompt; any teacher follows it there).
    Without ``instruction`` the sample goes as it is: a teacher fine-tuned on this very task (our
    own serving of a promoted checkpoint) answers best to the prompts it was trained on."""
    messages = [{"role": m.role, "content": m.content} for m in history]
    if not instruction:
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last] = {
        "role": "user",
        "content": f"{_system(labels)}\n\n{messages[last]['content']}",
    }
    return messages


def journal_path(root: Path, source_sha256: str, teacher: Teacher, labels: Sequence[str]) -> Path:
    key = json.dumps(
        [source_sha256, teacher.url.rstrip("/"), teacher.model, _prompt(teacher, labels)],
        ensure_ascii=False,
    )
    return root / "distill" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.jsonl"


def read_journal(path: Path) -> dict[int, dict[str, Any]]:
    """The finished samples by index; a torn last line (a killed run) is dropped."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[int(row["index"])] = row
    return done


class _Pacer:
    """At most ``rate`` requests a second across threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.lock = threading.Lock()
        self.next_at = 0.0

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next_at)
            self.next_at = at + self.interval
        if at > now:
            time.sleep(at - now)


def distill_split(
    conversations: Sequence[Sequence[Message]],
    labels: Sequence[str],
    teacher: Teacher,
    limits: DistillLimits,
    journal: Path,
    *,
    limit: int | None = None,
    on_sample: Callable[[int, int, int], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Ask the teacher for every sample not yet in ``journal`` (the first ``limit`` only, when
    given), appending each finished one. Raises ``TeacherFailed`` (what was finished stays) when
    the teacher errors on a sample three times in a row or is unreachable. ``on_sample(done,
    kept, total)`` is called after each finished sample (under the journal's lock: keep it
    short); ``stopping()`` true makes the run ask no new sample and raise ``DistillStopped``."""
    import httpx

    if limits.tries < 1 or limits.concurrency < 1 or limits.requests_per_second <= 0:
        raise ConfigError("distill: tries and concurrency must be at least 1, the rate above 0")
    journal.parent.mkdir(parents=True, exist_ok=True)
    done = read_journal(journal)
    count = len(conversations) if limit is None else min(limit, len(conversations))
    todo = [i for i in range(count) if i not in done]
    pacer = _Pacer(limits.requests_per_second)
    lock = threading.Lock()
    stats = Counter[str]()
    headers = {"Authorization": f"Bearer {teacher.api_key}"} if teacher.api_key else {}
    client = httpx.Client(
        base_url=teacher.url.rstrip("/"), headers=headers, timeout=teacher.timeout_s
    )
    failure: list[TeacherFailed] = []

    def ask(history: Sequence[Message], attempt: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": teacher.model,
            "messages": teacher_messages(history, labels, instruction=teacher.instruction),
            "max_tokens": teacher.max_tokens,
            "temperature": 0.0 if attempt == 0 else teacher.temperature,
        }
        errors = 0
        while True:
            pacer.wait()
            try:
                response = client.post("/chat/completions", json=body)
                if response.status_code == 429 or response.status_code >= 500:
                    raise httpx.HTTPStatusError(
                        f"{response.status_code}", request=response.request, response=response
                    )
                response.raise_for_status()
                return dict(response.json())
            except httpx.HTTPError as exc:
                errors += 1
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if errors >= 3 or (status is not None and 400 <= status < 500 and status != 429):
                    detail = f"HTTP {status}" if status else type(exc).__name__
                    raise TeacherFailed(
                        f"the teacher at {teacher.url} failed: {detail}",
                        cause=_cause(exc, status),
                    ) from exc
                time.sleep(0.5 * 2**errors)

    counts = {"done": len(done), "kept": sum(bool(r["kept"]) for r in done.values())}
    stopped: list[bool] = []

    def one(index: int) -> None:
        if failure or stopped:
            return
        if stopping is not None and stopping():
            stopped.append(True)
            return
        conversation = conversations[index]
        history = list(conversation[:-1])
        gold = parse_answer(answer_of(conversation)).label or answer_of(conversation).strip()
        row: dict[str, Any] = {"index": index, "gold": gold, "kept": False, "tries": 0}
        tokens = 0
        try:
            for attempt in range(limits.tries):
                reply = ask(history, attempt)
                usage = reply.get("usage") or {}
                tokens += int(usage.get("prompt_tokens", 0)) + int(
                    usage.get("completion_tokens", 0)
                )
                text = str(reply["choices"][0]["message"]["content"])
                parsed = parse_answer(text)
                row["tries"] = attempt + 1
                row["last_answer"] = text[:500]  # what a rejected sample last got, to debug
                if (
                    parsed.reasoning
                    and parsed.reasoning.strip()
                    and match_label(parsed.label, labels) == gold
                ):
                    row.update(
                        kept=True,
                        answer=f"{THINK_OPEN}\n{parsed.reasoning.strip()}\n{THINK_CLOSE}\n\n{gold}",
                    )
                    break
        except TeacherFailed as exc:
            failure.append(exc)
            return
        row["tokens"] = tokens
        with lock:
            with open(journal, "a", encoding="utf-8") as out:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
            stats["asked"] += 1
            stats["tokens"] += tokens
            counts["done"] += 1
            counts["kept"] += bool(row["kept"])
            if on_sample is not None:
                on_sample(counts["done"], counts["kept"], count)

    try:
        with ThreadPoolExecutor(max_workers=limits.concurrency) as pool:
            list(pool.map(one, todo))
    finally:
        client.close()
    finished = read_journal(journal)
    if failure:
        raise TeacherFailed(
            f"{failure[0].message}; {len(finished)} of {len(conversations)} samples are done "
            "and kept (run the same command again to resume)",
            cause=failure[0].cause,
            done=len(finished),
            total=len(conversations),
        )
    if stopped:
        raise DistillStopped(
            f"stopped; {len(finished)} of {len(conversations)} samples are done and kept (run "
            "the same command again to resume)",
            done=len(finished),
            total=len(conversations),
        )
    return {"asked_now": stats["asked"], "tokens_now": stats["tokens"], "finished": finished}


def summarise(finished: dict[int, dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Yield per label (kept / asked), tries and tokens over every finished sample."""
    per_label: dict[str, dict[str, Any]] = {}
    for row in finished.values():
        entry = per_label.setdefault(row["gold"], {"asked": 0, "kept": 0})
        entry["asked"] += 1
        entry["kept"] += bool(row["kept"])
    for entry in per_label.values():
        entry["yield"] = round(entry["kept"] / entry["asked"], 4)
    kept = sum(bool(r["kept"]) for r in finished.values())
    return {
        "samples": len(finished),
        "kept": kept,
        "yield": round(kept / len(finished), 4) if finished else 0.0,
        "per_label": {label: per_label[label] for label in labels if label in per_label},
        "teacher_requests": sum(int(r["tries"]) for r in finished.values()),
        "tokens": sum(int(r.get("tokens", 0)) for r in finished.values()),
    }


def distill_dataset(
    session: Any,
    store: Any,
    settings: Any,
    *,
    dataset: Any,
    teacher: Teacher,
    limits: DistillLimits,
    name: str | None = None,
    limit: int | None = None,
    on_sample: Callable[[int, int, int], None] | None = None,
    stopping: Callable[[], bool] | None = None,
    channel_id: str | None = None,
    uploaded_by: str = "distill",
) -> tuple[Any, dict[str, Any]]:
    """Distill ``dataset``'s train split and store the kept samples (and the eval split as it
    was) as a new version of ``name`` (default ``<dataset>-distilled``) with the provenance in its
    report, in ``channel_id``'s scope (None: the deployment's). Returns (the new dataset, the
    summary). ``on_sample`` and ``stopping``: see ``distill_split``."""
    from runner.datasets.ingest import IngestOptions, check_dataset_name, ingest_dataset, read_split
    from runner.models import tokenizer_for_report

    if dataset.kind != "sft":
        raise ConfigError(
            f"distill: dataset {dataset.name} is a {dataset.kind} dataset, not SFT data"
        )
    labels = list(dataset.labels or [])
    if not labels:
        raise ConfigError(
            f"distill: dataset {dataset.name} v{dataset.version} has no label set (its answers "
            "are free text); the teacher's answers are kept by their label"
        )
    target = name or f"{dataset.name}-distilled"
    check_dataset_name(target)
    conversations = read_split(store, dataset.train_sha256)
    if all(parse_answer(answer_of(c)).reasoning for c in conversations):
        raise ConfigError(
            f"distill: every answer of {dataset.name} v{dataset.version} already has reasoning"
        )
    journal = journal_path(Path(settings.artifact_dir), dataset.train_sha256, teacher, labels)
    run = distill_split(
        conversations,
        labels,
        teacher,
        limits,
        journal,
        limit=limit,
        on_sample=on_sample,
        stopping=stopping,
    )
    finished = run["finished"]
    summary = summarise(finished, labels)
    summary.update(asked_now=run["asked_now"], tokens_now=run["tokens_now"], journal=str(journal))
    kept = [
        [*conversations[i][:-1], Message("assistant", finished[i]["answer"])]
        for i in sorted(finished)
        if finished[i]["kept"]
    ]
    if not kept:
        raise ConfigError(
            f"distill: the teacher's label matched the gold one for none of the {len(finished)} "
            f"samples asked ({summary['teacher_requests']} requests); nothing was stored"
        )
    provenance = {
        "source": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
        "teacher": teacher.url,
        "model": teacher.model,
        "prompt": _prompt(teacher, labels),
        "tries": limits.tries,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **{k: summary[k] for k in ("samples", "kept", "yield", "per_label", "tokens")},
    }
    with tempfile.TemporaryDirectory(dir=store.tmp) as tmp:
        folder = Path(tmp) / target
        folder.mkdir()
        _write_sharegpt(folder / "train.json", kept)
        if dataset.eval_sha256 is not None:  # unchanged: never asked, never mixed
            _write_sharegpt(folder / "eval.json", read_split(store, dataset.eval_sha256))
        tokenizer, note = tokenizer_for_report(settings, None)
        stored, _ = ingest_dataset(
            session,
            store,
            folder,
            IngestOptions.from_settings(settings),
            name=target,
            tokenizer=tokenizer,
            tokenizer_note=note,
            channel_id=channel_id,
            uploaded_by=uploaded_by,
            commit=False,
        )
        stored.report = {**stored.report, "distill": provenance}
        session.add(stored)
        session.commit()
    return stored, summary


def _write_sharegpt(path: Path, conversations: Sequence[Sequence[Message]]) -> None:
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    records = [
        {"conversations": [{"from": roles[m.role], "value": m.content} for m in c]}
        for c in conversations
    ]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
