"""Block Kit builders: pure functions of domain rows, called by listeners and tests alike."""

from __future__ import annotations

import math
import re
from typing import Any

from bot.distill_blocks import DISTILL_EVENTS, distill_milestone, progress_line
from storage.models import Checkpoint, Dataset, Job

TINY_MODEL = "tiny"  # runner.models.TINY_MODEL_NAME (the bot does not import the runner's models)

STATE_EMOJI = {
    "queued": ":hourglass_flowing_sand:",
    "running": ":runner:",
    "evaluating": ":bar_chart:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
}


def progress_bar(step: int, total: int, width: int = 20) -> str:
    """A text progress bar for the job header.

    >>> progress_bar(5, 20, width=10)
    '▓▓▓░░░░░░░ 25%'
    """
    done = math.ceil(width * step / total) if total else 0
    return "▓" * done + "░" * (width - done) + f" {round(100 * step / total) if total else 0}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


SECTION_CHARS = 3000  # Slack refuses a section (or a context element) with longer text


def cut(text: str, limit: int = SECTION_CHARS) -> str:
    """``text`` within ``limit`` characters, an ellipsis marking a cut.

    >>> cut("abcdef", 4), cut("abc", 4)
    ('abc…', 'abc')
    """
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


JOB_NOUNS = {
    "train": "Fine-tuning job",
    "export": "Export job",
    "evaluate": "Evaluation job",
    "ingest": "Dataset check",
    "distill": "Distillation job",
}


def job_noun(job: Job) -> str:
    """What a job is called wherever the bot names one (its header, its root message, lists).

    >>> job_noun(Job(kind="evaluate", base_model="m")), job_noun(Job(kind="train", base_model="m"))
    ('Evaluation job', 'Fine-tuning job')
    """
    return JOB_NOUNS.get(job.kind, f"{job.kind.capitalize()} job")


def model_display_name(name: str) -> str:
    """A base model as people know it: a ModelScope id as it is, a directory on the server by its
    own name (never the server's path), the built-in demo model said to be one.

    >>> model_display_name("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    'deepseek-ai/DeepSeek-R1-Distill-Qwen-7B'
    >>> model_display_name("/srv/models/DeepSeek-R1-Distill-Qwen-7B/")
    'DeepSeek-R1-Distill-Qwen-7B'
    >>> model_display_name("tiny"), model_display_name("./models/local-7b")
    ('tiny (built-in demo model)', 'local-7b')
    >>> model_display_name("checkpoint-7")
    'checkpoint-7 (stage=pt checkpoint merged into its base)'
    """
    if name == TINY_MODEL:
        return f"{TINY_MODEL} (built-in demo model)"
    if re.fullmatch(r"checkpoint-\d+", name):
        return f"{name} (stage=pt checkpoint merged into its base)"
    trimmed = name.rstrip("/\\") or name
    parts = [p for p in trimmed.replace("\\", "/").split("/") if p]
    hub_id = len(parts) == 2 and not trimmed.startswith(("/", "~", ".", "\\")) and ":" not in name
    return trimmed if hub_id or len(parts) <= 1 else parts[-1]


