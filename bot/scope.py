"""Channels are tenants: where a command looks for jobs, checkpoints and datasets.

A command sees the jobs (and so the checkpoints and scores) of the channel it was typed in, and
those started outside Slack (the deployment's, ``python -m runner submit``). Another channel's are
"not found", the same answer as for ids that do not exist, so nothing tells a channel what others
do. An approver may look in every channel by ending the command with ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from bot.auth import Approvers
from core.errors import Forbidden, NotFound
from storage.models import Checkpoint, Job

EVERYWHERE = "all"


@dataclass(frozen=True)
class Scope:
    """The channel a command was typed in, and whether an approver asked for every channel."""

    channel: str
    everywhere: bool = False

    @property
    def channel_filter(self) -> str | None:
        """For listing queries: the channel, or None for every channel."""
        return None if self.everywhere else self.channel

    @property
    def where(self) -> str:
        return "in any channel" if self.everywhere else "in this channel"

    def sees(self, channel_id: str | None) -> bool:
        """Whether a job of ``channel_id`` (None: started outside Slack) is visible here."""
        return self.everywhere or channel_id in (self.channel, None)


def require_approver(approvers: Approvers, user: str, what: str) -> None:
    """Forbidden unless ``user`` is an approver (``allows`` may raise when Slack cannot say)."""
    if not approvers.allows(user):
        raise Forbidden(f"only approvers can {what}")


def scope_of(approvers: Approvers, command: dict[str, Any], args: list[str]) -> tuple[Scope, list]:
    """The command's scope and its arguments without a trailing ``all`` (approvers only)."""
    channel = command["channel_id"]
    if args and args[-1].lower() == EVERYWHERE:
        require_approver(approvers, command["user_id"], "look in every channel (`all`)")
        return Scope(channel, everywhere=True), args[:-1]
    return Scope(channel), args


def find_job(session: Session, scope: Scope, ref: str) -> Job:
    """Job ``ref`` (a number) if the scope sees it; NotFound, as for a missing one, otherwise."""
    if not ref.isdigit():
        raise NotFound(f"`{ref}` is not a job number")
    job = session.get(Job, int(ref))
    if job is None or not scope.sees(job.channel_id):
        raise NotFound(f"no job {ref} {scope.where}")
    return job


def find_checkpoint(session: Session, scope: Scope, ref: str) -> tuple[Checkpoint, Job | None]:
    """Checkpoint ``ref`` and its job if the scope sees the job; NotFound otherwise."""
    if not ref.isdigit():
        raise NotFound(f"`{ref}` is not a checkpoint number")
    checkpoint = session.get(Checkpoint, int(ref))
    job = session.get(Job, checkpoint.job_id) if checkpoint is not None else None
    if checkpoint is None or not scope.sees(job.channel_id if job is not None else None):
        raise NotFound(f"no checkpoint {ref} {scope.where}")
    return checkpoint, job
