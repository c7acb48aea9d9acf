"""The product's whole flow, played through the Slack console: upload the tutorial-layout zip as a
Slack file, ``/finetune start``, the job's thread up to the evaluation report, a non-approver's
click (refused), an approver's click (serving hot-loads the adapter), ``/classify`` answered by the
promoted checkpoint, ``/finetune rollback`` (its confirmation shows the target; the approver
confirms) back to the base model.

Every step is a correctly signed request to the real bot (bolt, HTTP mode) and every answer is read
from what the Slack Web API stand-in recorded: what a user in the channel would see. ``finetune-bot
--demo`` prints the conversation; tests/e2e drives the same steps and asserts on them.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.console import CHANNEL, Console
from bot.standin import block_action_body

REPO = Path(__file__).resolve().parents[1]
TUTORIAL_FOLDER = REPO / "examples" / "news_demo"
VIEWER = "U0VIEWER"  # a channel member who is not an approver
HEADLINE = "国足客场击败对手晋级世界杯预选赛下一轮"
# Settings that learn on the tiny pre-trained base in the demo's seconds (bench/tiny_recipes.py in
# docs/benchmarks.md: 61–74% on the demo's eval split at lr 2e-3 to 5e-3 and two seeds, 51% at
# 1e-3): a 1.4M-parameter model needs a learning rate ~600× the tutorial's lr=5e-6, which is for a
# 7B.
DEMO_START_SETTINGS = "lr=3e-3 epochs=10 lora_rank=16"


def tutorial_zip(folder: Path = TUTORIAL_FOLDER) -> bytes:
    """The reference tutorial's ``data_news_300.zip`` layout: a top folder holding
    ``dataset_info.json``, ``train.json`` and ``eval.json``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("dataset_info.json", "train.json", "eval.json"):
            archive.write(folder / name, f"data_news_300/{name}")
    return buffer.getvalue()