def job_header_blocks(job: Job, dataset: Dataset | None = None) -> list[dict[str, Any]]:
    """The job's root message: state, progress bar, step/total, loss, ETA; edited in place. Free
    text (the error, the settings) is cut to fit Slack's 3,000 characters per block."""
    progress = job.progress or {}
    title = f"{STATE_EMOJI.get(job.status, '')} *{job_noun(job)} {job.id}* · {job.status}"
    lines = [title]
    model = f"`{model_display_name(job.base_model)}`"
    config = dict(job.config or {})
    if job.kind == "ingest":  # a dataset check: the file, and what it trains once stored
        lines.append(f"`{config.get('filename')}` as dataset *{config.get('name')}*")
        config = dict(config.get("then_train") or {})
        if config:
            lines.append(f"then a fine-tuning job on {model}")
    elif job.kind == "distill":  # a teacher, not our base model, does the work
        source = f"*{dataset.name}* v{dataset.version}" if dataset is not None else "its dataset"
        lines.append(
            f"{source} by teacher `{config.pop('model', '')}` at {config.pop('teacher', '')}"
        )
        done = progress_line(progress)
        if done:
            lines.append(f"`{progress_bar(progress.get('done', 0), progress['samples'])}` {done}")
    elif dataset is not None:
        lines.append(
            f"Dataset *{dataset.name}* v{dataset.version} ({dataset.train_samples} "
            f"train, {dataset.eval_samples} eval) on {model}"
        )
    else:
        lines.append(f"Base model {model}")
    if progress.get("total_steps"):
        lines.append(
            f"`{progress_bar(progress['step'], progress['total_steps'])}` step "
            f"{progress['step']}/{progress['total_steps']} · loss "
            f"{progress.get('loss', float('nan')):.4f} · ETA "
            f"{_duration(progress.get('eta_s'))}"
        )
    text = cut("\n".join(lines))
    if job.error:
        warning = "\n:warning: "
        text += warning + cut(job.error, SECTION_CHARS - len(text) - len(warning))
    settings = ", ".join(f"{k}={v}" for k, v in sorted(config.items()))
    context = f"requested by <@{job.requested_by}>" if job.requested_by else "requested"
    if settings:
        context += f" · {settings}"
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": cut(context)}]},
    ]


def job_header_text(job: Job) -> str:
    """The root message's notification text: the job's state in words, as its header shows it.

    >>> job_header_text(Job(id=3, base_model="m", status="running", progress={"step": 4,
    ...     "total_steps": 8, "loss": 0.5, "eta_s": 75}))
    'Fine-tuning job 3: running, step 4/8, loss 0.5000, about 1m15s left'
    >>> job_header_text(Job(id=4, base_model="m", status="failed", error="out of memory"))
    'Fine-tuning job 4: failed: out of memory'
    """
    text = f"{job_noun(job)} {job.id}: {job.status}"
    progress = job.progress or {}
    if progress.get("total_steps") and job.status in ("running", "evaluating"):
        text += f", step {progress['step']}/{progress['total_steps']}"
        if isinstance(progress.get("loss"), int | float):
            text += f", loss {progress['loss']:.4f}"
        if progress.get("eta_s") is not None and job.status == "running":
            text += f", about {_duration(progress['eta_s'])} left"
    if job.kind == "distill" and job.status == "running" and progress_line(progress):
        text += f", {progress_line(progress)}"
    if job.error:
        text += f": {cut(job.error, 300)}"
    return text


def job_line(job: Job, *, with_channel: bool = False) -> str:
    progress = job.progress or {}
    step = (
        f" · step {progress['step']}/{progress['total_steps']}"
        if progress.get("total_steps")
        else ""
    )
    where = f" · {channel_mention(job.channel_id)}" if with_channel else ""
    return f"{STATE_EMOJI.get(job.status, '')} {job_noun(job)} {job.id} · {job.status}{step}{where}"


def channel_mention(channel_id: str | None) -> str:
    """``<#C…>`` (Slack shows the channel's name), or the deployment for no channel."""
    return f"<#{channel_id}>" if channel_id else "the deployment (outside Slack)"


def dataset_scope(dataset: Dataset, here: str | None) -> str:
    """Whose a dataset is, as seen from channel ``here`` (None: an approver's `all` list)."""
    if dataset.channel_id is None:
        return "the deployment's"
    if here is None:
        return channel_mention(dataset.channel_id) + (", shared" if dataset.shared else "")
    if dataset.channel_id == here:
        return "this channel's" + (", shared" if dataset.shared else "")
    return f"shared by {channel_mention(dataset.channel_id)}"


