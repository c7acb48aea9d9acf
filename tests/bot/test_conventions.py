"""Slack's conventions on every block the bot builds: each button and menu's action is sorted as
destructive or harmless (bot/blocks.py), and every destructive button carries a confirm dialog
within Slack's limits. Every Block Kit builder of the bot is walked (a new one must be added to
``SAMPLES``, or this test fails), with the inputs that make it show all its buttons."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import bot
from bot.answer_blocks import classify_blocks, feedback_control, mistakes_blocks
from bot.blocks import (
    CONFIRM_BUTTON_CHARS,
    CONFIRM_TEXT_CHARS,
    CONFIRM_TITLE_CHARS,
    DESTRUCTIVE_ACTIONS,
    HARMLESS_ACTIONS,
    decided_blocks,
    eval_report_blocks,
    job_header_blocks,
    rollback_confirm_blocks,
    show_mistakes_button,
    text_blocks,
)
from bot.home_blocks import (
    CANCEL_JOB,
    NEW_JOB,
    PROMOTE,
    Board,
    HomeData,
    Viewer,
    checkpoint_block,
    home_fallback_view,
    home_view,
    job_block,
    serving_block,
)
from bot.sweeps import CANCEL_SWEEP, sweep_blocks
from bot.views import start_modal
from storage.models import Checkpoint, Dataset, Job, Promotion, Sweep
from storage.sweeps import SweepRow
from tests.bot.test_answers import REPORT, _rows

BUILDER = re.compile(r"(_blocks|_block|_view|_button|_modal|_control)$")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DATASET = Dataset(
    id=1,
    name="news",
    version=2,
    source_name="news.zip",
    format="sharegpt",
    train_sha256="0" * 64,
    train_samples=300,
    eval_samples=100,
)
RUNNING = Job(
    id=3,
    base_model="tiny",
    status="running",
    dataset_id=1,
    requested_by="U0USER",
    channel_id="C0CHAN",
    config={"learning_rate": 5e-6},
    progress={"step": 4, "total_steps": 8, "loss": 0.5, "eta_s": 30},
)
CANDIDATE = Board(
    Checkpoint(id=7, job_id=3, step=8, final=True, path="c/7", base_model="tiny"),
    RUNNING,
    DATASET,
    {"accuracy": 0.9, "macro_f1": 0.85, "ece": 0.03},
)
APPROVER = Viewer("U0APPROVER", True)
HOME = HomeData(
    base_model="tiny",
    promotion=Promotion(id=1, checkpoint_id=5, action="promote", decided_by="U0A", created_at=NOW),
    serving_metrics={"accuracy": 0.8, "macro_f1": 0.7},
    serving_visible=True,
    active=[(RUNNING, DATASET)],
    board=[CANDIDATE],
    now=NOW,
    sweeps=[(1, "C0CHAN", 1, 2, False, None)],
)
ANSWER = {
    "kind": "label",
    "label": "体育",
    "confidence": 0.93,
    "scores": {"体育": 0.93, "娱乐": 0.05, "社会": 0.02},
    "model": {"checkpoint_id": 7},
    "latency_ms": 40.0,
}
ROWS = [
    SweepRow(job_id=3, settings={"lr": "1e-5"}, status="succeeded", macro_f1=0.6, checkpoint_id=7),
    SweepRow(job_id=4, settings={"lr": "5e-5"}, status="running"),
]


def _sweep(finished: bool) -> Sweep:
    return Sweep(
        id=1,
        base_model="tiny",
        requested_by="U0USER",
        channel_id="C0CHAN",
        finished_at=NOW if finished else None,
    )


def _finished_rows() -> list[SweepRow]:
    return [ROWS[0], SweepRow(job_id=4, settings={"lr": "5e-5"}, status="failed")]


# Each builder with inputs under which it shows its buttons: name → the blocks (or views) built.
SAMPLES: dict[str, Callable[[], list[Any]]] = {
    "job_header_blocks": lambda: [job_header_blocks(RUNNING, DATASET)],
    "text_blocks": lambda: [text_blocks("hello")],
    "eval_report_blocks": lambda: [eval_report_blocks(REPORT)],
    "decided_blocks": lambda: [decided_blocks(eval_report_blocks(REPORT), "Rejected by <@U1>")],
    "rollback_confirm_blocks": lambda: [
        rollback_confirm_blocks(
            {"current": {"checkpoint_id": 7}, "target": {"checkpoint_id": None}}
        ),
        rollback_confirm_blocks({"current": {"checkpoint_id": 7}, "target": {"checkpoint_id": 5}}),
    ],
    "show_mistakes_button": lambda: [[{"type": "actions", "elements": [show_mistakes_button(3)]}]],
    "classify_blocks": lambda: [classify_blocks("球队夺冠", ANSWER)],
    "feedback_control": lambda: [[feedback_control("球队夺冠", ANSWER)]],
    "mistakes_blocks": lambda: [
        mistakes_blocks(_rows(30), evaluation_id=3, subject="checkpoint 7", offset=0, total=40)
    ],
    "sweep_blocks": lambda: [
        sweep_blocks(_sweep(False), ROWS, DATASET),
        sweep_blocks(_sweep(True), _finished_rows(), DATASET),
    ],
    "serving_block": lambda: [[serving_block(HOME)]],
    "job_block": lambda: [[job_block(RUNNING, DATASET, APPROVER)]],
    "checkpoint_block": lambda: [[checkpoint_block(CANDIDATE, APPROVER, serving=False)]],
    "home_view": lambda: [
        home_view(HOME, APPROVER, notice="Done."),
        home_view(HOME, Viewer("U0USER", False)),
    ],
    "home_fallback_view": lambda: [home_fallback_view("plain")],
    "start_modal": lambda: [
        start_modal([DATASET], channel_id="C0CHAN", default_dataset_id=1, pick_channel=True)
    ],
}


def _builders() -> set[str]:
    """Every public Block Kit builder in the bot package, by its name."""
    found = set()
    for module in pkgutil.iter_modules(bot.__path__):
        if module.name in ("__main__", "standin", "console"):
            continue
        loaded = importlib.import_module(f"bot.{module.name}")
        for name, function in inspect.getmembers(loaded, inspect.isfunction):
            mine = function.__module__ == loaded.__name__
            if mine and BUILDER.search(name) and not name.startswith("_"):
                found.add(name)
    return found


def _interactive(built: Any) -> list[dict[str, Any]]:
    """The buttons and menus of a list of blocks or a view: in actions blocks and accessories."""
    blocks = built["blocks"] if isinstance(built, dict) else built
    found = []
    for block in blocks:
        if block.get("type") == "actions":
            found += block["elements"]
        if "accessory" in block:
            found.append(block["accessory"])
    return [element for element in found if "action_id" in element]


def test_every_builder_is_walked() -> None:
    assert _builders() == set(SAMPLES), "add the new builder to SAMPLES"


def test_every_destructive_button_asks_to_confirm_and_every_action_is_sorted() -> None:
    assert not DESTRUCTIVE_ACTIONS & HARMLESS_ACTIONS
    assert {
        PROMOTE,
        CANCEL_JOB,
        CANCEL_SWEEP,
    } <= DESTRUCTIVE_ACTIONS and NEW_JOB in HARMLESS_ACTIONS
    seen: set[str] = set()
    for name, build in SAMPLES.items():
        for built in build():
            for element in _interactive(built):
                action = element["action_id"]
                seen.add(action)
                where = f"{name}: {action}"
                assert action in DESTRUCTIVE_ACTIONS | HARMLESS_ACTIONS, f"sort {where}"
                if action not in DESTRUCTIVE_ACTIONS:
                    continue
                assert element["type"] == "button", where
                confirm = element.get("confirm")
                assert confirm is not None, f"{where} has no confirm dialog"
                limits = {
                    "title": CONFIRM_TITLE_CHARS,
                    "text": CONFIRM_TEXT_CHARS,
                    "confirm": CONFIRM_BUTTON_CHARS,
                    "deny": CONFIRM_BUTTON_CHARS,
                }
                for part, limit in limits.items():
                    text = confirm[part]["text"]
                    assert text.strip() and len(text) <= limit, (where, part, text)
                    assert confirm[part]["type"] == ("mrkdwn" if part == "text" else "plain_text")
                assert confirm.get("style") in ("danger", "primary")
    # The samples show every action there is, so none goes unchecked.
    assert seen == DESTRUCTIVE_ACTIONS | HARMLESS_ACTIONS, (
        DESTRUCTIVE_ACTIONS | HARMLESS_ACTIONS
    ) - seen
