"""``python -m bot console``: the Slack app in a terminal, for machines without Slack credentials.

The same bolt app and handlers run underneath, in HTTP mode on loopback, against the local Web API
stand-in; every line typed becomes a correctly signed request. Messages, thread replies and
ephemeral answers are printed as text; buttons become numbered choices (type the number).

    /finetune start lr=5e-6          any slash command, as in Slack
    upload PATH                      share a dataset file in the channel
    home                             open the app's Home tab (what serves, jobs, checkpoints)
    1                                click button 1 (the numbers run on over every message)
    quit
"""

from __future__ import annotations

import itertools
import secrets
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import httpx

from bot.home_blocks import home_text
from bot.standin import (
    SlackStandIn,
    block_action_body,
    event_body,
    home_action_body,
    home_opened_body,
    signed_headers,
    slash_command_body,
)
from core.settings import Settings

CHANNEL = "C0CONSOLE"
USER = "U0CONSOLE"


def blocks_text(blocks: list[dict[str, Any]]) -> str:
    lines = []
    for block in blocks:
        if block.get("type") == "section":
            lines.append(block["text"]["text"])
        elif block.get("type") == "context":
            lines.append("  " + " · ".join(e.get("text", "") for e in block["elements"]))
    return "\n".join(lines)


class Console:
    def __init__(self, settings: Settings, *, out: TextIO = sys.stdout, user: str = USER) -> None:
        import uvicorn

        from bot.app import create_http_app

        self.out = out
        self.user = user
        self.standin = SlackStandIn()
        api_url = self.standin.start()
        self.secret = secrets.token_hex(16)
        values = settings.model_dump()
        values.update(
            slack_bot_token=self.standin.bot_token,
            slack_signing_secret=self.secret,
            slack_app_token=None,
            slack_api_url=api_url,
            approvers=settings.approvers or [user],
        )
        self.settings = Settings(
            _env_file=None,
            **{
                k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v)
                for k, v in values.items()
            },
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/slack/events"
        self.web = create_http_app(self.settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.web, host="127.0.0.1", port=port, log_level="warning")
        )
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        # action, value, message ts ("" for the home), label
        self.buttons: list[tuple[str, str, str, str]] = []
        self._printed = 0
        self._print_lock = threading.Lock()
        # Ids of this session's files and events: the bot drops an event id it has seen before
        # (Slack's retries) and the database keeps them, so a console started again on the same
        # ./var must not count from 1 again.
        self._session = uuid.uuid4().hex[:8].upper()
        self._files = itertools.count(1)
        self._homes = itertools.count(1)
        self._closed = False
        # Whether the user looks at the Home tab (after `home`, until a command or an upload):
        # homes the notifier republishes meanwhile are shown only then, as in Slack.
        self._home_open = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.web.state.notifier_stop is not None:
            self.web.state.notifier_stop.set()
        self.server.should_exit = True
        self.standin.stop()

    def post(self, body: str, content_type: str = "application/x-www-form-urlencoded") -> None:
        response = httpx.post(
            self.url,
            content=body,
            timeout=30,
            headers=signed_headers(self.secret, body, content_type=content_type),
        )
        if response.status_code != 200:
            self.say(f"(the bot answered HTTP {response.status_code})")
        elif response.content and response.headers.get("content-type", "").startswith("text"):
            self.say(response.text)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Run one typed line; False when the console should end."""
        line = line.strip()
        if not line:
            return True
        if line in ("quit", "exit"):
            return False
        if line.isdigit():
            index = int(line) - 1
            if not 0 <= index < len(self.buttons):
                self.say(f"No button {line}.")
                return True
            action, value, ts, _ = self.buttons[index]
            self._home_open = not ts
            self.post(
                block_action_body(
                    action, value, user_id=self.user, channel_id=CHANNEL, message_ts=ts
                )
                if ts
                else home_action_body(action, value, user_id=self.user)
            )
        elif line == "home":
            self._home_open = True
            body = home_opened_body(self.user, event_id=f"EvHOME{self._session}{next(self._homes)}")
            self.post(body, "application/json")
        elif line.startswith("/"):
            self._home_open = False
            command, _, text = line.partition(" ")
            self.post(
                slash_command_body(
                    command,
                    text,
                    user_id=self.user,
                    channel_id=CHANNEL,
                    response_url=self.standin.response_url("console"),
                )
            )
        elif line.startswith("upload "):
            self._home_open = False
            path = Path(line.removeprefix("upload ").strip()).expanduser()
            if not path.is_file():
                self.say(f"No such file: {path}")
                return True
            file_id = f"F0C{self._session}{next(self._files)}"
            self.standin.add_file(file_id, path.name, path.read_bytes())
            event = {
                "type": "file_shared",
                "file_id": file_id,
                "user_id": self.user,
                "channel_id": CHANNEL,
                "event_ts": str(time.time()),
            }
            self.post(event_body(event, event_id=f"Ev{file_id}"), "application/json")
        else:
            self.say(__doc__ or "")
        return True

    def show_new(self, settle: float = 0.5) -> None:
        """Print what the bot said since the last call, once it has been quiet for ``settle``."""
        deadline = time.monotonic() + 60
        last = len(self.standin.calls)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = len(self.standin.calls)
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since > settle:
                break
        with self._print_lock:
            calls = self.standin.calls[self._printed :]
            self._printed += len(calls)
            for call in calls:
                self._render(call.method, call.params)

    def _render(self, method: str, params: dict[str, Any]) -> None:
        text = blocks_text(params["blocks"]) if params.get("blocks") else params.get("text", "")
        if method == "chat.postMessage":
            prefix = "  ↳ " if params.get("thread_ts") else "#channel: "
            self.say(prefix + text.replace("\n", "\n    "))
            self._buttons(params.get("blocks") or [], params.get("_ts") or "")
        elif method == "chat.update":
            self.say("(updated) " + text.replace("\n", "\n    "))
        elif method in ("chat.postEphemeral", "response_url"):
            visible = "(only you) " if params.get("response_type") != "in_channel" else ""
            self.say(visible + text)
        elif method == "views.publish" and self._home_open:
            view = params.get("view") or {}
            self.say("(home) " + home_text(view).replace("\n", "\n    "))
            self._buttons(view.get("blocks") or [], "")
        elif method == "files.completeUploadExternal":
            names = ", ".join(f.get("title") or f.get("id") for f in params.get("files") or [])
            comment = params.get("initial_comment") or ""
            self.say(f"  ↳ [file: {names}] {comment}".rstrip())

    def _buttons(self, blocks: list[dict[str, Any]], ts: str) -> None:
        for block in blocks:
            if block.get("type") == "actions":
                elements = block["elements"]
            elif block.get("type") == "section" and "accessory" in block:
                elements = [block["accessory"]]  # the home's Cancel and Promote
            else:
                continue
            choices = []
            for element in elements:
                if element.get("type") != "button":
                    continue
                self.buttons.append(
                    (element["action_id"], element["value"], ts, element["text"]["text"])
                )
                choices.append(f"[{len(self.buttons)}] {element['text']['text']}")
            if choices:
                self.say("    " + "  ".join(choices) + "   (type the number)")


def run_console(settings: Settings) -> int:
    console = Console(settings)
    console.say(
        "finetune-bot console: type Slack commands (`/finetune help`), `upload PATH`, `home`, "
        "a button number, or `quit`."
    )
    stop = threading.Event()

    def follow() -> None:  # what arrives while nobody types: job progress, reports, uploads
        while not stop.wait(1.0):
            console.show_new(settle=0.3)

    threading.Thread(target=follow, daemon=True).start()
    try:
        for line in sys.stdin:
            if not console.handle(line):
                break
            console.show_new()
    finally:
        stop.set()
        console.close()
    return 0