def dataset_line(dataset: Dataset, here: str | None = None) -> str:
    labels = f"{len(dataset.labels)} labels" if dataset.labels else "free-form answers"
    if dataset.kind == "pt":
        labels = "raw text (stage=pt)"
    who = f" · by <@{dataset.uploaded_by}>" if dataset.uploaded_by else ""
    return (
        f"*{dataset.name}* v{dataset.version} · {dataset.train_samples} train / "
        f"{dataset.eval_samples} eval · {labels} · {dataset.format}{who} · "
        f"{dataset_scope(dataset, here)}"
    )


def checkpoint_line(
    checkpoint: Checkpoint, job: Job, metrics: dict[str, Any] | None, *, serving: bool
) -> str:
    """One row of ``/finetune checkpoints``: id, job, step, state, scores when evaluated."""
    scores = (
        f"accuracy {_pct(metrics.get('accuracy'))}, macro-F1 {_pct(metrics.get('macro_f1'))}"
        if metrics is not None
        else "not evaluated"
    )
    if checkpoint.meta.get("stage") == "pt":
        scores = f"stage=pt: a base for `base=checkpoint-{checkpoint.id}`, not served"
    final = " (final)" if checkpoint.final else ""
    now = " · :arrow_forward: *serving now*" if serving else ""
    return (
        f"*checkpoint {checkpoint.id}* · {job_noun(job).lower()} {job.id} ({job.status}) · "
        f"step {checkpoint.step}{final} · {checkpoint.status} · {scores}{now}"
    )


