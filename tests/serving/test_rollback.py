"""Rollback walks back through what served (the promotions table replayed as a stack), over real
HTTP against the serving app (transformers backend) on SQLite and PostgreSQL: one step at a time
down to the base model and then a refusal, ``to N``, a stale confirmation refused, a target that
cannot be loaded refused, and replicas that follow every rollback."""

from __future__ import annotations

import shutil
import time

from sqlmodel import col, select

from core.enums import CheckpointStatus
from storage.db import new_session
from storage.models import AuditLog, Checkpoint, Promotion
from tests.serving.conftest import (
    ANSWERS,
    classify,
    local_settings,
    promote,
    serve_in_thread,
)


def _serving(client) -> int | None:
    return client.get("/healthz").json()["current"]["checkpoint_id"]


def _rollback(client, **body):
    return client.post("/v1/adapters/rollback", json={"by": "U2", **body})


def _statuses(engine, ids: dict[str, int]) -> dict[str, str]:
    with new_session(engine) as session:
        return {name: session.get(Checkpoint, i).status for name, i in ids.items()}


def _promotions(engine) -> list[tuple[str, int | None, int | None]]:
    with new_session(engine) as session:
        rows = session.exec(select(Promotion).order_by(col(Promotion.id))).all()
    return [(p.action, p.checkpoint_id, p.previous_checkpoint_id) for p in rows]


def _promote_all(client, ids: dict[str, int]) -> None:
    for name in ("A", "B", "C"):
        assert promote(client, ids[name]).status_code == 200


def test_rollback_walks_back_to_the_base_model_and_then_refuses(engine, adapters, local) -> None:
    a, b, c = adapters["A"], adapters["B"], adapters["C"]
    with local.client() as client:
        _promote_all(client, adapters)
        assert classify(client)["label"] == ANSWERS["C"]
        plan = client.get("/v1/adapters/rollback")
        assert plan.status_code == 200 and plan.json() == {
            "current": {"adapter": f"checkpoint-{c}", "checkpoint_id": c},
            "target": {"adapter": f"checkpoint-{b}", "checkpoint_id": b},
        }
        for expected, name in ((b, "B"), (a, "A")):
            response = _rollback(client)
            assert response.status_code == 200, response.text
            assert response.json()["current"]["checkpoint_id"] == expected
            answer = classify(client)
            assert answer["label"] == ANSWERS[name] and answer["model"]["checkpoint_id"] == expected
            if name == "B":  # the one rolled back to is promoted again, the one left retired
                assert _statuses(engine, adapters) == {
                    "A": CheckpointStatus.retired,
                    "B": CheckpointStatus.promoted,
                    "C": CheckpointStatus.retired,
                }
        assert client.get("/v1/adapters/rollback").json()["target"]["checkpoint_id"] is None
        assert _rollback(client).json()["current"] == {"adapter": None, "checkpoint_id": None}
        assert classify(client)["model"]["checkpoint_id"] is None
        for refused in (_rollback(client), client.get("/v1/adapters/rollback")):
            assert refused.status_code == 409
            assert refused.json()["error"]["message"] == (
                "nothing to roll back: the base model serves and nothing served before it"
            )
    assert _promotions(engine) == [
        ("promote", a, None),
        ("promote", b, a),
        ("promote", c, b),
        ("rollback", b, c),
        ("rollback", a, b),
        ("rollback", None, a),
    ]
    assert set(_statuses(engine, adapters).values()) == {CheckpointStatus.retired}
    with new_session(engine) as session:
        audit = [(r.action, r.target) for r in session.exec(select(AuditLog)).all()]
    assert audit[3:] == [
        ("rollback", f"checkpoint:{b}"),
        ("rollback", f"checkpoint:{a}"),
        ("rollback", "base"),
    ]


