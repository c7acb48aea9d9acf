"""The runner's command line.

    python -m runner ingest PATH --name NAME     validate, store, print the report
    python -m runner validate PATH [--json]      only report; nothing is stored

Exit status: 0 accepted, 1 rejected (the reasons on stderr), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
    sub = parser.add_subparsers(dest="command", required=True)
    ingest = sub.add_parser("ingest", help="validate and store a dataset")
    _add_dataset_options(ingest)
    ingest.add_argument("--name", required=True, help="dataset name (a new version if it exists)")
    validate = sub.add_parser("validate", help="report on a dataset without storing it")
    _add_dataset_options(validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = Settings()
    try:
        return _run(args, settings)
    except DatasetRejected as exc:
        if args.json:
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


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from runner.datasets.ingest import IngestOptions, ingest_dataset, validate_dataset
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
        engine = make_engine(settings.database_url)
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


if __name__ == "__main__":
    sys.exit(main())