def escape(text: str) -> str:
    """Text shown as is in mrkdwn: Slack's three control characters escaped.

    >>> escape("<!channel> & <@U1>")
    '&lt;!channel&gt; &amp; &lt;@U1&gt;'
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def text_blocks(text: str) -> list[dict[str, Any]]:
    return [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _delta(value: float | None, *, percent: bool) -> str:
    if value is None:
        return ""
    shown = f"{value * 100:+.1f} pt" if percent else f"{value:+.2f}"
    return f" ({shown})"


def milestone_text(kind: str, payload: dict[str, Any]) -> str | None:
    """The thread reply for a job event, or None for events that only refresh the header."""
    if kind in DISTILL_EVENTS:
        return distill_milestone(kind, payload)
    if kind == "started":
        resumed = payload.get("resumed_from_step")
        start = f"resuming from step {resumed}" if resumed else "from the start"
        return (
            f":runner: Training started on {payload.get('samples')} samples, {start} "
            f"(attempt {payload.get('attempt')})."
        )
    if kind == "epoch":
        return (
            f"Epoch {payload['epoch']} done · step {payload['step']}/"
            f"{payload['total_steps']} · loss {payload['loss']:.4f}"
        )
    if kind == "requeued":
        return f":arrows_counterclockwise: {payload.get('reason', 'requeued')}"
    if kind == "trained":
        return (
            f":checkered_flag: Training finished: {payload['steps']} steps in "
            f"{payload['seconds']:.0f} s ({payload['tokens_per_s']:,.0f} tokens/s), final "
            f"loss {payload['final_loss']:.4f}. Evaluating on the eval split…"
        )
    if kind == "perplexity":
        return perplexity_text(payload)
    if kind == "evaluation_skipped":
        return f"No evaluation: {payload.get('reason')}."
    if kind == "failed":
        return f":x: Failed: {payload.get('error')}"
    if kind == "cancelled":
        by = f" by <@{payload['by']}>" if payload.get("by") else ""
        return f":no_entry_sign: Cancelled{by}: {payload.get('reason', '')}".rstrip(": ")
    if kind == "cancel_requested":
        return f":octagonal_sign: <@{payload.get('by')}> asked to cancel; stopping after this step."
    if kind == "status":
        return str(payload.get("message"))
    if kind == "exported":
        return export_text(payload)
    return None


def perplexity_text(payload: dict[str, Any]) -> str:
    """A stage=pt job's evaluation: held-out perplexity, base → checkpoint, and what the
    checkpoint is for (no Approve: it is a base for SFT, not served).

    >>> perplexity_text({"checkpoint_id": 7, "base_perplexity": 41.23, "perplexity": 18.7,
    ...     "documents": 40, "tokens": 5120}).splitlines()[0]
    ':bar_chart: Held-out perplexity 41.2 → 18.7 on 40 held-out documents (5,120 tokens)'
    """
    n = payload["checkpoint_id"]
    return (
        f":bar_chart: Held-out perplexity {payload['base_perplexity']:.1f} → "
        f"{payload['perplexity']:.1f} on {payload['documents']} held-out documents "
        f"({payload['tokens']:,} tokens)\n"
        f"Checkpoint {n} is continued pre-training (stage=pt): it is not served or promoted; "
        f"fine-tune on it with `/finetune start base=checkpoint-{n} dataset=NAME`."
    )


def export_text(payload: dict[str, Any]) -> str:
    """The thread reply for a published export: where, how big, how it was verified."""
    bits, quant = payload.get("bits"), payload.get("quant")
    what = f"GGUF {quant.upper()}" if quant else f"{bits}-bit (bitsandbytes)" if bits else "merged"
    verification = payload.get("verification") or {}
    checks = []
    for backend in ("transformers", "vllm", "llama_cpp"):
        found = verification.get(backend)
        if found:
            accuracy = (
                f", accuracy {_pct(found['accuracy'])} (adapter "
                f"{_pct(verification.get('adapter_accuracy'))})"
                if "accuracy" in found
                else ""
            )
            checks.append(
                f"{backend}: {found['identical_answers']}/{verification['samples']} answers "
                f"identical to base + adapter, label agreement {_pct(found['label_agreement'])}"
                + accuracy
            )
    if quant:
        checks.append("Ollama: `ollama create <name> -f Modelfile` in that folder (README.md)")
    return (
        f":package: Checkpoint {payload.get('checkpoint_id')} exported ({what}, "
        f"{payload.get('bytes', 0) / 1e9:.2f} GB) to `{payload.get('absolute_path')}`.\n"
        + "\n".join(f"• {line}" for line in checks)
    )


SHOW_MISTAKES = "show_mistakes"  # the report's Show mistakes button and each page's More mistakes
DECISIONS = ("approve_checkpoint", "reject_checkpoint")

# Every action of the bot's buttons and menus, sorted by what a click does. A destructive one
# changes what serves, stops work or throws a result away: it carries a confirm dialog
# (``confirm_dialog``), which tests/bot/test_conventions.py checks on every block the bot builds.
# An action in neither set fails that test: sort a new one here.
DESTRUCTIVE_ACTIONS = frozenset(
    {
        "approve_checkpoint",  # the report's Approve & promote, the home's Promote, the sweep's
        "reject_checkpoint",
        "confirm_rollback",  # `/finetune rollback`'s Roll back to …
        "cancel_job",  # the home's Cancel
        "cancel_sweep",
    }
)
HARMLESS_ACTIONS = frozenset(
    {
        SHOW_MISTAKES,  # posts a page of mistakes in the thread
        "cancel_rollback",  # closes the rollback question, nothing changed
        "home_start_job",  # opens the start form
        "correct_label",  # feedback on an answer: a later choice replaces it
        "confirm_label",
    }
)
CONFIRM_TITLE_CHARS, CONFIRM_TEXT_CHARS, CONFIRM_BUTTON_CHARS = 100, 300, 30  # Slack's limits


def confirm_dialog(
    title: str, text: str, yes: str, no: str = "Keep it", *, style: str = "danger"
) -> dict[str, Any]:
    """The dialog Slack shows before a destructive button's click is sent.

    >>> confirm_dialog("Cancel this job?", "Job 3 stops.", "Cancel the job")["deny"]["text"]
    'Keep it'
    """
    return {
        "title": {"type": "plain_text", "text": cut(title, CONFIRM_TITLE_CHARS)},
        "text": {"type": "mrkdwn", "text": cut(text, CONFIRM_TEXT_CHARS)},
        "confirm": {"type": "plain_text", "text": cut(yes, CONFIRM_BUTTON_CHARS)},
        "deny": {"type": "plain_text", "text": cut(no, CONFIRM_BUTTON_CHARS)},
        "style": style,
    }


def pct(value: float | None) -> str:
    """A probability as people read it, in whole percent.

    >>> pct(0.934), pct(0.0004), pct(None), pct(0.0)
    ('93%', '<1%', '–', '0%')
    """
    if value is None:
        return "–"
    if 0 < value < 0.005:
        return "<1%"
    return f"{value * 100:.0f}%"


def mistakes_value(evaluation_id: int, offset: int) -> str:
    """The value of a Show mistakes / More mistakes button.

    >>> mistakes_value(3, 10)
    '{"evaluation_id": 3, "offset": 10}'
    """
    import json

    return json.dumps({"evaluation_id": evaluation_id, "offset": offset})


def show_mistakes_button(evaluation_id: int, *, offset: int = 0) -> dict[str, Any]:
    """Anyone in the channel may click it (it decides nothing): bot/actions.py shows the
    evaluation's mistakes, from ``offset`` on, in the thread the click came from."""
    return {
        "type": "button",
        "action_id": SHOW_MISTAKES,
        "text": {"type": "plain_text", "text": "More mistakes" if offset else "Show mistakes"},
        "value": mistakes_value(evaluation_id, offset),
    }


