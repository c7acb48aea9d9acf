"""Sweeps: the grid's cartesian product, refused clearly when bad or too large; queued in one
transaction; finished exactly once however its runs end; and through the runner for real: every
run trained and evaluated, the plots drawn, the best run by macro-F1 named."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.exc import StatementError
from sqlmodel import select

from core.enums import JobStatus
from core.errors import ConfigError, Conflict
from core.settings import Settings
from runner.__main__ import _sweep, build_parser
from runner.sweep import parse_sweep, run_configs
from runner.worker import Runner
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Job, JobEvent, Sweep
from storage.sweeps import (
    best_row,
    cancel_sweep,
    create_sweep,
    finish_sweep,
    get_sweep,
    sweep_jobs,
    sweep_rows,
    unfinished_sweeps_done,
)


def test_a_sweep_is_the_cartesian_product_of_its_lists() -> None:
    plan = parse_sweep(
        ["lr=1e-5,5e-5,1e-4", "epochs=2,3", "lora_rank=16", "lora_target=q_proj,v_proj"],
        max_runs=8,
    )
    assert plan.grid == {"learning_rate": ["1e-5", "5e-5", "1e-4"], "num_train_epochs": ["2", "3"]}
    assert plan.fixed == ["lora_rank=16", "lora_target=q_proj,v_proj"]  # never split
    assert [(r.learning_rate, r.num_train_epochs) for r in plan.runs] == [
        (1e-5, 2),
        (1e-5, 3),
        (5e-5, 2),
        (5e-5, 3),
        (1e-4, 2),
        (1e-4, 3),
    ]
    assert all(r.lora_rank == 16 and r.lora_target == "q_proj,v_proj" for r in plan.runs)
    assert plan.run_settings[3] == {"lr": "5e-5", "epochs": "3"}
    configs = run_configs(plan)
    assert all({"learning_rate", "num_train_epochs"} <= set(c) for c in configs)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            ["lr=1e-5,5e-5,1e-4", "epochs=2,3,4"],
            "the sweep has 9 runs (3 lr × 3 epochs); at most 8 are allowed (SWEEP_MAX_RUNS)",
        ),
        (["lr=1e-5,abc"], "lr=abc is not a number; learning_rate must be > 0 and ≤ 0.01"),
        (["lr=1e-5,0.5"], "lr=0.5 is not allowed: learning_rate must be > 0 and ≤ 0.01"),
        (["lr=1e-5,1e-5"], "lr lists 1e-5 more than once"),
        (["lr=1e-5,"], "an empty value in the list of lr"),
        (["lr=1e-5"], "a sweep needs at least one setting with several values"),
        (["lr=1e-5,5e-5", "learning_rate=1e-4,2e-4"], "both list values for learning_rate"),
        (["lr=1e-5,5e-5", "bogus=1"], "unknown setting `bogus`"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_setting(tokens: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_sweep(tokens, max_runs=8)
    assert message in raised.value.message


def test_a_sweep_is_queued_whole_or_not_at_all_and_finishes_once(engine) -> None:
    # A run config that cannot be stored: nothing is queued.
    with new_session(engine) as session, pytest.raises((TypeError, StatementError)):
        create_sweep(
            session,
            base_model="tiny",
            dataset_id=None,
            grid={"learning_rate": ["1e-5", "2e-5"]},
            fixed={},
            runs=[{"learning_rate": 1e-5}, {"learning_rate": object()}],
        )
    with new_session(engine) as session:
        assert session.exec(select(Sweep)).all() == [] and session.exec(select(Job)).all() == []
        sweep, jobs = create_sweep(
            session,
            base_model="tiny",
            dataset_id=None,
            grid={"learning_rate": ["1e-5", "2e-5"]},
            fixed={},
            runs=[{"learning_rate": 1e-5}, {"learning_rate": 2e-5}],
            channel_id="C1",
        )
        assert [j.sweep_id for j in jobs] == [sweep.id, sweep.id]
        assert not finish_sweep(session, sweep_id=sweep.id)  # its runs are queued
        assert unfinished_sweeps_done(session) == []
        with pytest.raises(Exception, match="no sweep"):
            get_sweep(session, sweep.id, channel_id="C2")  # another channel sees nothing
        asked = cancel_sweep(session, sweep_id=sweep.id, by="U1")
        assert {j.status for j in asked} == {JobStatus.cancelled.value}
        assert unfinished_sweeps_done(session) == [sweep.id]
        assert finish_sweep(session, sweep_id=sweep.id)
        assert not finish_sweep(session, sweep_id=sweep.id)  # once
        assert unfinished_sweeps_done(session) == []
        with pytest.raises(Conflict, match="already ended"):
            cancel_sweep(session, sweep_id=sweep.id)


def test_a_sweep_through_the_runner_trains_evaluates_and_names_its_best_run(
    engine, eval_settings: Settings, dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = eval_settings.model_copy(update={"sweep_max_runs": 2})
    args = build_parser().parse_args(
        ["sweep", "--dataset", "syn", "lr=1e-3,3e-3", "epochs=2", "lora_rank=8", "bs=8"]
    )
    with new_session(engine) as session:
        assert _sweep(session, settings, args) == 0
        sweep_id = session.exec(select(Sweep.id)).one()
    assert f"queued sweep {sweep_id}: 2 runs of syn v1" in capsys.readouterr().out

    Runner(settings, owner="sweep-test", devices=[None]).run(once=True)

    store = ArtifactStore(settings.artifact_dir)
    with new_session(engine) as session:
        sweep = get_sweep(session, sweep_id)
        runs = sweep_jobs(session, sweep_id)
        rows = sweep_rows(session, sweep)
        finished = session.exec(select(JobEvent).where(JobEvent.kind == "sweep_finished")).all()
    assert [r.status for r in runs] == ["succeeded", "succeeded"], [r.error for r in runs]
    assert [r.config["learning_rate"] for r in runs] == [1e-3, 3e-3]
    assert sweep.finished_at is not None and len(finished) == 1  # announced once
    assert finished[0].job_id == runs[0].id  # on the first run's outbox
    for row in rows:
        assert row.final_loss is not None and row.tokens_per_s and row.tokens_per_s > 0
        assert row.accuracy is not None and row.macro_f1 is not None and row.ece is not None
        assert len(json.loads(store.read_bytes(row.losses_sha256))) > 0
    best = best_row(rows)
    assert best is not None and best.macro_f1 == max(r.macro_f1 for r in rows)
    payload = finished[0].payload
    assert payload["best_job_id"] == best.job_id
    assert payload["best_checkpoint_id"] == best.checkpoint_id
    for key in ("loss_curves_sha256", "scores_sha256"):
        assert store.read_bytes(payload[key])[:8] == b"\x89PNG\r\n\x1a\n"

    status = build_parser().parse_args(["sweep-status", str(sweep_id)])
    with new_session(engine) as session:
        assert _sweep(session, settings, status) == 0
    table = capsys.readouterr().out
    assert f"sweep {sweep_id} (finished), 2 runs:" in table
    assert f"{best.job_id} ★ best | learning_rate=" in table


def test_a_failure_while_drawing_leaves_the_sweep_to_the_next_round_and_it_is_announced_once(
    engine, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runner.plots
    from runner.sweep import after_run

    store = ArtifactStore(tmp_path / "artifacts")
    with new_session(engine) as session:
        sweep, _ = create_sweep(
            session,
            base_model="tiny",
            dataset_id=None,
            grid={"learning_rate": ["1e-5", "2e-5"]},
            fixed={},
            runs=[{"learning_rate": 1e-5}, {"learning_rate": 2e-5}],
        )
        cancel_sweep(session, sweep_id=sweep.id)  # every run ended: the sweep is due
        drawn = runner.plots.sweep_scores_png

        def broken(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(runner.plots, "sweep_scores_png", broken)
        with pytest.raises(OSError, match="disk full"):
            after_run(session, store, sweep_id=sweep.id)
    with new_session(engine) as session:
        assert get_sweep(session, sweep.id).finished_at is None  # not finished unannounced
        assert unfinished_sweeps_done(session) == [sweep.id]  # the next round takes it
        monkeypatch.setattr(runner.plots, "sweep_scores_png", drawn)
        assert after_run(session, store, sweep_id=sweep.id)
        assert not after_run(session, store, sweep_id=sweep.id)
        announced = session.exec(select(JobEvent).where(JobEvent.kind == "sweep_finished")).all()
    assert len(announced) == 1 and announced[0].payload["best_job_id"] is None  # none evaluated
