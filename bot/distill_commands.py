"""``/finetune distill dataset=RAW teacher=URL model=NAME [tries=N] [name=OUT]``: a teacher behind
an OpenAI-compatible endpoint writes the reasoning of a label-only dataset, as a job with its own
thread (runner/distill_job.py runs it; runner/distill.py is the CLI's same code).

Sending a channel's data to a URL is an approver's decision: only ``APPROVERS`` may start one,
and only to an allowed teacher (our serving, or ``DISTILL_TEACHERS``: runner/teachers.py), both
checked here on the server and the teacher again by the runner. The teacher's key is a setting
of the runner, never part of the command. Every bad input is answered privately, naming the
parameter and what it takes, and queues nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from bot.job_commands import ACTIVE, dataset_for, queue_slack_job
from bot.scope import require_approver
from core.enums import JobKind, JobStatus
from core.errors import ConfigError, Conflict
from runner.teachers import TEACHER_FORM, check_teacher
from storage.db import new_session
from storage.models import Dataset, Job

if TYPE_CHECKING:
    from bot.commands import BotContext

USAGE = (
    "`/finetune distill dataset=<name> teacher=<url> model=<name> [tries=1-{most}] "
    "[name=<new dataset>]`"
)
KEYS = ("dataset", "teacher", "model", "tries", "name")
REQUIRED = ("dataset", "teacher", "model")
DEFAULT_TRIES, MOST_TRIES = 3, 10


def usage() -> str:
    return USAGE.format(most=MOST_TRIES)


def _unlinked(value: str) -> str:
    """A URL as typed: Slack may send a link as ``<url>`` or ``<url|label>``."""
    if value.startswith("<") and value.endswith(">"):
        return value[1:-1].split("|", 1)[0]
    return value


def parse_distill_args(args: list[str]) -> dict[str, Any]:
    """The command's ``key=value`` words as the job's settings; ConfigError naming the parameter
    and what it takes otherwise.

    >>> parse_distill_args(["dataset=raw", "teacher=<http://gpu:8000/v1>", "model=current"])
    {'dataset': 'raw', 'teacher': 'http://gpu:8000/v1', 'model': 'current', 'tries': 3}
    >>> parse_distill_args(["dataset=raw", "teacher=http://h/v1", "model=m", "tries=0"])
    Traceback (most recent call last):
    ...
    core.errors.ConfigError: `tries=0`: tries takes a whole number from 1 to 10 (asks per sample at most; default 3)
    """
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lower()
        if not sep or key not in KEYS:
            raise ConfigError(
                f"`{arg}`: `/finetune distill` takes "
                + ", ".join(f"`{k}=`" for k in KEYS)
                + f": {usage()}"
            )
        if key in values:
            raise ConfigError(f"`{key}=` is given twice: {usage()}")
        values[key] = value.strip()
    missing = [k for k in REQUIRED if not values.get(k)]
    if missing:
        raise ConfigError(
            "`/finetune distill` needs "
            + ", ".join(f"`{k}=`" for k in missing)
            + f" (the teacher is {TEACHER_FORM}): {usage()}"
        )
    values["teacher"] = _unlinked(values["teacher"])
    tries = values.get("tries", str(DEFAULT_TRIES))
    if not tries.isdigit() or not 1 <= int(tries) <= MOST_TRIES:
        raise ConfigError(
            f"`tries={tries}`: tries takes a whole number from 1 to {MOST_TRIES} (asks per "
            f"sample at most; default {DEFAULT_TRIES})"
        )
    values["tries"] = int(tries)
    if "name" in values:
        from runner.datasets.ingest import check_dataset_name

        try:
            check_dataset_name(values["name"])
        except ConfigError as exc:
            raise ConfigError(f"`name={values['name']}`: {exc.message}") from exc
    return values


def _refuse_a_second_run(session: Session, dataset: Dataset, teacher: str, model: str) -> None:
    """One distillation of a dataset by one teacher at a time: they would share a journal."""
    pending = session.exec(
        select(Job).where(
            Job.kind == JobKind.distill.value,
            Job.dataset_id == dataset.id,
            col(Job.status).in_([JobStatus.queued.value, *ACTIVE]),
        )
    ).all()
    for job in pending:
        config = job.config or {}
        if config.get("teacher") == teacher and config.get("model") == model:
            raise Conflict(
                f"dataset *{dataset.name}* v{dataset.version} is being distilled by this "
                f"teacher already: distillation job {job.id} is {job.status} (`/finetune status "
                f"{job.id}`)"
            )


def distill(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    if not args:
        respond(
            text=f"Distill a label-only dataset with a teacher: {usage()} (approvers)",
            response_type="ephemeral",
        )
        return
    user, channel = command["user_id"], command["channel_id"]
    require_approver(
        ctx.approvers, user, "start a distillation (it sends this channel's data to a teacher)"
    )
    request = parse_distill_args(args)
    teacher = check_teacher(request["teacher"], ctx.settings)
    with new_session(ctx.db) as session:
        dataset = dataset_for(session, request["dataset"], channel=channel)
        if not dataset.labels:
            raise ConfigError(
                f"`dataset={dataset.name}`: v{dataset.version} has no label set (its answers are "
                "free text); distill takes a labelled dataset (CSV text + label, or records whose "
                "answer is a label)"
            )
        train = ((dataset.report or {}).get("splits") or {}).get("train") or {}
        if train.get("samples") and train.get("with_think") == train["samples"]:
            raise ConfigError(
                f"`dataset={dataset.name}`: every train answer of v{dataset.version} already "
                "has its reasoning (`<think>`): there is nothing to distill; name a label-only "
                "dataset"
            )
        _refuse_a_second_run(session, dataset, teacher, request["model"])
    config = {"teacher": teacher, "model": request["model"], "tries": request["tries"]}
    if request.get("name"):
        config["name"] = request["name"]
    queue_slack_job(
        ctx,
        client,
        kind=JobKind.distill,
        base_model=ctx.base_model,
        dataset=dataset,
        config=config,
        user=user,
        channel=channel,
    )