def calibration_words(ece: float) -> str:
    """What an expected calibration error means for someone reading ``/classify``'s percentages.

    >>> calibration_words(0.031)
    'its confidence is about 3 points off how often it is right: its percentages can be trusted'
    >>> calibration_words(0.22)
    'its confidence is about 22 points off how often it is right: its percentages mean little'
    """
    if ece < 0.05:
        verdict = "its percentages can be trusted"
    elif ece < 0.15:
        verdict = "read its percentages as rough"
    else:
        verdict = "its percentages mean little"
    return f"its confidence is about {ece * 100:.0f} points off how often it is right: {verdict}"


def _versus(payload: dict[str, Any], key: str) -> str:
    """`` · +12.0 pt vs base · -1.0 pt vs serving``, each part where the payload has it."""
    parts = []
    for other, name in (("vs_base", "base"), ("vs_promoted", "serving")):
        value = (payload.get(other) or {}).get(key)
        if isinstance(value, int | float):
            parts.append(f" · {value * 100:+.1f} pt vs {name}")
    return "".join(parts)


def _report_lines(payload: dict[str, Any]) -> list[str]:
    """The report's head: accuracy, macro-F1, calibration, the deltas, reasoning off, free
    generation; every key but the first two is optional (older events lack them)."""
    lines = [
        f"*Accuracy* {_pct(payload.get('accuracy'))}{_versus(payload, 'accuracy')}",
        f"*Macro-F1* {_pct(payload.get('macro_f1'))}{_versus(payload, 'macro_f1')}",
    ]
    ece = payload.get("ece")
    if isinstance(ece, int | float):
        lines.append(
            f"*Calibration* ECE {_pct(ece)}{_versus(payload, 'ece')} (lower is better): "
            + calibration_words(ece)
        )
    off = payload.get("accuracy_reasoning_off")
    if isinstance(off, int | float):
        lines.append(
            f"*Without reasoning* accuracy {_pct(off)}{_versus(payload, 'accuracy_reasoning_off')}"
            f" · macro-F1 {_pct(payload.get('macro_f1_reasoning_off'))} (with reasoning "
            f"{_pct(payload.get('accuracy'))} / {_pct(payload.get('macro_f1'))})"
        )
    if "free_invalid_rate" in payload or "free_truncated_rate" in payload:
        free = (
            f"Free generation (no label constraint): {_pct(payload.get('free_invalid_rate'))} "
            f"invalid answers · {_pct(payload.get('free_truncated_rate'))} cut at the length "
            "limit"
        )
        if isinstance(payload.get("reasoning_cut_rate"), int | float):
            free += f" · reasoning cut in {_pct(payload['reasoning_cut_rate'])}"
        lines.append(free)
    else:  # an evaluation before constrained labels
        lines.append(
            f"Invalid answers {_pct(payload.get('invalid_rate'))} · truncated "
            f"{_pct(payload.get('truncated_rate'))}"
        )
    general = payload.get("general")
    if isinstance(general, dict):
        lines.append(general_line(general))
    lines.append(
        f"ROUGE-1/2/L {payload.get('predict_rouge-1') or 0:.2f} / "
        f"{payload.get('predict_rouge-2') or 0:.2f} / {payload.get('predict_rouge-l') or 0:.2f}"
        f" · BLEU-4 {payload.get('predict_bleu-4') or 0:.2f} (whole answers, for parity)"
    )
    lines += [
        f":information_source: {n}"
        for n in (
            payload.get("backend_note"),
            payload.get("prompts_note"),
            payload.get("general_note"),
        )
        if n
    ]
    return lines


