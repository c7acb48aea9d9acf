"""Files shared in a channel (or a DM with the bot). Only files that look like datasets (by name
and Slack's filetype, before anything is downloaded) are taken; screenshots and the rest are left
alone, silently. A dataset file is downloaded with the bot token into ``ARTIFACT_DIR/uploads/``
(a few at a time: ``MAX_CONCURRENT_UPLOADS``) and queued as a *dataset check*: a runner validates
and stores it (runner/ingest_job.py) and its report reaches the check's thread. Nothing is parsed
in the bot's process. Slack's retries of an event are handled once."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx

from bot.commands import BotContext, tell_privately
from core.enums import JobKind
from core.errors import FinetuneError
from core.settings import Settings
from runner.datasets.ingest import NAME_PATTERN
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import create_job, request_cancel, set_job_thread
from storage.models import Job
from storage.slack_events import claim_slack_event

log = logging.getLogger(__name__)

# What a dataset upload can be (runner/datasets/sources.py reads these), by file name and by the
# filetype Slack gives it; anything else shared in a channel is not ours to look at.
DATASET_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".zip")
DATASET_FILETYPES = {"json", "jsonl", "csv", "tsv", "zip", "text"}


def register(app: Any, ctx: BotContext) -> None:
    @app.event("file_shared")
    def handle_file_shared(
        ack: Any, body: dict[str, Any], event: dict[str, Any], client: Any
    ) -> None:
        ack()
        with new_session(ctx.db) as session:
            if not claim_slack_event(session, event_id=body.get("event_id") or uuid.uuid4().hex):
                return  # a retry of an event already handled
        queue_upload(
            ctx,
            client,
            file_id=event["file_id"],
            channel=event["channel_id"],
            user=event.get("user_id"),
        )

    @app.event("message")
    def ignore_messages(ack: Any) -> None:  # file shares arrive as file_shared events
        ack()


def looks_like_dataset(filename: str, filetype: str | None) -> bool:
    """Whether a shared file is worth fetching as a dataset.

    >>> looks_like_dataset("data_news_300.zip", "zip"), looks_like_dataset("train.JSONL", None)
    (True, True)
    >>> looks_like_dataset("screenshot.png", "png"), looks_like_dataset("notes.txt", "text")
    (False, False)
    """
    return filename.lower().endswith(DATASET_SUFFIXES) or (
        filetype in DATASET_FILETYPES and filetype != "text"
    )


def dataset_name_for(filename: str) -> str:
    """A dataset name from an uploaded file's name.

    >>> dataset_name_for("data_news 300 (final).zip")
    'data_news-300-final'
    """
    stem = Path(filename).name.rsplit(".", 1)[0]
    name = re.sub(r"[^\w.-]+", "-", stem).strip("-._")[:64] or "dataset"
    return name if NAME_PATTERN.match(name) else f"d-{name}"[:64]


class UploadRefused(FinetuneError):
    code = "upload_refused"


def queue_upload(
    ctx: BotContext,
    client: Any,
    *,
    file_id: str,
    channel: str,
    user: str | None,
    then_train: dict[str, Any] | None = None,
) -> Job | None:
    """Fetch a shared dataset file and queue its check; the check's job, or None when the file
    is not a dataset (silence) or was refused (told to the user who shared it alone, in the
    channel when Slack names no user). ``then_train``: the settings of a training job to queue
    once the dataset is stored (the start form with a file)."""
    settings = ctx.settings
    info = client.files_info(file=file_id)["file"]
    filename = Path(info.get("name") or file_id).name  # never a path from outside
    if not looks_like_dataset(filename, info.get("filetype")):
        log.debug("ignoring shared file %s (%s): not a dataset", file_id, info.get("filetype"))
        return None
    store = ArtifactStore(settings.artifact_dir)
    try:
        if int(info.get("size") or 0) > settings.max_upload_bytes:
            raise UploadRefused(
                f"{filename} is {info['size']} bytes, over the upload limit of "
                f"{settings.max_upload_bytes} bytes; nothing was stored"
            )
        with _download_slots(settings):
            upload = _download(settings, store, info["url_private_download"], filename)
    except FinetuneError as exc:  # told to whoever shared it, not to the channel
        text = f":x: `{filename}`: {exc.message}"
        if user:
            tell_privately(client, channel=channel, user=user, text=text)
        else:
            client.chat_postMessage(channel=channel, text=text)
        return None
    with new_session(ctx.db) as session:
        job = create_job(
            session,
            kind=JobKind.ingest,
            base_model=ctx.base_model,
            config={
                "upload": upload,
                "filename": filename,
                "name": dataset_name_for(filename),
                **({"then_train": then_train} if then_train is not None else {}),
            },
            requested_by=user,
            channel_id=channel,
        )
        return _post_check_root(session, client, job, filename)


def _post_check_root(session: Any, client: Any, job: Job, filename: str) -> Job | None:
    """The check's root message, whose ts makes the job claimable; a channel the bot cannot
    post in cancels the check (nothing is read)."""
    assert job.id is not None
    try:
        posted = client.chat_postMessage(
            channel=job.channel_id,
            text=f":mag: Dataset check {job.id}: checking `{filename}`…",
        )
    except Exception:
        log.exception("could not post the root of dataset check %d; cancelling it", job.id)
        request_cancel(session, job_id=job.id, by=None)
        return None
    return set_job_thread(session, job=job, thread_ts=posted["ts"])


_slots_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None


def _download_slots(settings: Settings) -> threading.BoundedSemaphore:
    """At most ``MAX_CONCURRENT_UPLOADS`` downloads at once in this bot process."""
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(settings.max_concurrent_uploads)
        return _slots


def _download(settings: Settings, store: ArtifactStore, url: str, filename: str) -> str:
    """Stream the file into ``uploads/<id>/<filename>`` under ARTIFACT_DIR (written under tmp/
    and renamed when complete); returns that folder's name relative to ARTIFACT_DIR."""
    assert settings.slack_bot_token is not None
    token = settings.slack_bot_token.get_secret_value()
    limit = settings.max_upload_bytes
    relpath = f"uploads/{uuid.uuid4().hex}"
    with (
        store.staged_dir(relpath) as directory,
        httpx.stream(
            "GET",
            url,
            headers={"Authorization": f"Bearer {token}"},
            follow_redirects=True,
            timeout=60,
        ) as response,
    ):
        if response.status_code != 200:
            raise UploadRefused(f"Slack answered {response.status_code} when fetching the file")
        kind = response.headers.get("content-type", "")
        size = 0
        with open(directory / filename, "wb") as out:
            for chunk in response.iter_bytes():
                if size == 0 and _login_page(kind, chunk):
                    raise UploadRefused(
                        f"Slack sent a login page instead of {filename}: the app needs the "
                        "files:read scope and must be in this channel (see "
                        "docs/slack-setup.md); nothing was stored"
                    )
                size += len(chunk)
                if size > limit:
                    raise UploadRefused(f"{filename} is over the upload limit of {limit} bytes")
                out.write(chunk)
    return relpath


def _login_page(content_type: str, first_chunk: bytes) -> bool:
    return content_type.startswith("text/html") or first_chunk[:100].lstrip().lower().startswith(
        (b"<!doctype html", b"<html")
    )
