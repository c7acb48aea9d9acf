"""A local stand-in for the Slack Web API, for tests and the console: a real HTTP server on
loopback that implements the methods the bot uses, records every call with its body, serves
``response_url`` posts and private file downloads (an HTML login page without the bot token, as
Slack does), and fails the way Slack does:

- on request (``inject``): 429 with Retry-After, 500, an error code with HTTP 200
  (``{"ok": false, "error": "invalid_blocks"}``), or a connection reset before or after the call
  took effect;
- from its state: a deleted message (``delete_message``) answers ``message_not_found`` to
  ``chat.update`` and ``thread_not_found`` to replies in its thread; an archived channel
  (``archive``) answers ``is_archived``, one the bot was removed from (``kick``)
  ``not_in_channel``, a deleted one (``delete_channel``) ``channel_not_found``;
- from the message: text over 40,000 characters is ``msg_too_long``; a section text over 3,000
  characters, or more than 50 blocks, is ``invalid_blocks``; neither text nor blocks is
  ``no_text``; blocks without a ``text`` are taken, as Slack takes them, but the call is marked
  with the warning ``missing_text`` (``warned``): Slack's notifications and screen readers read
  that text, not the blocks;
- ``chat.getPermalink`` of a message it took (``messages``) answers Slack's link
  (``https://standin.slack.com/archives/C…/p<ts without the dot>``, with ``?thread_ts=…&cid=…``
  for a reply); of a deleted or unknown message ``message_not_found``, of a channel it never
  posted in (or deleted) ``channel_not_found``;
- from a published home (``views.publish``, kept per user in ``homes``): not a ``home`` view,
  more than 100 blocks, a section over 3,000 or a header over 150 characters is
  ``invalid_arguments``, as Slack answers.

Plus builders of correctly signed slash-command, block-action, view-submission and event requests.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import struct
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from slack_sdk.signature import SignatureVerifier

MAX_TEXT_CHARS = 40_000  # chat.postMessage / chat.update text
MAX_SECTION_CHARS = 3_000  # a section block's text
MAX_BLOCKS = 50
MAX_VIEW_BLOCKS = 100  # a home or modal view
MAX_HEADER_CHARS = 150
WRITES = ("chat.postMessage", "chat.update", "chat.postEphemeral", "files.completeUploadExternal")
TEXT_FALLBACK = ("chat.postMessage", "chat.update", "chat.postEphemeral")  # and response_url


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.time)
    status: int = 200  # the HTTP status answered (429/500 when a fault was injected; 0: reset)
    error: str | None = None  # Slack's error code when it answered ok: false
    warning: str | None = None  # what Slack takes but warns of: "missing_text" (blocks, no text)

    @property
    def accepted(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class Fault:
    method: str  # a Web API method, or "*"
    status: int
    retry_after: int | None
    times: int
    error: str | None = None  # the body's error code
    reset: bool = False  # close the connection instead of answering
    after_accept: bool = False  # with reset: the call took effect first (Slack posted it)
    channel: str | None = None  # only calls naming this channel
    match: Callable[[dict[str, Any]], bool] | None = None  # only calls whose params match

    def applies(self, method: str, params: dict[str, Any]) -> bool:
        if self.method not in (method, "*"):
            return False
        if self.channel is not None and self.channel != _channel_of(params):
            return False
        return self.match is None or self.match(params)


def _channel_of(params: dict[str, Any]) -> str:
    return str(params.get("channel") or params.get("channel_id") or "")


@dataclass
class StoredFile:
    id: str
    name: str
    content: bytes
    html_login_page: bool = False


class SlackStandIn:
    def __init__(
        self,
        *,
        bot_user_id: str = "U0BOT",
        team_id: str = "T0TEST",
        usergroups: dict[str, list[str]] | None = None,
    ) -> None:
        self.bot_user_id = bot_user_id
        self.team_id = team_id
        self.usergroups = usergroups or {}
        self.calls: list[Call] = []
        self.files: dict[str, StoredFile] = {}
        self.uploads: dict[str, bytes] = {}
        self._faults: deque[Fault] = deque()
        self.deleted_messages: set[tuple[str, str]] = set()
        self.archived: set[str] = set()
        self.kicked: set[str] = set()
        self.deleted_channels: set[str] = set()
        self.homes: dict[str, dict[str, Any]] = {}  # user id → the view last published
        # (channel, ts) → thread_ts (None: not a reply) of every message posted, for permalinks
        self.messages: dict[tuple[str, str], str | None] = {}
        self.workspace = "standin"  # permalinks are https://standin.slack.com/archives/…
        self._ts = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.bot_token = "xoxb-standin-token"

    # Control --------------------------------------------------------------------------------

    def start(self) -> str:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_POST(self) -> None:
                stand_in._post(self)

            def do_GET(self) -> None:
                stand_in._get(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.api_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/"

    def response_url(self, name: str = "r") -> str:
        return f"{self.base_url}/response/{name}"

    def inject(
        self,
        method: str,
        *,
        status: int | None = None,
        retry_after: int | None = 1,
        times: int = 1,
        error: str | None = None,
        reset: bool = False,
        after_accept: bool = False,
        channel: str | None = None,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Fail the next ``times`` calls of ``method`` (in ``channel``, matching ``match``): by
        default a 429 with Retry-After; ``error="invalid_blocks"`` answers HTTP 200 with that
        error code (as Slack does); ``reset=True`` drops the connection without an answer, after
        the call took effect when ``after_accept``."""
        if status is None:
            status = 200 if error or reset else 429
        if error is None and status != 200:
            error = "ratelimited" if status == 429 else "internal_error"
        fault = Fault(
            method, status, retry_after, times, error, reset, after_accept, channel, match
        )
        with self._lock:
            self._faults.append(fault)

    def delete_message(self, channel: str, ts: str) -> None:
        """Someone deleted the message ``ts``: updates of it and replies under it fail."""
        with self._lock:
            self.deleted_messages.add((channel, ts))

    def archive(self, channel: str) -> None:
        with self._lock:
            self.archived.add(channel)

    def kick(self, channel: str) -> None:
        """The bot was removed from ``channel``."""
        with self._lock:
            self.kicked.add(channel)

    def delete_channel(self, channel: str) -> None:
        with self._lock:
            self.deleted_channels.add(channel)

    def add_file(
        self, file_id: str, name: str, content: bytes, *, html_login_page: bool = False
    ) -> None:
        self.files[file_id] = StoredFile(file_id, name, content, html_login_page)

    def warned(self) -> list[Call]:
        """The messages Slack took with a warning (``missing_text``: blocks without a text)."""
        with self._lock:
            return [c for c in self.calls if c.warning is not None]

    def calls_to(self, method: str, *, accepted_only: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            return [
                c.params
                for c in self.calls
                if c.method == method and (c.accepted or not accepted_only)
            ]

    def wait_for(self, method: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.calls_to(method)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(
            f"{method}: {len(self.calls_to(method))} calls, wanted {count}; "
            f"calls so far: {[c.method for c in self.calls]}"
        )

    # HTTP -----------------------------------------------------------------------------------

    def _reply(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _read(self, handler: BaseHTTPRequestHandler) -> dict[str, Any]:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        kind = handler.headers.get("Content-Type", "")
        if "json" in kind:
            return json.loads(raw or b"{}")
        parsed = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        for key in ("blocks", "attachments", "view", "files"):
            if isinstance(parsed.get(key), str):
                with contextlib.suppress(json.JSONDecodeError):
                    parsed[key] = json.loads(parsed[key])
        return parsed

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if path.startswith("/response/"):
            params = self._read(handler)
            params["_response_url"] = path.removeprefix("/response/")  # whose answer it is
            with self._lock:
                self.calls.append(Call("response_url", params, warning=_text_warning(params)))
            return self._reply(handler, 200, b"ok", "text/plain")
        if path.startswith("/upload/"):
            raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
            self.uploads[path.rsplit("/", 1)[1]] = raw
            return self._reply(handler, 200, b"OK - uploaded", "text/plain")
        self._api(handler, path.removeprefix("/api/"), self._read(handler))

    def _api(self, handler: BaseHTTPRequestHandler, method: str, params: dict[str, Any]) -> None:
        """A Web API call (a POST's body or a GET's query, as slack_sdk sends each method)."""
        auth = handler.headers.get("Authorization", "")
        params["_token"] = auth.removeprefix("Bearer ")
        with self._lock:
            fault = next((f for f in self._faults if f.applies(method, params)), None)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
            refusal = self._refusal(method, params)
            if fault is not None and not fault.after_accept:
                status, error = (0, None) if fault.reset else (fault.status, fault.error)
            elif refusal is not None:
                status, error = 200, refusal[0]
            else:
                status, error = 200, None
            warning = _text_warning(params) if method in TEXT_FALLBACK else None
            self.calls.append(Call(method, params, status=status, error=error, warning=warning))
        if fault is not None and fault.reset and not fault.after_accept:
            return self._reset(handler)
        if fault is not None and not fault.after_accept:
            limited = fault.retry_after and fault.status != 200
            headers = {"Retry-After": str(fault.retry_after)} if limited else {}
            return self._reply(
                handler,
                fault.status,
                json.dumps({"ok": False, "error": fault.error}).encode(),
                headers=headers,
            )
        if refusal is not None:
            code, messages = refusal
            answer: dict[str, Any] = {"ok": False, "error": code}
            if messages:
                answer["response_metadata"] = {"messages": messages}
            return self._reply(handler, 200, json.dumps(answer).encode())
        body = self._answer(method, params)
        if "ts" in body:
            params["_ts"] = body["ts"]  # the ts Slack gave the message, for clicks on it later
        if fault is not None:  # a reset after the call took effect: Slack posted it, we never hear
            return self._reset(handler)
        self._reply(handler, 200, json.dumps(body).encode())

    def _reset(self, handler: BaseHTTPRequestHandler) -> None:
        """Drop the connection with a TCP reset, no answer."""
        handler.close_connection = True
        connection = handler.connection
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    def _refusal(self, method: str, params: dict[str, Any]) -> tuple[str, list[str]] | None:
        """The error Slack would answer this write with, from the channel, the message and the
        thread it names; None when it would accept it."""
        if method == "views.publish":
            return _view_refusal(params.get("view"))
        if method == "chat.getPermalink":
            channel, ts = _channel_of(params), str(params.get("message_ts") or "")
            if channel in self.deleted_channels or channel not in {c for c, _ in self.messages}:
                return "channel_not_found", []
            if (channel, ts) not in self.messages or (channel, ts) in self.deleted_messages:
                return "message_not_found", []
            return None
        if method not in WRITES:
            return None
        channel = _channel_of(params)
        if channel in self.deleted_channels:
            return "channel_not_found", []
        if channel in self.archived:
            return "is_archived", []
        if channel in self.kicked:
            return "not_in_channel", []
        if method == "chat.update" and (channel, str(params.get("ts"))) in self.deleted_messages:
            return "message_not_found", []
        thread = params.get("thread_ts")
        if thread and (channel, str(thread)) in self.deleted_messages:
            return "thread_not_found", []
        if method == "files.completeUploadExternal":
            return None
        text = params.get("text") or ""
        blocks = params.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        if len(text) > MAX_TEXT_CHARS:
            return "msg_too_long", []
        if len(blocks) > MAX_BLOCKS:
            return "invalid_blocks", [f"[ERROR] no more than {MAX_BLOCKS} items allowed"]
        for index, block in enumerate(blocks):
            section = block.get("text") if block.get("type") == "section" else None
            if section is not None and len(section.get("text", "")) > MAX_SECTION_CHARS:
                return "invalid_blocks", [
                    f"[ERROR] must be less than {MAX_SECTION_CHARS + 1} characters "
                    f"[json-pointer:/blocks/{index}/text/text]"
                ]
        if method != "chat.update" and not text and not blocks:
            return "no_text", []
        return None

    def _answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        ts = f"{1_700_000_000 + next(self._ts)}.000100"
        if method == "auth.test":
            return {
                "ok": True,
                "user_id": self.bot_user_id,
                "bot_id": "B0BOT",
                "team_id": self.team_id,
                "url": "https://standin.slack.test/",
            }
        if method == "chat.postMessage":
            with self._lock:
                self.messages[(_channel_of(params), ts)] = params.get("thread_ts")
            return {
                "ok": True,
                "channel": params.get("channel"),
                "ts": ts,
                "message": {"text": params.get("text"), "ts": ts},
            }
        if method == "chat.update":
            return {"ok": True, "channel": params.get("channel"), "ts": params.get("ts")}
        if method == "chat.getPermalink":
            channel, message = _channel_of(params), str(params["message_ts"])
            with self._lock:
                thread = self.messages.get((channel, message))
            link = (
                f"https://{self.workspace}.slack.com/archives/{channel}/p{message.replace('.', '')}"
            )
            if thread and thread != message:  # a reply: Slack's link opens it in its thread
                link += f"?thread_ts={thread}&cid={channel}"
            return {"ok": True, "channel": channel, "permalink": link}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": ts}
        if method == "views.publish":
            self.homes[str(params.get("user_id"))] = params["view"]
            return {"ok": True, "view": {"id": f"V{next(self._ts)}", **params["view"]}}
        if method == "views.open":
            return {"ok": True, "view": {"id": f"V{next(self._ts)}"}}
        if method == "usergroups.users.list":
            return {"ok": True, "users": self.usergroups.get(params.get("usergroup", ""), [])}
        if method == "users.info":
            return {"ok": True, "user": {"id": params.get("user"), "name": params.get("user")}}
        if method == "files.info":
            stored = self.files.get(params.get("file", ""))
            if stored is None:
                return {"ok": False, "error": "file_not_found"}
            return {
                "ok": True,
                "file": {
                    "id": stored.id,
                    "name": stored.name,
                    "size": len(stored.content),
                    "url_private_download": f"{self.base_url}/files/{stored.id}/{stored.name}",
                },
            }
        if method == "files.getUploadURLExternal":
            file_id = f"F{next(self._ts)}"
            return {
                "ok": True,
                "file_id": file_id,
                "upload_url": f"{self.base_url}/upload/{file_id}",
            }
        if method == "files.completeUploadExternal":
            files = params.get("files") or []
            return {
                "ok": True,
                "files": [{"id": f.get("id"), "title": f.get("title")} for f in files],
            }
        return {"ok": False, "error": "unknown_method"}

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.startswith("/api/"):
            path, _, query = handler.path.partition("?")
            params = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
            return self._api(handler, path.removeprefix("/api/"), params)
        parts = handler.path.split("/")
        if len(parts) >= 3 and parts[1] == "files" and parts[2] in self.files:
            stored = self.files[parts[2]]
            token = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            with self._lock:
                self.calls.append(Call("file_download", {"file": stored.id, "_token": token}))
            if token != self.bot_token or stored.html_login_page:
                page = b"<!DOCTYPE html><html><body>Sign in to Slack</body></html>"
                return self._reply(handler, 200, page, "text/html; charset=utf-8")
            return self._reply(handler, 200, stored.content, "application/octet-stream")
        self._reply(handler, 404, b"not found", "text/plain")


def _text_warning(params: dict[str, Any]) -> str | None:
    """``missing_text`` for a message with blocks and no (or a blank) ``text``: Slack takes it,
    but its notifications and screen readers have nothing to say (slack_sdk warns the same)."""
    blocks = params.get("blocks")
    if blocks and not str(params.get("text") or "").strip():
        return "missing_text"
    return None


def _view_refusal(view: Any) -> tuple[str, list[str]] | None:
    """``views.publish``'s refusal of ``view`` (None: Slack would take it)."""
    if isinstance(view, str):
        view = json.loads(view)
    if not isinstance(view, dict) or view.get("type") != "home":
        return "invalid_arguments", ["[ERROR] must be a home view [json-pointer:/view/type]"]
    blocks = view.get("blocks") or []
    if len(blocks) > MAX_VIEW_BLOCKS:
        return "invalid_arguments", [f"[ERROR] no more than {MAX_VIEW_BLOCKS} items allowed"]
    for index, block in enumerate(blocks):
        limit = {"section": MAX_SECTION_CHARS, "header": MAX_HEADER_CHARS}.get(block.get("type"))
        text = (block.get("text") or {}).get("text", "")
        if limit is not None and len(text) > limit:
            return "invalid_arguments", [
                f"[ERROR] must be less than {limit + 1} characters "
                f"[json-pointer:/view/blocks/{index}/text/text]"
            ]
    return None


# Signed requests -------------------------------------------------------------------------------


def signed_headers(
    secret: str,
    body: str,
    *,
    timestamp: int | None = None,
    content_type: str = "application/x-www-form-urlencoded",
) -> dict[str, str]:
    ts = str(timestamp if timestamp is not None else int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
        "Content-Type": content_type,
    }


def slash_command_body(
    command: str,
    text: str,
    *,
    user_id: str = "U0USER",
    channel_id: str = "C0CHAN",
    response_url: str = "",
    trigger_id: str = "T0TRIGGER",
    team_id: str = "T0TEST",
) -> str:
    return urllib.parse.urlencode(
        {
            "token": "legacy-unused",
            "team_id": team_id,
            "channel_id": channel_id,
            "channel_name": "fine-tuning",
            "user_id": user_id,
            "user_name": user_id.lower(),
            "command": command,
            "text": text,
            "response_url": response_url,
            "trigger_id": trigger_id,
            "api_app_id": "A0APP",
        }
    )


def block_action_body(
    action_id: str,
    value: str,
    *,
    user_id: str = "U0USER",
    channel_id: str = "C0CHAN",
    message_ts: str = "1.0",
    response_url: str = "",
    team_id: str = "T0TEST",
    blocks: list[dict[str, Any]] | None = None,
    thread_ts: str | None = None,
    selected: str | None = None,
) -> str:
    """A button click on message ``message_ts`` (a thread reply when ``thread_ts`` is given, as
    Slack sends it: in the message and in the container); with ``selected``, the choice of that
    option's value in a ``static_select`` instead (``value`` unused)."""
    in_thread = {"thread_ts": thread_ts} if thread_ts else {}
    action: dict[str, Any] = (
        {"type": "static_select", "selected_option": {"text": {}, "value": selected}}
        if selected is not None
        else {"type": "button", "value": value}
    )
    payload = {
        "type": "block_actions",
        "team": {"id": team_id},
        "user": {"id": user_id},
        "api_app_id": "A0APP",
        "channel": {"id": channel_id},
        "response_url": response_url,
        "trigger_id": "T0TRIGGER",
        "container": {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel_id,
            **in_thread,
        },
        "message": {"ts": message_ts, "text": "", "blocks": blocks or [], **in_thread},
        "actions": [
            {
                "action_id": action_id,
                "block_id": "b",
                **action,
                "action_ts": str(time.time()),
            }
        ],
    }
    return "payload=" + urllib.parse.quote(json.dumps(payload))


def home_action_body(
    action_id: str, value: str, *, user_id: str = "U0USER", team_id: str = "T0TEST"
) -> str:
    """A button click in the user's App Home: Slack sends the view, no channel and no message."""
    payload = {
        "type": "block_actions",
        "team": {"id": team_id},
        "user": {"id": user_id},
        "api_app_id": "A0APP",
        "trigger_id": "T0TRIGGER",
        "container": {"type": "view", "view_id": "V0HOME"},
        "view": {"id": "V0HOME", "type": "home", "blocks": []},
        "actions": [
            {
                "action_id": action_id,
                "block_id": "b",
                "type": "button",
                "value": value,
                "action_ts": str(time.time()),
            }
        ],
    }
    return "payload=" + urllib.parse.quote(json.dumps(payload))


def home_opened_body(user_id: str, *, event_id: str, tab: str = "home") -> str:
    """The ``app_home_opened`` event Slack sends when ``user_id`` opens the app's ``tab``."""
    event = {
        "type": "app_home_opened",
        "user": user_id,
        "channel": "D0APPHOME",
        "tab": tab,
        "event_ts": str(time.time()),
    }
    return event_body(event, event_id=event_id)


def view_submission_body(
    callback_id: str,
    values: dict[str, Any],
    *,
    user_id: str = "U0USER",
    private_metadata: str = "",
    team_id: str = "T0TEST",
) -> str:
    payload = {
        "type": "view_submission",
        "team": {"id": team_id},
        "user": {"id": user_id},
        "api_app_id": "A0APP",
        "trigger_id": "T0TRIGGER",
        "view": {
            "id": "V0VIEW",
            "callback_id": callback_id,
            "type": "modal",
            "private_metadata": private_metadata,
            "state": {"values": values},
        },
    }
    return "payload=" + urllib.parse.quote(json.dumps(payload))


def event_body(event: dict[str, Any], *, event_id: str, team_id: str = "T0TEST") -> str:
    return json.dumps(
        {
            "token": "legacy-unused",
            "team_id": team_id,
            "api_app_id": "A0APP",
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "event": event,
        }
    )