def test_rollback_to_a_checkpoint_that_served_before_cuts_the_history_below_it(
    engine, adapters, local
) -> None:
    a, b, c = adapters["A"], adapters["B"], adapters["C"]
    with local.client() as client:
        _promote_all(client, adapters)
        for to, status in ((999, 409), (c, 409), ("x", 422)):
            assert client.get("/v1/adapters/rollback", params={"to": to}).status_code == status
        unknown = _rollback(client, to=999)
        assert unknown.status_code == 409 and unknown.json()["error"]["message"] == (
            f"checkpoint 999 did not serve before checkpoint {c}: roll back to "
            f"checkpoint {b}, checkpoint {a} or the base model"
        )
        assert "checkpoint" in _rollback(client, to=c).json()["error"]["message"]
        assert client.get("/v1/adapters/rollback", params={"to": a}).json()["target"] == {
            "adapter": f"checkpoint-{a}",
            "checkpoint_id": a,
        }
        assert _rollback(client, to=a).json()["current"]["checkpoint_id"] == a
        assert classify(client)["label"] == ANSWERS["A"]
        assert _statuses(engine, adapters) == {
            "A": CheckpointStatus.promoted,
            "B": CheckpointStatus.retired,
            "C": CheckpointStatus.retired,
        }
        # B was cut from the history with C: one step back from A is the base model.
        assert _rollback(client).json()["current"]["checkpoint_id"] is None
        # And `to base` jumps straight there from anywhere.
        _promote_all(client, adapters)
        assert _rollback(client, to="base").json()["current"]["checkpoint_id"] is None
    assert _promotions(engine)[3:5] == [("rollback", a, c), ("rollback", None, a)]
    assert _promotions(engine)[-1] == ("rollback", None, c)


def test_a_stale_confirmation_is_refused_with_what_serves_now(engine, adapters, local) -> None:
    b, c = adapters["B"], adapters["C"]
    with local.client() as client:
        for name in ("A", "B"):
            assert promote(client, adapters[name]).status_code == 200
        shown = client.get("/v1/adapters/rollback").json()  # B now, A after
        assert promote(client, c).status_code == 200  # meanwhile, someone promotes C
        before = _promotions(engine)
        stale = _rollback(
            client,
            to=shown["target"]["checkpoint_id"],
            expected_current=shown["current"]["checkpoint_id"],
        )
        assert stale.status_code == 409
        assert stale.json()["error"]["message"] == (
            f"what serves changed since the rollback was shown: checkpoint {c} serves now, "
            f"not checkpoint {b}; nothing was rolled back"
        )
        assert _serving(client) == c and _promotions(engine) == before
        fresh = _rollback(client, expected_current=c)
        assert fresh.status_code == 200 and fresh.json()["current"]["checkpoint_id"] == b
        assert _rollback(client, expected_current="base").status_code == 409


def test_a_rollback_whose_target_cannot_be_loaded_changes_nothing(
    engine, store, adapters, local
) -> None:
    a, b, c = adapters["A"], adapters["B"], adapters["C"]
    with local.client() as client:
        _promote_all(client, adapters)
        assert _rollback(client).json()["current"]["checkpoint_id"] == b
        shutil.rmtree(store.path("checkpoints/A"))  # A is no longer loaded: it must load again
        before = _promotions(engine)
        refused = _rollback(client)
        assert refused.status_code == 422
        assert f"checkpoint {a} is incomplete" in refused.json()["error"]["message"]
        assert _serving(client) == b and classify(client)["label"] == ANSWERS["B"]
    assert _promotions(engine) == before
    assert _statuses(engine, adapters)["B"] == CheckpointStatus.promoted
    assert _statuses(engine, {"C": c})["C"] == CheckpointStatus.retired


def test_replicas_follow_every_rollback_and_either_can_roll_back(
    db_url, engine, store, tiny_model_dir, adapters
) -> None:
    a, b, c = adapters["A"], adapters["B"], adapters["C"]
    settings = local_settings(db_url, store.root, tiny_model_dir, serving_sync_seconds=0.2)

    def follows(client, expected: int | None) -> None:
        deadline = time.monotonic() + 30
        while _serving(client) != expected:
            assert time.monotonic() < deadline, f"the replica did not follow to {expected}"
            time.sleep(0.1)

    with (
        serve_in_thread(settings) as one,
        serve_in_thread(settings) as two,
        one.client() as first,
        two.client() as second,
    ):
        _promote_all(first, adapters)
        follows(second, c)
        assert _rollback(second).json()["current"]["checkpoint_id"] == b
        follows(first, b)
        assert classify(first)["label"] == ANSWERS["B"]
        assert _rollback(first).json()["current"]["checkpoint_id"] == a
        follows(second, a)
        assert classify(second)["label"] == ANSWERS["A"]
        assert _rollback(second).json()["current"]["checkpoint_id"] is None
        follows(first, None)
    assert [p[0] for p in _promotions(engine)].count("rollback") == 3
