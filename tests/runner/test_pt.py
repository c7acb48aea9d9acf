"""Continued pre-training (stage=pt): raw-text ingest and its refusals, sequences with loss on
every token, and a pt job end to end whose checkpoint becomes the base of an SFT job."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlmodel import select

from bot.blocks import milestone_text
from core.enums import JobStatus
from core.errors import ConfigError, Conflict, DatasetRejected, NotFound
from core.settings import Settings
from runner.config import parse_train_args
from runner.datasets.ingest import IngestOptions, ingest_dataset, read_documents, validate_dataset
from runner.eval.report import evaluate_model
from runner.export import check_export
from runner.models import load_tokenizer
from runner.pt import ensure_checkpoint_base, pt_examples
from runner.train.packing import pack
from serving.adapters import AdapterRegistry
from serving.engine import AdapterRefused
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import create_job
from storage.models import Checkpoint, Dataset, Job, JobEvent
from storage.promotions import promotion_problem
from tests.runner import dataset_files as files
from tests.runner.conftest import ingest_synthetic, train_job
from tests.runner.train_helpers import KEYWORDS, synthetic

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _options(settings: Settings, cutoff_len: int = 2048) -> IngestOptions:
    return IngestOptions.from_settings(settings, cutoff_len=cutoff_len)


def documents(n: int, seed: int = 0) -> list[str]:
    """Short news-like paragraphs from a small vocabulary: a tiny model learns them quickly."""
    rng = random.Random(seed)
    words = [w for ws in KEYWORDS.values() for w in ws]
    return ["，".join(rng.choice(words) + "新闻" for _ in range(6)) + "。" for _ in range(n)]


def ingest_corpus(engine, settings: Settings, folder: Path, n: int) -> Dataset:
    """``documents(n)`` as a .txt of one document a line, ingested as the deployment's
    ``corpus``."""
    path = folder / "corpus.txt"
    path.write_text("\n".join(documents(n)) + "\n", encoding="utf-8")
    with new_session(engine) as session:
        stored, _ = ingest_dataset(
            session,
            ArtifactStore(settings.artifact_dir),
            path,
            _options(settings),
            name="corpus",
            tokenizer=None,
        )
    return stored


@SQLITE
def test_txt_blocks_lines_jsonl_and_dataset_info_ingest_as_raw_text(
    settings: Settings, tokenizer, tmp_path: Path
) -> None:
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("第一篇\n仍是第一篇\n\n第二篇\n\n\n第三篇\n", encoding="utf-8")
    report = validate_dataset(blocks, _options(settings), tokenizer=tokenizer)
    assert report["kind"] == "pt" and report["samples"] == {"train": 3}
    assert report["splits"]["train"]["tokens"]["total"] > 0

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(documents(20)) + "\n", encoding="utf-8")
    report = validate_dataset(lines, _options(settings), tokenizer=None)
    assert report["samples"] == {"train": 18, "eval": 2} and report["held_out"]

    records = files.write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in documents(5)])
    assert validate_dataset(records, _options(settings), tokenizer=None)["samples"] == {"train": 5}

    folder = tmp_path / "lf"
    folder.mkdir()
    files.write_json(folder / "pt.json", [{"body": d} for d in documents(4)])
    files.write_json(folder / "pt_eval.json", [{"body": d} for d in documents(2, seed=1)])
    files.write_json(
        folder / "dataset_info.json",
        {
            "corpus": {"file_name": "pt.json", "columns": {"prompt": "body"}},
            "corpus_eval": {"file_name": "pt_eval.json", "columns": {"prompt": "body"}},
        },
    )
    report = validate_dataset(folder, _options(settings), tokenizer=None)
    assert report["kind"] == "pt" and report["samples"] == {"train": 4, "eval": 2}
    assert not report["held_out"]


@SQLITE
def test_the_report_counts_duplicates_and_documents_over_cutoff(
    settings: Settings, tokenizer, tmp_path: Path
) -> None:
    long = "，".join(["球队比赛冠军进球"] * 20)
    path = tmp_path / "a.txt"
    path.write_text(f"短文一\n\n短文一\n\n{long}\n", encoding="utf-8")
    report = validate_dataset(path, _options(settings, cutoff_len=16), tokenizer=tokenizer)
    tokens = report["splits"]["train"]["tokens"]
    assert report["duplicates"] == {"train": 1}
    assert tokens["over_cutoff"] == 1 and tokens["sequences_if_split"] > 3
    messages = [p["message"] for p in report["problems"]]
    assert any("exact duplicate of document 0" in m for m in messages)
    assert any("over cutoff_len 16" in m and "long_docs=truncate" in m for m in messages)


@SQLITE
def test_raw_text_rejections_name_the_file_record_and_field(
    settings: Settings, tmp_path: Path
) -> None:
    bad = files.write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "好"}, {"text": "  "}, {"text": 3}, {"body": "x"}]
    )
    with pytest.raises(DatasetRejected) as rejected:
        validate_dataset(bad, _options(settings), tokenizer=None)
    text = str(rejected.value)
    assert "bad.jsonl, record 1, field `text`: empty document" in text
    assert "record 2, field `text`: must be a string" in text
    assert "record 3" in text  # {"body"} is not a text record: unknown format or missing text

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(DatasetRejected, match=r"empty\.txt: no documents"):
        validate_dataset(empty, _options(settings), tokenizer=None)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.txt").write_text("一篇文章\n", encoding="utf-8")
    files.write_json(mixed / "eval.json", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DatasetRejected, match="mixes raw text"):
        validate_dataset(mixed, _options(settings), tokenizer=None)


def test_pt_sequences_train_on_every_token_and_split_or_cut_long_documents(tokenizer) -> None:
    docs = ["球队比赛冠军", "，".join(["股价大盘指数涨停"] * 10)]
    split = pt_examples(tokenizer, docs, parse_train_args(["stage=pt", "cutoff_len=16"]))
    cut = pt_examples(
        tokenizer, docs, parse_train_args(["stage=pt", "cutoff_len=16", "long_docs=truncate"])
    )
    assert len(cut) == 2 and len(split) > 2 and all(len(e.input_ids) <= 16 for e in split)
    assert split[0].input_ids[-1] == tokenizer.eos_token_id
    batch = pack(split)
    every = [t for e in split for t in e.input_ids[1:]]  # every token but each sequence's first
    assert batch.targets.tolist() == every
    assert batch.cu_seqlens.tolist()[-1] == sum(len(e.input_ids) for e in split)


@SQLITE
def test_a_job_refuses_data_of_the_other_stage_and_a_base_that_is_not_pt(
    engine, settings: Settings, tmp_path: Path, dataset: Dataset
) -> None:
    text = ingest_corpus(engine, settings, tmp_path, 3)
    assert text.kind == "pt"
    with new_session(engine) as session:
        with pytest.raises(ConfigError, match=r"corpus v1 is raw text.*stage=pt"):
            create_job(session, base_model="m", config={}, dataset_id=text.id)
        with pytest.raises(ConfigError, match=r"corpus v1 is raw text.*no labels to score"):
            evaluate_model(
                session,
                ArtifactStore(settings.artifact_dir),
                settings,
                dataset=text,
                base_model="m",
                checkpoint=None,
            )
        with pytest.raises(ConfigError, match="syn v1 holds conversations"):
            create_job(session, base_model="m", config={"stage": "pt"}, dataset_id=dataset.id)
        with pytest.raises(NotFound, match="base=checkpoint-999: no checkpoint 999"):
            create_job(
                session, base_model="m", config={"base": "checkpoint-999"}, dataset_id=dataset.id
            )
    with pytest.raises(ConfigError, match="base=checkpoint-3 is for stage=sft"):
        parse_train_args(["stage=pt", "base=checkpoint-3"])
    with pytest.raises(ConfigError, match="not checkpoint-N"):
        parse_train_args(["base=7"])


@SQLITE
def test_a_pt_job_lowers_perplexity_and_its_checkpoint_is_an_sft_base(
    engine, eval_settings: Settings, tmp_path: Path
) -> None:
    corpus = ingest_corpus(engine, eval_settings, tmp_path, 40)
    store = ArtifactStore(eval_settings.artifact_dir)
    assert len(read_documents(store, corpus.eval_sha256)) == 4
    pt_config = {
        "stage": "pt",
        "learning_rate": 3e-3,
        "num_train_epochs": 4,
        "per_device_train_batch_size": 12,
        "gradient_accumulation_steps": 1,
        "lora_rank": 16,
        "cutoff_len": 64,
    }
    pt_job = train_job(engine, eval_settings, corpus, pt_config)
    assert pt_job.status == JobStatus.succeeded, pt_job.error
    with new_session(engine) as session:
        events = session.exec(select(JobEvent).where(JobEvent.job_id == pt_job.id)).all()
        kinds = [e.kind for e in events]
        score = next(e.payload for e in events if e.kind == "perplexity")
        pt_checkpoint = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == pt_job.id, Checkpoint.final)
        ).one()
        assert "evaluated" not in kinds  # no label scores, no Approve button
        assert promotion_problem(session, checkpoint=pt_checkpoint).startswith(
            f"checkpoint {pt_checkpoint.id} is continued pre-training"
        )
        with pytest.raises(Conflict, match="continued pre-training"):
            check_export(session, store, checkpoint_id=pt_checkpoint.id, bits=None)
    assert score["documents"] == 4 and score["checkpoint_id"] == pt_checkpoint.id
    assert milestone_text("perplexity", score).startswith(
        f":bar_chart: Held-out perplexity {score['base_perplexity']:.1f} → "
        f"{score['perplexity']:.1f} on 4 held-out documents"
    )
    assert score["perplexity"] < score["base_perplexity"] / 2, score
    assert pt_checkpoint.meta["stage"] == "pt" and pt_checkpoint.meta["labels"] is None

    base = f"checkpoint-{pt_checkpoint.id}"
    sft_config = {
        "learning_rate": 3e-3,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lora_rank": 8,
        "base": base,
    }
    labelled = ingest_synthetic(
        engine, eval_settings, tmp_path / "sft", name="sft", train=synthetic(4), eval=synthetic(1)
    )
    sft_job = train_job(engine, eval_settings, labelled, sft_config)
    assert sft_job.status == JobStatus.succeeded, sft_job.error
    assert sft_job.base_model == base
    with new_session(engine) as session:
        sft_checkpoint = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == sft_job.id, Checkpoint.final)
        ).one()
    meta = json.loads((store.path(sft_checkpoint.path) / "meta.json").read_text())
    assert meta["base_model"] == base and sft_checkpoint.base_model == base
    assert meta["base_checkpoint"]["id"] == pt_checkpoint.id
    assert meta["base_checkpoint"]["job_id"] == pt_job.id and meta["base_checkpoint"]["merged"]
    with new_session(engine) as session:  # a channel's pt checkpoint is that channel's base
        session.get(Job, pt_job.id).channel_id = "C0ONE"
        session.commit()
        with pytest.raises(NotFound, match=f"base={base}: no checkpoint"):
            create_job(
                session,
                base_model=eval_settings.base_model,
                config=sft_config,
                dataset_id=labelled.id,
                channel_id="C0TWO",
            )
    with new_session(engine) as session, pytest.raises(ConfigError, match="not a stage=pt"):
        create_job(
            session,
            base_model=eval_settings.base_model,
            config={"base": f"checkpoint-{sft_checkpoint.id}"},
            dataset_id=labelled.id,
        )
    served = AdapterRegistry(
        None,  # type: ignore[arg-type]  # validation only: no engine
        db=engine,
        store=store,
        base_model=eval_settings.base_model,
        max_lora_rank=64,
        tokenizer=None,
    )
    with pytest.raises(AdapterRefused, match=r"continued pre-training \(stage=pt\)"):
        served.validate(pt_checkpoint.id)  # forced or not, serving never loads it
    with pytest.raises(AdapterRefused, match=f"it was trained on {base}"):
        served.validate(sft_checkpoint.id)  # served by a deployment with BASE_MODEL={base}
    merged = Path(eval_settings.artifact_dir).resolve() / "models" / base
    assert json.loads((merged / "provenance.json").read_text())["id"] == pt_checkpoint.id


@SQLITE
def test_a_full_pt_checkpoint_is_scored_and_copied_into_a_base_with_the_tokenizer(
    engine, eval_settings: Settings, tmp_path: Path
) -> None:
    corpus = ingest_corpus(engine, eval_settings, tmp_path, 20)
    store = ArtifactStore(eval_settings.artifact_dir)
    config = {
        "stage": "pt",
        "method": "full",
        "learning_rate": 1e-3,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 9,
        "gradient_accumulation_steps": 1,
    }
    job = train_job(engine, eval_settings, corpus, config)
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        [score] = [
            e.payload
            for e in session.exec(select(JobEvent).where(JobEvent.job_id == job.id))
            if e.kind == "perplexity"
        ]
        checkpoint = session.get(Checkpoint, score["checkpoint_id"])
    assert score["perplexity"] < score["base_perplexity"], score
    merged = ensure_checkpoint_base(store, eval_settings, checkpoint)
    assert load_tokenizer(merged).eos_token_id is not None
    assert not (merged / "training_state.pt").exists()