def general_line(general: dict[str, Any]) -> str:
    """The forgetting check's line of the report.

    >>> general_line({"benchmark": "cmmlu v1", "accuracy": 0.521, "base_accuracy": 0.525,
    ...               "delta_pt": -0.4})
    '*General ability* 52.1% (−0.4 pt vs base) on cmmlu v1'
    >>> general_line({"benchmark": "cmmlu v1", "accuracy": 0.4, "base_accuracy": 0.5,
    ...               "delta_pt": -10.0, "warning": "general ability dropped 10.0 points"})
    '*General ability* 40.0% (−10.0 pt vs base) on cmmlu v1 :warning: general ability dropped 10.0 points'
    """
    delta = general.get("delta_pt")
    versus = (
        f" ({'+' if delta >= 0 else '−'}{abs(delta):.1f} pt vs base)"
        if isinstance(delta, int | float)
        else ""
    )
    line = (
        f"*General ability* {100 * general['accuracy']:.1f}%{versus} on "
        f"{escape(str(general.get('benchmark')))}"
    )
    if general.get("warning"):
        line += f" :warning: {escape(str(general['warning']))}"
    return line


def _width(text: str) -> int:
    """Columns ``text`` takes in a monospace font (CJK characters take two)."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _count(value: Any) -> str:
    return "–" if value is None else str(value)


def per_class_text(per_class: dict[str, dict[str, Any]], limit: int = SECTION_CHARS) -> str:
    """The per-class table, the weakest F1 first, as much of it as fits in ``limit``.

    >>> print(per_class_text({"体育": {"precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10},
    ...                       "财经": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 2}}))
    *Per class* (weakest F1 first)
    ```
    label  precision  recall   F1  support
    财经         50%    100%  67%        2
    体育        100%     90%  95%       10
    ```
    """
    ranked = sorted(per_class.items(), key=lambda item: (item[1].get("f1") or 0.0, item[0]))
    names = [escape(name.replace("`", "'")) for name, _ in ranked]
    column = max([_width("label"), *(_width(n) for n in names)])
    column = min(column, 24)
    head, fence = "*Per class* (weakest F1 first)\n```\n", "\n```"
    rows = ["label" + " " * (column - 5) + "  precision  recall   F1  support"]
    for name, (_, scores) in zip(names, ranked, strict=True):
        shown = name if _width(name) <= column else cut(name, column // 2)
        rows.append(
            shown
            + " " * max(column - _width(shown), 0)
            + f"  {pct(scores.get('precision')):>9}  {pct(scores.get('recall')):>6}"
            f"  {pct(scores.get('f1')):>3}  {_count(scores.get('support')):>7}"
        )
    shown_rows: list[str] = []
    for index, row in enumerate(rows):
        rest = len(rows) - index
        more = f"\n… {rest - 1} more classes" if rest > 1 else ""
        if len(head) + len("\n".join([*shown_rows, row])) + len(more) + len(fence) > limit:
            return head + "\n".join(shown_rows) + f"\n… {rest} more classes" + fence
        shown_rows.append(row)
    return head + "\n".join(shown_rows) + fence


def eval_report_text(payload: dict[str, Any]) -> str:
    """The report's notification text: the scores that matter and what can be done with it.

    >>> eval_report_text({"checkpoint_id": 4, "accuracy": 0.9, "macro_f1": 0.85, "ece": 0.031})
    'Evaluation of checkpoint 4: accuracy 90.0%, macro-F1 85.0%, calibration error 3.1%. Approvers can approve and promote it, or reject it.'
    """
    text = (
        f"Evaluation of checkpoint {payload['checkpoint_id']}: accuracy "
        f"{_pct(payload.get('accuracy'))}, macro-F1 {_pct(payload.get('macro_f1'))}"
    )
    ece = payload.get("ece")
    if isinstance(ece, int | float):
        text += f", calibration error {_pct(ece)}"
    return text + ". Approvers can approve and promote it, or reject it."


def promote_confirm(
    checkpoint: int | str, what: str | None = None, *, warning: str = ""
) -> dict[str, Any]:
    """The dialog before every Promote: the report's, the home's, the sweep's best run's
    (``warning``: its first words, e.g. the forgetting check's)."""
    return confirm_dialog(
        "Promote this checkpoint?",
        f"{warning}{what or f'Checkpoint {checkpoint}'} will answer `/classify` for everyone, "
        "replacing what serves now.",
        "Promote",
        "Cancel",
        style="primary",
    )


def eval_report_blocks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation report (``payload``: the ``evaluated`` event, runner/job.py): the scores
    that matter first, the per-class table, Approve & promote / Reject, and Show mistakes (a
    page of the misclassified eval samples in the thread) when the evaluation has labels."""
    checkpoint = payload["checkpoint_id"]
    head = f":bar_chart: *Evaluation of checkpoint {checkpoint}*\n" + "\n".join(
        _report_lines(payload)
    )
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": cut(head)}}
    ]
    per_class = payload.get("per_class")
    classes = (
        {str(k): v for k, v in per_class.items() if isinstance(v, dict)}
        if isinstance(per_class, dict)
        else {}
    )
    if classes:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": per_class_text(classes)}}
        )
    blocks.append(
        {
            "type": "actions",
            "block_id": f"decide-{checkpoint}",
            "elements": [
                {
                    "type": "button",
                    "action_id": "approve_checkpoint",
                    "style": "primary",
                    "text": {"type": "plain_text", "text": "Approve & promote"},
                    "value": str(checkpoint),
                    "confirm": promote_confirm(checkpoint, warning=_general_warning(payload)),
                },
                {
                    "type": "button",
                    "action_id": "reject_checkpoint",
                    "style": "danger",
                    "text": {"type": "plain_text", "text": "Reject"},
                    "value": str(checkpoint),
                    "confirm": confirm_dialog(
                        "Reject this checkpoint?",
                        f"Checkpoint {checkpoint} is marked rejected: it can no longer be "
                        "promoted (its files stay).",
                        "Reject",
                    ),
                },
            ],
        }
    )
    evaluation = payload.get("evaluation_id")
    if evaluation is not None and payload.get("accuracy") is not None:
        blocks.append(
            {
                "type": "actions",
                "block_id": f"mistakes-{evaluation}",
                "elements": [show_mistakes_button(int(evaluation))],
            }
        )
    return blocks


def _general_warning(payload: dict[str, Any]) -> str:
    """The confirm dialog's first words when the forgetting check warned (EVAL_MAX_GENERAL_DROP)."""
    general = payload.get("general")
    if isinstance(general, dict) and general.get("warning"):
        return f":warning: {escape(str(general['warning']))}. "
    return ""


def decided_blocks(report: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The report with its decision buttons replaced by who decided and when (Show mistakes
    stays: the mistakes are worth reading whatever was decided)."""
    kept = [
        b
        for b in report
        if b.get("type") != "actions"
        or not any(e.get("action_id") in DECISIONS for e in b.get("elements", []))
    ]
    return [*kept, {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}]


def served_name(described: dict[str, Any] | None) -> str:
    """``{"checkpoint_id": 5, …}`` (as serving describes a model) → "checkpoint 5".

    >>> served_name({"checkpoint_id": 5}), served_name({"checkpoint_id": None})
    ('checkpoint 5', 'the base model')
    """
    checkpoint = (described or {}).get("checkpoint_id")
    return f"checkpoint {checkpoint}" if checkpoint is not None else "the base model"


def rollback_value(plan: dict[str, Any]) -> str:
    """The confirm button's value: the target shown and what served when it was shown (serving
    refuses the rollback if that changed), ``"base"`` for the base model.

    >>> rollback_value({"current": {"checkpoint_id": 7}, "target": {"checkpoint_id": None}})
    '{"to": "base", "expected_current": 7}'
    """
    import json

    def ref(described: dict[str, Any] | None) -> int | str:
        checkpoint = (described or {}).get("checkpoint_id")
        return checkpoint if checkpoint is not None else "base"

    return json.dumps({"to": ref(plan.get("target")), "expected_current": ref(plan.get("current"))})


def rollback_confirm_blocks(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """``/finetune rollback``'s answer (ephemeral): what serves now, what would serve after, and
    a button to confirm (``plan`` is serving's ``GET /v1/adapters/rollback``)."""
    now, after = served_name(plan.get("current")), served_name(plan.get("target"))
    return [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f":rewind: *Roll back?*\nServing now: *{now}*\n"
                f"After the rollback: *{after}* (it served before {now})",
            },
        },
        {
            "type": "actions",
            "block_id": "rollback",
            "elements": [
                {
                    "type": "button",
                    "action_id": "confirm_rollback",
                    "style": "danger",
                    "text": {"type": "plain_text", "text": f"Roll back to {after}"},
                    "value": rollback_value(plan),
                    "confirm": confirm_dialog(
                        f"Roll back to {after}?",
                        f"{after[0].upper() + after[1:]} will answer `/classify` for everyone, "
                        f"instead of {now}.",
                        "Roll back",
                    ),
                },
                {
                    "type": "button",
                    "action_id": "cancel_rollback",
                    "text": {"type": "plain_text", "text": "Cancel"},
                    "value": "cancel",
                },
            ],
        },
    ]


