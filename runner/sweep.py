"""Sweeps over training settings: ``lr=1e-5,5e-5,1e-4 epochs=2,3 lora_rank=16`` is the cartesian
product of the comma lists (6 runs here), every run sharing the single-valued settings.

``parse_sweep`` checks every value of every list on its own (a bad one is named with its setting
and allowed range), then every run's whole config, and refuses more runs than ``SWEEP_MAX_RUNS``
with the count. ``lora_target`` is never split: its value is itself a comma list of modules.
``after_run`` is what a runner calls when a run of a sweep ends: the one that sees the last run end
draws the overlaid loss curves and the scores by setting, and writes the ``sweep_finished`` event
(the best run by macro-F1 named) for the sweep's thread.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from runner.config import TrainConfig, _canonical, parse_train_args

log = logging.getLogger(__name__)

NOT_SWEPT = {"lora_target"}  # comma-separated by nature


@dataclass(frozen=True)
class SweepPlan:
    grid: dict[str, list[str]]  # canonical setting → its values as typed, in order
    fixed: list[str]  # the key=value tokens every run shares
    runs: list[TrainConfig]
    run_settings: list[dict[str, str]]  # per run: the swept settings' values as typed


def parse_sweep(tokens: list[str], *, max_runs: int) -> SweepPlan:
    """The sweep described by ``key=value`` tokens whose values may be comma lists."""
    grid: dict[str, list[str]] = {}
    shown: dict[str, str] = {}
    fixed: list[str] = []
    for token in tokens:
        key, sep, raw = token.partition("=")
        if not sep:
            raise ConfigError(f"`{token}` is not key=value (for example lr=1e-5,5e-5)")
        name = _canonical(key.strip())
        values = [v.strip() for v in raw.split(",")]
        if name in NOT_SWEPT or len(values) == 1:
            fixed.append(token)
            continue
        if any(not v for v in values):
            raise ConfigError(f"`{token}`: an empty value in the list of {key}")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"`{token}`: {key} lists {', '.join(repeated)} more than once")
        if name in grid:
            raise ConfigError(f"`{key}` and `{shown[name]}` both list values for {name}")
        grid[name], shown[name] = values, key.strip()
    parse_train_args(fixed)  # the shared settings, checked on their own first
    if not grid:
        raise ConfigError(
            "a sweep needs at least one setting with several values, for example "
            "lr=1e-5,5e-5,1e-4 (one run is `/finetune start`)"
        )
    count = 1
    for values in grid.values():
        count *= len(values)
    if count > max_runs:
        sizes = " × ".join(f"{len(v)} {shown[k]}" for k, v in grid.items())
        raise ConfigError(
            f"the sweep has {count} runs ({sizes}); at most {max_runs} are allowed "
            "(SWEEP_MAX_RUNS): drop a value or a setting"
        )
    for name, values in grid.items():  # each value on its own: the message names it
        for value in values:
            parse_train_args([*fixed, f"{shown[name]}={value}"])
    runs, run_settings = [], []
    for combination in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combination, strict=True))
        tokens_of_run = [*fixed, *(f"{shown[k]}={v}" for k, v in chosen.items())]
        try:
            runs.append(parse_train_args(tokens_of_run))
        except ConfigError as exc:  # a combination the config refuses as a whole
            label = " ".join(f"{shown[k]}={v}" for k, v in chosen.items())
            raise ConfigError(f"the run {label}: {exc.message}") from exc
        run_settings.append({shown[k]: v for k, v in chosen.items()})
    return SweepPlan(grid=grid, fixed=fixed, runs=runs, run_settings=run_settings)


def run_configs(plan: SweepPlan) -> list[dict[str, Any]]:
    """Each run's config as a job stores it: what differs from the defaults, and the swept
    settings always (the comparison reads them from there, a default value included)."""
    return [
        {**run.model_dump(exclude_defaults=True), **{k: getattr(run, k) for k in plan.grid}}
        for run in plan.runs
    ]


def after_run(session: Any, store: Any, *, sweep_id: int) -> bool:
    """Call when every run of the sweep ended. Draws the sweep's plots and stores them, then
    marks the sweep finished and writes ``sweep_finished`` in one transaction: True for the one
    caller that did. The plots come first, so a failure while drawing leaves the sweep unfinished
    for the next round instead of finished without its announcement; two runners seeing the end at
    once may both draw, and only one announces."""
    from runner.plots import sweep_loss_curves_png, sweep_scores_png
    from storage.sweeps import add_sweep_event, best_row, finish_sweep, get_sweep, sweep_rows

    sweep = get_sweep(session, sweep_id)
    if sweep.finished_at is not None:
        return False
    rows = sweep_rows(session, sweep)
    labels = {r.job_id: f"#{r.job_id} {r.settings_text}" for r in rows}
    curves = {}
    for row in rows:
        if row.losses_sha256:
            try:
                curves[labels[row.job_id]] = json.loads(store.read_bytes(row.losses_sha256))
            except (OSError, ValueError):
                log.warning("sweep %d: job %d's losses are unreadable", sweep_id, row.job_id)
    title = f"sweep {sweep_id}"
    loss_plot = store.put_bytes(sweep_loss_curves_png(curves, title=f"{title}: training loss"))
    score_plot = store.put_bytes(
        sweep_scores_png(
            {labels[r.job_id]: (r.accuracy, r.macro_f1) for r in rows},
            title=f"{title}: eval accuracy and macro-F1 by setting",
        )
    )
    best = best_row(rows)
    if not finish_sweep(session, sweep_id=sweep_id, commit=False):
        session.rollback()  # a run is still open, or another runner announced it meanwhile
        return False
    add_sweep_event(
        session,
        sweep=sweep,
        kind="sweep_finished",
        commit=False,
        loss_curves_sha256=loss_plot.sha256,
        scores_sha256=score_plot.sha256,
        best_job_id=best.job_id if best else None,
        best_checkpoint_id=best.checkpoint_id if best else None,
    )
    session.commit()
    log.info("sweep %d finished: best run %s", sweep_id, best.job_id if best else "none")
    return True


def format_table(rows: list[Any], best_job_id: int | None) -> str:
    """The comparison as text (the CLI's `sweep-status`; Slack draws its own)."""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = ["run | settings | state | final loss | accuracy | macro-F1 | ECE | tokens/s"]
    for r in rows:
        mark = " ★ best" if r.job_id == best_job_id else ""
        loss = "–" if r.final_loss is None else f"{r.final_loss:.4f}"
        speed = "–" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
        lines.append(
            f"{r.job_id}{mark} | {r.settings_text} | {r.status} | {loss} | {pct(r.accuracy)} | "
            f"{pct(r.macro_f1)} | {pct(r.ece)} | {speed}"
        )
    return "\n".join(lines)
