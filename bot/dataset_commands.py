"""``/finetune upload|datasets|share|unshare``: the datasets a channel may train on.

A channel uses its own uploads, the datasets other channels shared, and the deployment's (ingested
with ``python -m runner ingest``, such as the demo's ``news-demo``); see storage/datasets.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlmodel import select

from bot.blocks import dataset_line
from bot.scope import scope_of
from core.errors import Forbidden, NotFound
from storage.datasets import list_datasets, set_dataset_shared, visible_datasets
from storage.db import new_session
from storage.models import Dataset

if TYPE_CHECKING:
    from bot.commands import BotContext

UPLOAD_HELP = (
    "*Share a dataset file in this channel* (drag it in, or the + button → Upload) or in a DM "
    "with me; I fetch it, check it and post the validation report in a thread. Accepted: "
    "ShareGPT (`conversations`), OpenAI (`messages`) or Alpaca (`instruction`/`output`) records "
    "as .json or .jsonl; a LLaMA-Factory folder as a .zip with `dataset_info.json` (e.g. "
    "`train.json` + `eval.json`); or a .csv/.tsv with a text and a label column; raw text for "
    '`stage=pt` (continued pre-training) as `{{"text": …}}` records or .txt files in a .zip '
    "(a bare .txt shared here is left alone: notes are not datasets). Up to {mib} MiB. "
    "Then `/finetune start lr=5e-6 …` trains on the latest upload of the channel. A dataset "
    "belongs to the channel it was uploaded in; `/finetune share <name>` lets every channel use "
    "it."
)


def upload(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    mib = ctx.settings.max_upload_bytes // (1024 * 1024)
    respond(text=UPLOAD_HELP.format(mib=mib), response_type="ephemeral")


def datasets(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    scope, _ = scope_of(ctx.approvers, command, args)
    with new_session(ctx.db) as session:
        found = (
            list_datasets(session, limit=30)
            if scope.everywhere
            else visible_datasets(session, channel_id=scope.channel, limit=30)
        )
    here = None if scope.everywhere else scope.channel
    head = (
        "*Every channel's datasets:*"
        if scope.everywhere
        else "*Datasets this channel can use* (its own, shared by other channels, the "
        "deployment's):"
    )
    text = (
        "\n".join([head, *(f"• {dataset_line(d, here)}" for d in found)])
        if found
        else "No datasets yet: share a dataset file in this channel (`/finetune help`)."
    )
    respond(text=text, response_type="ephemeral")


def share(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    _set_shared(ctx, command, args, respond, shared=True)


def unshare(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    _set_shared(ctx, command, args, respond, shared=False)


def _set_shared(
    ctx: BotContext, command: dict, args: list[str], respond: Any, *, shared: bool
) -> None:
    verb = "share" if shared else "unshare"
    if len(args) != 1:
        respond(text=f"Which dataset? `/finetune {verb} <name>`", response_type="ephemeral")
        return
    name, channel, user = args[0], command["channel_id"], command["user_id"]
    with new_session(ctx.db) as session:
        versions = session.exec(
            select(Dataset).where(Dataset.name == name, Dataset.channel_id == channel)
        ).all()
        if not versions:
            raise NotFound(
                f"no dataset named {name} was uploaded in this channel (only the channel a "
                f"dataset was uploaded in can {verb} it: `/finetune datasets`)"
            )
        uploaders = {d.uploaded_by for d in versions if d.uploaded_by}
        if user not in uploaders and not ctx.approvers.allows(user):
            who = ", ".join(f"<@{u}>" for u in sorted(uploaders))
            raise Forbidden(
                f"only {who + ' (who uploaded it) or ' if who else ''}an approver can {verb} "
                f"dataset {name}"
            )
        changed = set_dataset_shared(session, name=name, channel_id=channel, shared=shared)
    if shared:
        text = (
            f":link: <@{user}> shared dataset *{name}* ({len(versions)} version"
            f"{'s' if len(versions) != 1 else ''}, later uploads too): every channel can train "
            f"on it with `dataset={name}` (a channel's own *{name}* comes first there)."
        )
    else:
        text = f":lock: <@{user}> unshared dataset *{name}*: only this channel can use it now."
    if not changed:
        text = f"Dataset *{name}* was already {'shared' if shared else 'not shared'}."
    respond(text=text, response_type="in_channel" if changed else "ephemeral")