def rolled_back_text(user: str, result: dict[str, Any]) -> str:
    """The channel's announcement of a rollback (serving's ``POST /v1/adapters/rollback``).

    >>> rolled_back_text("U1", {"current": {"checkpoint_id": None}, "previous": {"checkpoint_id": 4}})
    ':rewind: <@U1> rolled back: the base model answers `/classify` now (instead of checkpoint 4).'
    """
    return (
        f":rewind: <@{user}> rolled back: {served_name(result.get('current'))} answers "
        f"`/classify` now (instead of {served_name(result.get('previous'))})."
    )


def compare_text(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Eval scores side by side, one column per model."""
    keys = [
        ("accuracy", "accuracy", True),
        ("macro_f1", "macro-F1", True),
        ("invalid_rate", "invalid", True),
        ("truncated_rate", "truncated", True),
        ("predict_rouge-1", "ROUGE-1", False),
        ("predict_bleu-4", "BLEU-4", False),
    ]
    width = max(12, *(len(name) + 2 for name, _ in rows))
    lines = ["".ljust(11) + "".join(name.rjust(width) for name, _ in rows)]
    for key, title, percent in keys:
        cells = []
        for _, metrics in rows:
            value = metrics.get(key)
            cells.append(
                "–" if value is None else (f"{value * 100:.1f}%" if percent else f"{value:.2f}")
            )
        lines.append(title.ljust(11) + "".join(c.rjust(width) for c in cells))
    return "```\n" + "\n".join(lines) + "\n```"