class Demo:
    def __init__(self, console: Console, *, timeout: float = 600) -> None:
        self.console = console
        self.standin = console.standin
        self.timeout = timeout

    # What the channel saw -------------------------------------------------------------------
    def calls(self, method: str) -> list[dict[str, Any]]:
        return self.standin.calls_to(method)

    def wait(self, what: str, found: Callable[[], Any], timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = found()
            if value:
                self.console.show_new(settle=0.2)
                return value
            time.sleep(0.2)
        self.console.show_new(settle=0.2)
        raise TimeoutError(f"waited {timeout or self.timeout:.0f} s for {what}")

    def _posted(self, contains: str, *, thread: str | None = None) -> dict[str, Any] | None:
        for call in self.calls("chat.postMessage"):
            text = call.get("text") or ""
            if contains in text and (thread is None or call.get("thread_ts") == thread):
                return call
        return None

    def _reply_after(self, start: int, method: str = "response_url") -> dict[str, Any] | None:
        replies = self.calls(method)
        return replies[start] if len(replies) > start else None

    # The steps -----------------------------------------------------------------------------
    def upload(self, filename: str = "data_news_300.zip") -> dict[str, Any]:
        """Share the zip in the channel; returns the bot's "stored" message."""
        path = Path(self.console.settings.artifact_dir).parent / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tutorial_zip())
        self.console.say(f"» upload {filename}")
        self.console.handle(f"upload {path}")
        # A runner checks the file (a dataset check job); its thread gets the news and the report.
        stored = self.wait("the dataset check", lambda: self._posted("stored from `"))
        self.wait(
            "the validation report",
            lambda: self._posted("Validation report", thread=stored["thread_ts"]),
        )
        return stored

    def command(self, line: str, method: str = "response_url") -> dict[str, Any]:
        """A slash command; returns the bot's answer (through response_url by default)."""
        before = len(self.calls(method))
        self.console.say(f"» {line}")
        self.console.handle(line)
        return self.wait(f"the answer to {line}", lambda: self._reply_after(before, method))

    def start(self, settings: str) -> tuple[int, str]:
        """``/finetune start``; returns the job id and its thread ts."""
        before = len(self.calls("chat.postMessage"))
        self.console.say(f"» /finetune start {settings}")
        self.console.handle(f"/finetune start {settings}")

        def root() -> dict[str, Any] | None:
            for call in self.calls("chat.postMessage")[before:]:
                if "queued" in (call.get("text") or "") and "job" in (call.get("text") or ""):
                    return call
            return None

        posted = self.wait("the job's root message", root, timeout=30)
        job_id = int(posted["text"].split("job ", 1)[1].split()[0])
        return job_id, posted["_ts"]

    def evaluation(self, thread: str) -> dict[str, Any]:
        """Wait for the job's evaluation report (with its buttons) in the thread."""

        def report() -> dict[str, Any] | None:
            for call in self.calls("chat.postMessage"):
                if call.get("thread_ts") == thread and any(
                    b.get("type") == "actions" for b in call.get("blocks") or []
                ):
                    return call
            failed = self._posted(":x: Failed", thread=thread)
            if failed:
                raise RuntimeError(failed["text"])
            return None

        return self.wait("the evaluation report", report)

    def click(self, report: dict[str, Any], action: str, *, user: str) -> dict[str, Any]:
        """Click a button of ``report`` as ``user``; returns what the bot did in answer (an
        ephemeral refusal, or the report's update)."""
        button = next(
            e
            for b in report["blocks"]
            if b.get("type") == "actions"
            for e in b["elements"]
            if e["action_id"] == action
        )
        ephemeral, updates = len(self.calls("chat.postEphemeral")), len(self.calls("chat.update"))
        self.console.say(f"» <{user}> clicks “{button['text']['text']}”")
        self.console.post(
            block_action_body(
                action,
                button["value"],
                user_id=user,
                channel_id=CHANNEL,
                message_ts=report["_ts"],
                blocks=report["blocks"],
            )
        )

        def answered() -> dict[str, Any] | None:
            if len(self.calls("chat.postEphemeral")) > ephemeral:
                return self.calls("chat.postEphemeral")[ephemeral]
            for call in self.calls("chat.update")[updates:]:
                if call.get("ts") == report["_ts"]:
                    return call
            return None

        return self.wait(f"the answer to {user}'s click", answered, timeout=300)

    def rollback(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``/finetune rollback``: its confirmation (what serves now and after), then the click
        on "Roll back"; returns the confirmation and the channel's announcement."""
        confirmation = self.command("/finetune rollback")
        button = next(
            e
            for b in confirmation.get("blocks") or []
            if b.get("type") == "actions"
            for e in b["elements"]
            if e["action_id"] == "confirm_rollback"
        )
        before = len(self.calls("chat.postMessage"))
        self.console.say(f"» <{self.console.user}> clicks “{button['text']['text']}”")
        self.console.post(
            block_action_body(
                "confirm_rollback", button["value"], user_id=self.console.user, channel_id=CHANNEL
            )
        )

        def announced() -> dict[str, Any] | None:
            for call in self.calls("chat.postMessage")[before:]:
                if "rolled back" in (call.get("text") or ""):
                    return call
            return None

        return confirmation, self.wait("the rollback", announced, timeout=120)

    def play(self, start_settings: str = DEMO_START_SETTINGS) -> dict[str, Any]:
        """The whole flow; returns what each step answered."""
        seen: dict[str, Any] = {"stored": self.upload()}
        dataset = seen["stored"]["text"].split("*")[1]
        seen["job_id"], thread = self.start(f"dataset={dataset} {start_settings}")
        seen["report"] = report = self.evaluation(thread)
        seen["refused"] = self.click(report, "approve_checkpoint", user=VIEWER)
        seen["approved"] = self.click(report, "approve_checkpoint", user=self.console.user)
        seen["classified"] = self.command(f"/classify {HEADLINE}")
        seen["rollback_confirmation"], seen["rollback"] = self.rollback()
        seen["after_rollback"] = self.command(f"/classify {HEADLINE}")
        return seen
