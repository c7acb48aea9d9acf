"""`/finetune checkpoints` (ids, scores, what serves now) and `/finetune promote`'s refusals of
checkpoints that are not fit to serve, before serving is asked. Over signed HTTP, SQLite and
PostgreSQL; promotions forced past them, against a real serving app, are in test_actions.py."""

from __future__ import annotations

from storage.db import new_session
from storage.models import Checkpoint, Evaluation, Job
from storage.promotions import record_promotion, reject_checkpoint
from tests.bot.conftest import APPROVER, ingest


def _job(engine, *, status: str, channel: str = "C0CHAN", error: str | None = None, **kw) -> int:
    with new_session(engine) as session:
        job = Job(base_model="tiny", status=status, channel_id=channel, error=error, **kw)
        session.add(job)
        session.commit()
        return job.id


def _checkpoint(engine, job_id: int, step: int, *, final: bool, scores=None) -> int:
    with new_session(engine) as session:
        checkpoint = Checkpoint(
            job_id=job_id, step=step, final=final, path=f"c/{job_id}/{step}", base_model="tiny"
        )
        session.add(checkpoint)
        session.flush()
        if scores is not None:
            dataset_id = session.get(Job, job_id).dataset_id
            session.add(
                Evaluation(
                    checkpoint_id=checkpoint.id,
                    dataset_id=dataset_id,
                    base_model="tiny",
                    metrics=scores,
                )
            )
        session.commit()
        return checkpoint.id


def test_checkpoints_lists_this_channels_ids_scores_and_what_serves(slack, engine) -> None:
    news = ingest(slack, engine)
    job = _job(engine, status="succeeded", dataset_id=news.id)
    half = _checkpoint(engine, job, 45, final=False)
    final = _checkpoint(engine, job, 90, final=True, scores={"accuracy": 0.9, "macro_f1": 0.85})
    elsewhere = _checkpoint(
        engine, _job(engine, status="succeeded", channel="C0OTHER"), 9, final=True
    )

    before = slack.ask("checkpoints")["text"].splitlines()
    assert before[0] == "*Serving now:* the base model `tiny (built-in demo model)`"
    with new_session(engine) as session:  # what serving records when it promotes
        record_promotion(
            session,
            checkpoint_id=final,
            previous_checkpoint_id=None,
            action="promote",
            decided_by=APPROVER,
        )
    lines = slack.ask("checkpoints")["text"].splitlines()
    assert lines[0].startswith(f"*Serving now:* checkpoint {final} (promoted by <@{APPROVER}> at ")
    assert lines[1] == "*Latest checkpoints in this channel:*"
    assert lines[2] == (
        f"• *checkpoint {final}* · fine-tuning job {job} (succeeded) · step 90 (final) · "
        "promoted · accuracy 90.0%, macro-F1 85.0% · :arrow_forward: *serving now*"
    )
    assert lines[3] == (
        f"• *checkpoint {half}* · fine-tuning job {job} (succeeded) · step 45 · candidate · "
        "not evaluated"
    )
    assert not any(f"checkpoint {elsewhere}*" in line for line in lines)


def test_promote_refuses_unevaluated_failed_cancelled_and_rejected_checkpoints(
    slack, engine
) -> None:
    news = ingest(slack, engine)
    unevaluated = _checkpoint(
        engine, _job(engine, status="succeeded", dataset_id=news.id), 90, final=True
    )
    failed_job = _job(
        engine,
        status="failed",
        dataset_id=news.id,
        error="training finished and its checkpoint is kept, but the evaluation failed: OOM",
    )
    failed = _checkpoint(engine, failed_job, 90, final=True)
    cancelled_job = _job(engine, status="cancelled", dataset_id=news.id)
    partial = _checkpoint(engine, cancelled_job, 40, final=False, scores={"accuracy": 0.5})
    rejected = _checkpoint(
        engine, _job(engine, status="succeeded", dataset_id=news.id), 90, final=True, scores={}
    )
    with new_session(engine) as session:
        reject_checkpoint(session, checkpoint_id=rejected, decided_by=APPROVER)
    theirs = _checkpoint(engine, _job(engine, status="succeeded", channel="C0OTHER"), 9, final=True)

    def promote(text: str, user: str = APPROVER) -> str:
        return slack.ask(f"promote {text}", user=user)["text"]

    assert promote(f"{unevaluated}", user="U0USER") == (
        ":warning: only approvers can promote a checkpoint"
    )
    assert promote(f"{unevaluated}") == (
        f":warning: checkpoint {unevaluated} was never evaluated (its job 1 succeeded); "
        f"`/finetune evaluate {unevaluated}` scores it, or add `force` to promote it anyway"
    )
    assert promote(f"{failed}") == (
        f":warning: checkpoint {failed} was never evaluated (its job {failed_job} failed: "
        "training finished and its checkpoint is kept, but the evaluation failed: OOM); "
        f"`/finetune evaluate {failed}` scores it, or add `force` to promote it anyway"
    )
    assert promote(f"{partial}") == (
        f":warning: checkpoint {partial} is an intermediate checkpoint (step 40) of job "
        f"{cancelled_job}, which was cancelled; `/finetune evaluate {partial}` scores it, or add "
        "`force` to promote it anyway"
    )
    for text in (f"{rejected}", f"{rejected} force"):
        assert promote(text) == (
            f":warning: checkpoint {rejected} was rejected by <@{APPROVER}>: it cannot be promoted"
        )
    assert promote(f"{theirs}") == f":warning: no checkpoint {theirs} in this channel"
    assert promote("seven") == "Which checkpoint? `/finetune promote <checkpoint> [force]`"
    assert promote(f"{unevaluated} forcefully") == (
        "`forcefully`: after the checkpoint, `/finetune promote` takes only `force` (and, for "
        "another channel's checkpoint, `all`)"
    ).join([":warning: ", ""])
    assert promote(f"{theirs} all").startswith(  # an approver reaching another channel's
        f":warning: checkpoint {theirs} was never evaluated"
    )
    for text in (f"{rejected} force all", f"{rejected} all force"):  # either order
        assert promote(text) == (
            f":warning: checkpoint {rejected} was rejected by <@{APPROVER}>: it cannot be promoted"
        )
