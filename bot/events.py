"""Files shared in a channel (or a DM with the bot): fetched with the bot token, ingested, and the
validation report posted in a thread. Slack's retries of an event are handled once."""

from __future__ import annotations

import logging
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from bot.commands import BotContext
from core.errors import DatasetRejected, FinetuneError
from runner.datasets.ingest import NAME_PATTERN, IngestOptions, ingest_dataset
from runner.datasets.report import render_report
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Dataset
from storage.slack_events import claim_slack_event

log = logging.getLogger(__name__)


def register(app: Any, ctx: BotContext) -> None:
    @app.event("file_shared")
    def handle_file_shared(
        ack: Any, body: dict[str, Any], event: dict[str, Any], client: Any
    ) -> None:
        ack()
        with new_session(ctx.db) as session:
            if not claim_slack_event(session, event_id=body.get("event_id") or uuid.uuid4().hex):
                return  # a retry of an event already handled
        ingest_shared_file(
            ctx,
            client,
            file_id=event["file_id"],
            channel=event["channel_id"],
            user=event.get("user_id"),
        )

    @app.event("message")
    def ignore_messages(ack: Any) -> None:  # file shares arrive as file_shared events
        ack()


def dataset_name_for(filename: str) -> str:
    """A dataset name from an uploaded file's name.

    >>> dataset_name_for("data_news 300 (final).zip")
    'data_news-300-final'
    """
    stem = Path(filename).name.rsplit(".", 1)[0]
    name = re.sub(r"[^\w.-]+", "-", stem).strip("-._")[:64] or "dataset"
    return name if NAME_PATTERN.match(name) else f"d-{name}"[:64]


def ingest_shared_file(
    ctx: BotContext, client: Any, *, file_id: str, channel: str, user: str | None
) -> Dataset | None:
    """Fetch, ingest and report a shared file; the stored dataset, or None if refused."""
    settings = ctx.settings
    info = client.files_info(file=file_id)["file"]
    filename = Path(info.get("name") or file_id).name  # never a path from outside
    try:
        if int(info.get("size") or 0) > settings.max_upload_bytes:
            raise UploadRefused(
                f"{filename} is {info['size']} bytes, over the upload limit of "
                f"{settings.max_upload_bytes} bytes; nothing was stored"
            )
        data = _download(settings, info["url_private_download"], filename)
        with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            tokenizer, note = _tokenizer(ctx)
            with new_session(ctx.db) as session:
                dataset, report = ingest_dataset(
                    session,
                    ArtifactStore(settings.artifact_dir),
                    path,
                    IngestOptions.from_settings(settings),
                    name=dataset_name_for(filename),
                    tokenizer=tokenizer,
                    tokenizer_note=note,
                    channel_id=channel,
                    uploaded_by=user,
                )
    except DatasetRejected as exc:
        client.chat_postMessage(
            channel=channel,
            text=f":x: `{filename}` was rejected; nothing was stored.\n{exc.message}",
        )
        return None
    except FinetuneError as exc:
        client.chat_postMessage(channel=channel, text=f":x: `{filename}`: {exc.message}")
        return None
    labels = f"{len(dataset.labels)} labels" if dataset.labels else "free-form answers"
    root = client.chat_postMessage(
        channel=channel,
        text=(
            f":inbox_tray: Dataset *{dataset.name}* v{dataset.version} stored "
            f"from `{filename}`: {dataset.train_samples} train, "
            f"{dataset.eval_samples} eval, {labels}. Train on it with "
            f"`/finetune start dataset={dataset.name} lr=…`"
        ),
    )
    client.chat_postMessage(
        channel=channel,
        thread_ts=root["ts"],
        text="Validation report:\n```\n" + render_report(report) + "\n```",
    )
    return dataset


class UploadRefused(FinetuneError):
    code = "upload_refused"


def _download(settings: Any, url: str, filename: str) -> bytes:
    token = settings.slack_bot_token.get_secret_value()
    limit = settings.max_upload_bytes
    chunks: list[bytes] = []
    size = 0
    with httpx.stream(
        "GET", url, headers={"Authorization": f"Bearer {token}"}, follow_redirects=True, timeout=60
    ) as response:
        if response.status_code != 200:
            raise UploadRefused(f"Slack answered {response.status_code} when fetching the file")
        kind = response.headers.get("content-type", "")
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise UploadRefused(f"{filename} is over the upload limit of {limit} bytes")
            chunks.append(chunk)
    data = b"".join(chunks)
    if kind.startswith("text/html") or data[:100].lstrip().lower().startswith(
        (b"<!doctype html", b"<html")
    ):
        raise UploadRefused(
            f"Slack sent a login page instead of {filename}: the app needs the "
            "files:read scope and must be in this channel (see "
            "docs/slack-setup.md); nothing was stored"
        )
    return data


def _tokenizer(ctx: BotContext) -> tuple[Any, str | None]:
    from runner.models import load_fast_tokenizer, local_model_dir

    try:
        path = local_model_dir(ctx.settings, build_tiny=False)
    except FinetuneError:
        path = None
    if path is None:
        return None, "not measured: the base model is not on this machine yet"
    return load_fast_tokenizer(path), f"tokenizer of {ctx.base_model}"
