"""The serving history as a stack over the promotions table: pure replay and rollback targets, and
the same read from a real database with checkpoint states kept right through rollbacks."""

from __future__ import annotations

import pytest
from sqlmodel import select

from core.enums import CheckpointStatus
from core.errors import Conflict
from storage.db import new_session
from storage.models import Checkpoint, Job, Promotion
from storage.promotions import (
    ServingHistory,
    record_promotion,
    replay_promotions,
    rollback_target,
    serving_history,
)


def _row(action: str, checkpoint_id: int | None) -> Promotion:
    return Promotion(action=action, checkpoint_id=checkpoint_id, decided_by="U1")


def _walk(rows: list[Promotion], *, to=None) -> tuple[int | None, list[Promotion]]:
    """One rollback as serving makes it: the target, and the rows with it recorded."""
    target = rollback_target(replay_promotions(rows), to)
    return target, [*rows, _row("rollback", target)]


def test_rollback_walks_back_through_what_served_then_refuses() -> None:
    rows = [_row("promote", c) for c in (1, 2, 3)]
    seen = []
    for _ in range(3):
        target, rows = _walk(rows)
        seen.append(target)
    assert seen == [2, 1, None]
    assert replay_promotions(rows) == ServingHistory(current=None, earlier=())
    with pytest.raises(Conflict) as refused:
        rollback_target(replay_promotions(rows))
    assert refused.value.message == (
        "nothing to roll back: the base model serves and nothing served before it"
    )
    with pytest.raises(Conflict, match="nothing to roll back"):
        rollback_target(replay_promotions([]))


def test_rollback_to_n_cuts_the_stack_below_n_and_names_the_choices_otherwise() -> None:
    rows = [_row("promote", c) for c in (1, 2, 3, 4)]
    target, rows = _walk(rows, to=2)
    assert target == 2 and replay_promotions(rows) == ServingHistory(2, (None, 1))
    with pytest.raises(Conflict) as refused:
        rollback_target(replay_promotions(rows), 3)  # 3 was cut with 4
    assert refused.value.message == (
        "checkpoint 3 did not serve before checkpoint 2: roll back to checkpoint 1 or the base model"
    )
    with pytest.raises(Conflict, match="checkpoint 2 serves now"):
        rollback_target(replay_promotions(rows), 2)
    assert rollback_target(replay_promotions(rows), "base") is None
    # A checkpoint promoted twice: the rollback goes to its latest time on the stack.
    again = [_row("promote", c) for c in (1, 2, 1, 3)]
    assert replay_promotions(again) == ServingHistory(3, (None, 1, 2, 1))
    target, again = _walk(again, to=2)
    assert target == 2 and replay_promotions(again) == ServingHistory(2, (None, 1))


def test_a_history_written_before_rollbacks_walked_back_still_replays() -> None:
    # Promote 1, 2, 3; rollback → 2; the old second rollback served 3 again.
    rows = [_row("promote", c) for c in (1, 2, 3)] + [_row("rollback", 2), _row("rollback", 3)]
    assert replay_promotions(rows) == ServingHistory(3, (None, 1, 2))
    assert rollback_target(replay_promotions(rows)) == 2


def test_the_stored_history_replays_and_checkpoint_states_follow_rollbacks(engine) -> None:
    with new_session(engine) as session:
        job = Job(base_model="m", status="succeeded")
        session.add(job)
        session.commit()
        ids = []
        for step in (1, 2, 3):
            checkpoint = Checkpoint(job_id=job.id, step=step, path=f"c{step}", base_model="m")
            session.add(checkpoint)
            session.commit()
            ids.append(checkpoint.id)
        a, b, c = ids
        previous = None
        for checkpoint_id in ids:
            record_promotion(
                session,
                checkpoint_id=checkpoint_id,
                previous_checkpoint_id=previous,
                action="promote",
                decided_by="U1",
            )
            previous = checkpoint_id
        assert serving_history(session) == ServingHistory(c, (None, a, b))
        history = serving_history(session)
        record_promotion(
            session,
            checkpoint_id=rollback_target(history, a),
            previous_checkpoint_id=history.current,
            action="rollback",
            decided_by="U2",
        )
        assert serving_history(session) == ServingHistory(a, (None,))
        states = {i: session.get(Checkpoint, i).status for i in ids}
    assert states == {
        a: CheckpointStatus.promoted,
        b: CheckpointStatus.retired,
        c: CheckpointStatus.retired,
    }


def _candidates(session, count: int) -> list[int]:
    job = Job(base_model="m", status="succeeded")
    session.add(job)
    session.commit()
    ids = []
    for step in range(count):
        checkpoint = Checkpoint(job_id=job.id, step=step, path=f"c{step}", base_model="m")
        session.add(checkpoint)
        session.commit()
        ids.append(checkpoint.id)
    return ids


def test_reject_only_moves_a_candidate_and_a_promotion_refuses_a_rejected_checkpoint(
    engine,
) -> None:
    from storage.models import AuditLog
    from storage.promotions import reject_checkpoint

    with new_session(engine) as session:
        served, refused = _candidates(session, 2)
        record_promotion(
            session,
            checkpoint_id=served,
            previous_checkpoint_id=None,
            action="promote",
            decided_by="U1",
        )
        with pytest.raises(Conflict) as late_reject:  # promoted first: Reject loses
            reject_checkpoint(session, checkpoint_id=served, decided_by="U2")
        assert late_reject.value.message == (
            f"checkpoint {served} was already promoted by U1; it was not rejected"
        )
        reject_checkpoint(session, checkpoint_id=refused, decided_by="U2")
        with pytest.raises(Conflict) as late_promote:  # rejected first: the promotion loses
            record_promotion(
                session,
                checkpoint_id=refused,
                previous_checkpoint_id=served,
                action="promote",
                decided_by="U1",
            )
        assert late_promote.value.message == (
            f"checkpoint {refused} was rejected by U2; it was not promoted"
        )
        states = {
            i: session.get(Checkpoint, i, populate_existing=True).status for i in (served, refused)
        }
        assert states == {served: CheckpointStatus.promoted, refused: CheckpointStatus.rejected}
        assert serving_history(session).current == served  # nothing recorded for the loser
        audit = [(a.actor, a.action) for a in session.exec(select(AuditLog))]
        assert audit == [("U1", "promote"), ("U2", "reject")]
