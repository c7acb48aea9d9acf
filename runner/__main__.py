"""The runner's command line.

    python -m runner [--once]                    serve the job queue (--once: drain it and exit)
    python -m runner submit --dataset NAME [k=v ...]   queue a training job (see `help`)
    python -m runner status [JOB]                one job, or the latest jobs
    python -m runner cancel JOB                  cancel a queued or running job
    python -m runner evaluate CHECKPOINT|base --dataset NAME   score a model on the eval split
    python -m runner export CHECKPOINT [--bits 8|4] [--shard-size 5GB]   a verified standalone model
    python -m runner export CHECKPOINT --format gguf [--quant f16|q8_0|q4_0]   GGUF + Modelfile
    python -m runner help                        every training setting, its default and range
    python -m runner ingest PATH --name NAME     validate, store, print the report
    python -m runner validate PATH [--json]      only report; nothing is stored

Exit status: 0 success, 1 rejected dataset (the reasons on stderr), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sqlmodel import Session

from core.errors import DatasetRejected, FinetuneError
from core.settings import Settings

log = logging.getLogger("runner")


def _add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a .json/.jsonl/.csv/.tsv file, a .zip or a folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--model",
        type=Path,
        help="model directory whose tokenizer measures "
        "token lengths (default: BASE_MODEL, or the tiny local model)",
    )
    parser.add_argument("--cutoff-len", type=int, help="token length to compare samples with")
    parser.add_argument("--text-column", help="CSV/TSV column holding the text")
    parser.add_argument("--label-column", help="CSV/TSV column holding the label")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--once", action="store_true", help="drain the queue, then exit")
    sub = parser.add_subparsers(dest="command")
    submit = sub.add_parser("submit", help="queue a training job")
    submit.add_argument("--dataset", required=True, help="dataset name (its newest version)")
    submit.add_argument("settings", nargs="*", help="training settings as key=value")
    sweep = sub.add_parser(
        "sweep", help="queue a sweep: every combination of comma-listed settings as one job"
    )
    sweep.add_argument("--dataset", required=True, help="dataset name (its newest version)")
    sweep.add_argument("settings", nargs="+", help="key=value or key=v1,v2,… (lr=1e-5,5e-5)")
    sweep_status = sub.add_parser("sweep-status", help="a sweep's comparison table")
    sweep_status.add_argument("sweep", type=int)
    sweep_cancel = sub.add_parser("sweep-cancel", help="cancel every run of a sweep")
    sweep_cancel.add_argument("sweep", type=int)
    status = sub.add_parser("status", help="show a job or the latest jobs")
    status.add_argument("job", nargs="?", type=int)
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job", type=int)
    sub.add_parser("help", help="list the training settings")
    export = sub.add_parser(
        "export", help="merge a checkpoint into its base model, verify it, save it"
    )
    export.add_argument("checkpoint", type=int, help="a checkpoint id")
    export.add_argument("--bits", type=int, choices=[8, 4], help="bitsandbytes-quantized copy")
    export.add_argument("--shard-size", default="5GB", help="largest safetensors shard (5GB)")
    export.add_argument(
        "--format", choices=["safetensors", "gguf"], default="safetensors", help="what to write"
    )
    export.add_argument(
        "--quant", choices=["f16", "q8_0", "q4_0"], help="GGUF weight type (default f16)"
    )
    evaluate = sub.add_parser("evaluate", help="score a checkpoint or the base model")
    evaluate.add_argument("model", help="a checkpoint id, or `base`")
    evaluate.add_argument("--dataset", required=True, help="dataset name (its newest version)")
    evaluate.add_argument("--max-new-tokens", type=int, help="default: from the eval answers")
    evaluate.add_argument("--backend", choices=["auto", "vllm", "transformers"])
    ingest = sub.add_parser("ingest", help="validate and store a dataset")
    _add_dataset_options(ingest)
    ingest.add_argument("--name", required=True, help="dataset name (a new version if it exists)")
    ingest.add_argument(
        "--benchmark",
        action="store_true",
        help="a multiple-choice benchmark (C-Eval, CMMLU or MMLU CSVs) for the general-ability "
        "check (EVAL_GENERAL_BENCHMARK), not training data",
    )
    validate = sub.add_parser("validate", help="report on a dataset without storing it")
    _add_dataset_options(validate)
    distill = sub.add_parser(
        "distill", help="have a teacher write the reasoning of a label-only dataset"
    )
    distill.add_argument("--dataset", required=True, help="a labelled dataset (its newest version)")
    distill.add_argument("--teacher", required=True, help="OpenAI-compatible API base URL (…/v1)")
    distill.add_argument("--model", required=True, help="the teacher's model name")
    distill.add_argument("--name", help="the new dataset's name (default: <dataset>-distilled)")
    distill.add_argument("--tries", type=int, default=3, help="asks per sample at most (3)")
    distill.add_argument("--limit", type=int, help="distill only the first N samples")
    distill.add_argument("--max-tokens", type=int, default=512, help="answer budget (512)")
    distill.add_argument("--api-key-env", help="environment variable holding the teacher's API key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = Settings()
    try:
        if args.command in (
            None,
            "submit",
            "sweep",
            "sweep-status",
            "sweep-cancel",
            "status",
            "cancel",
            "help",
            "evaluate",
            "export",
            "distill",
        ):
            return _run_queue_command(args, settings)
        return _run(args, settings)
    except DatasetRejected as exc:
        if getattr(args, "json", False):
            print(
                json.dumps(
                    {"accepted": False, "problems": [p.to_dict() for p in exc.problems]},
                    ensure_ascii=False,
                    indent=2,
                )
            )
        print(exc.message, file=sys.stderr)
        return 1
    except FinetuneError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


def _run_queue_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "help":
        from runner.config import help_lines

        print("Training settings (key=value; short aliases in brackets):")
        print("\n".join(f"  {line}" for line in help_lines()))
        return 0
    from storage.db import make_engine
    from storage.migrate import check_schema

    engine = make_engine(settings.db_url)
    check_schema(engine)
    engine.dispose()
    if args.command is None:
        from runner.worker import main_loop

        return main_loop(settings, once=args.once)
    from storage.db import new_session

    engine = make_engine(settings.db_url)
    with new_session(engine) as session:
        if args.command == "submit":
            return _submit(session, settings, args)
        if args.command in ("sweep", "sweep-status", "sweep-cancel"):
            return _sweep(session, settings, args)
        if args.command == "evaluate":
            return _evaluate(session, settings, args)
        if args.command == "export":
            return _export(session, settings, args)
        if args.command == "distill":
            return _distill(session, settings, args)
        if args.command == "cancel":
            from storage.jobs import request_cancel

            job = request_cancel(session, job_id=args.job, by="cli")
            print(
                f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'cancel requested'}"
            )
            return 0
        return _status(session, args.job)


def _distill(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    import os

    from core.errors import ConfigError, NotFound
    from runner.distill import DistillLimits, Teacher, distill_dataset
    from storage.artifacts import ArtifactStore
    from storage.datasets import get_dataset

    dataset = get_dataset(session, name=args.dataset)
    if dataset is None:
        raise NotFound(f"no dataset named {args.dataset}: ingest one first")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that variable is not set")
    teacher = Teacher(
        args.teacher,
        args.model,
        api_key=key,
        timeout_s=settings.distill_timeout_seconds,
        max_tokens=args.max_tokens,
    )
    limits = DistillLimits(
        tries=args.tries,
        concurrency=settings.distill_concurrency,
        requests_per_second=settings.distill_requests_per_second,
    )
    stored, summary = distill_dataset(
        session,
        ArtifactStore(settings.artifact_dir),
        settings,
        dataset=dataset,
        teacher=teacher,
        limits=limits,
        name=args.name,
        limit=args.limit,
        channel_id=dataset.channel_id,  # the operator's distill stays in the source's scope
    )
    print(
        f"Stored dataset {stored.name} v{stored.version} (id {stored.id}): {summary['kept']} of "
        f"{summary['samples']} samples kept ({summary['yield']:.0%}), "
        f"{summary['teacher_requests']} teacher requests, {summary['tokens']} tokens "
        f"({summary['asked_now']} samples asked in this run)"
    )
    for label, row in summary["per_label"].items():
        print(f"  {label}: {row['kept']} of {row['asked']} kept ({row['yield']:.0%})")
    return 0


def _submit(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from runner.config import parse_train_args
    from runner.models import base_model_name
    from storage.datasets import get_dataset
    from storage.jobs import create_job

    config = parse_train_args(args.settings)
    dataset = get_dataset(session, name=args.dataset)
    if dataset is None:
        raise NotFound(f"no dataset named {args.dataset}: ingest one first")
    if config.mix_spec is not None:
        from storage.datasets import mix_dataset

        mix_dataset(session, name=config.mix_spec[0], channel_id=None)
    job = create_job(
        session,
        base_model=base_model_name(settings),  # type: ignore[arg-type]
        config=config.model_dump(exclude_defaults=True),
        dataset_id=dataset.id,
        requested_by="cli",
    )
    what = (
        f"stage=pt, {dataset.train_samples} documents"
        if dataset.kind == "pt"
        else f"{len(dataset.labels or [])} labels"
    )
    print(f"queued job {job.id}: {dataset.name} v{dataset.version} on {job.base_model}, {what}")
    return 0


def _sweep(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from runner.config import parse_train_args
    from runner.models import base_model_name
    from runner.sweep import format_table, parse_sweep, run_configs
    from storage.datasets import get_dataset
    from storage.sweeps import best_row, cancel_sweep, create_sweep, get_sweep, sweep_rows

    if args.command == "sweep-status":
        sweep = get_sweep(session, args.sweep)
        rows = sweep_rows(session, sweep)
        best = best_row(rows)
        state = "finished" if sweep.finished_at else "running"
        print(f"sweep {sweep.id} ({state}), {len(rows)} runs:")
        print(format_table(rows, best.job_id if best else None))
        return 0
    if args.command == "sweep-cancel":
        get_sweep(session, args.sweep)
        asked = cancel_sweep(session, sweep_id=args.sweep, by="cli")
        print(f"sweep {args.sweep}: cancel asked of {len(asked)} runs")
        return 0
    plan = parse_sweep(args.settings, max_runs=settings.sweep_max_runs)
    dataset = get_dataset(session, name=args.dataset)
    if dataset is None:
        raise NotFound(f"no dataset named {args.dataset}: ingest one first")
    sweep, jobs = create_sweep(
        session,
        base_model=base_model_name(settings),
        dataset_id=dataset.id,
        grid=plan.grid,
        fixed=parse_train_args(plan.fixed).model_dump(exclude_defaults=True),
        runs=run_configs(plan),
        requested_by="cli",
    )
    print(
        f"queued sweep {sweep.id}: {len(jobs)} runs of {dataset.name} v{dataset.version} "
        f"(jobs {', '.join(str(j.id) for j in jobs)})"
    )
    return 0


def _export(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    from runner.export import export_checkpoint
    from storage.artifacts import ArtifactStore

    report = export_checkpoint(
        session,
        ArtifactStore(settings.artifact_dir),
        settings,
        checkpoint_id=args.checkpoint,
        bits=args.bits,
        quant=args.quant or ("f16" if args.format == "gguf" else None),  # --quant means GGUF
        shard_size=args.shard_size,
        on_status=lambda message: log.info("%s", message),
    )
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def _evaluate(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from runner.eval.report import evaluate_model
    from runner.models import base_model_name
    from storage.artifacts import ArtifactStore
    from storage.datasets import get_dataset
    from storage.models import Checkpoint

    if args.backend:
        settings = settings.model_copy(update={"eval_backend": args.backend})
    dataset = get_dataset(session, name=args.dataset)
    if dataset is None:
        raise NotFound(f"no dataset named {args.dataset}")
    checkpoint = None
    base_model = base_model_name(settings)
    if args.model != "base":
        if not args.model.isdigit():
            raise NotFound(f"`{args.model}` is neither a checkpoint id nor `base`")
        checkpoint = session.get(Checkpoint, int(args.model))
        if checkpoint is None:
            raise NotFound(f"no checkpoint {args.model}")
        base_model = checkpoint.base_model
    evaluation = evaluate_model(
        session,
        ArtifactStore(settings.artifact_dir),
        settings,
        dataset=dataset,
        base_model=base_model,
        checkpoint=checkpoint,
        max_new_tokens=args.max_new_tokens,
    )
    print(
        json.dumps(
            {
                "evaluation_id": evaluation.id,
                "report_path": evaluation.report_path,
                **evaluation.metrics,
            },
            ensure_ascii=False,
            indent=2,
        )
    )
    return 0


def _status(session: Session, job_id: int | None) -> int:
    from sqlmodel import col, select

    from core.errors import NotFound
    from storage.models import Job

    if job_id is not None:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        jobs = [job]
    else:
        jobs = list(session.exec(select(Job).order_by(col(Job.id).desc()).limit(20)).all())
    for job in jobs:
        progress = job.progress or {}
        step = f"step {progress.get('step')}/{progress.get('total_steps')}" if progress else ""
        loss = f"loss {progress['loss']:.4f}" if "loss" in progress else ""
        error = f"error: {job.error}" if job.error else ""
        print(" ".join(x for x in (f"job {job.id}", job.status, step, loss, error) if x))
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from runner.datasets.ingest import IngestOptions, ingest_dataset, validate_dataset

    if args.command == "ingest" and args.benchmark:
        return _ingest_benchmark(args, settings)
    from runner.datasets.report import render_report
    from runner.models import tokenizer_for_report

    options = IngestOptions.from_settings(
        settings,
        cutoff_len=args.cutoff_len,
        text_column=args.text_column,
        label_column=args.label_column,
    )
    if args.command == "validate":
        # Parse before loading a tokenizer: a rejection should not wait for a model.
        from runner.datasets.ingest import load_dataset

        load_dataset(args.path, options)
        tokenizer, note = tokenizer_for_report(settings, args.model)
        report = validate_dataset(args.path, options, tokenizer=tokenizer, tokenizer_note=note)
    else:
        from runner.datasets.ingest import check_dataset_name, load_dataset
        from storage.artifacts import ArtifactStore
        from storage.db import make_engine, new_session
        from storage.migrate import check_schema

        check_dataset_name(args.name)
        engine = make_engine(settings.db_url)
        check_schema(engine)
        load_dataset(args.path, options)
        tokenizer, note = tokenizer_for_report(settings, args.model)
        with new_session(engine) as session:
            dataset, report = ingest_dataset(
                session,
                ArtifactStore(settings.artifact_dir),
                args.path,
                options,
                name=args.name,
                tokenizer=tokenizer,
                tokenizer_note=note,
            )
        report = {
            "dataset": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
            **report,
        }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        if "dataset" in report:
            d = report["dataset"]
            print(f"Stored dataset {d['name']} v{d['version']} (id {d['id']})")
        print(render_report(report))
    return 0


def _ingest_benchmark(args: argparse.Namespace, settings: Settings) -> int:
    from runner.datasets.ingest import IngestOptions
    from runner.eval.benchmark import ingest_benchmark
    from storage.artifacts import ArtifactStore
    from storage.db import make_engine, new_session
    from storage.migrate import check_schema

    engine = make_engine(settings.db_url)
    check_schema(engine)
    with new_session(engine) as session:
        dataset = ingest_benchmark(
            session,
            ArtifactStore(settings.artifact_dir),
            args.path,
            IngestOptions.from_settings(settings).limits,
            name=args.name,
        )
        report = {
            "dataset": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
            **dataset.report,
        }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(
        f"Stored benchmark {dataset.name} v{dataset.version} (id {dataset.id}): "
        f"{report['layout']} layout, {report['questions']} questions to score in "
        f"{len(report['subjects'])} subjects, {report['examples']} few-shot examples"
    )
    for subject, row in sorted(report["subjects"].items()):
        print(f"  {subject}: {row['scored']} scored, {row['examples']} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
