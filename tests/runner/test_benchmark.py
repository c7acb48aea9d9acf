"""The forgetting check (issue 17 item 3): multiple-choice benchmarks in the C-Eval, CMMLU and MMLU
CSV layouts ingest as a ``benchmark`` dataset, are scored by the option letters' log-probability
after a few-shot prompt, and every evaluation then reports the checkpoint's general ability
against the base's."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import col, select

from core.enums import JobStatus
from core.errors import BenchmarkRejected
from runner.datasets.ingest import IngestOptions
from runner.eval.benchmark import (
    LETTERS,
    Question,
    general_summary,
    header,
    ingest_benchmark,
    letter_ids,
    load_benchmark,
    question_text,
    read_benchmark,
    score_benchmark,
)
from runner.eval.predict import TransformersPredictor
from runner.eval.report import ensure_base_evaluation, evaluate_model
from runner.models import load_tokenizer
from stack.processes import process_env
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.evaluations import checkpoint_evaluation
from storage.jobs import job_events
from storage.models import Dataset, Evaluation
from tests.runner.conftest import train_job

REPO = Path(__file__).resolve().parents[2]

# A small benchmark of our own: two subjects, C-Eval's layout, dev examples and val questions.
GEOGRAPHY = [
    ("中国最长的河流是", "黄河", "长江", "珠江", "淮河", "B"),
    ("中国的首都是", "上海", "广州", "北京", "南京", "C"),
    ("世界上面积最大的大洋是", "太平洋", "大西洋", "印度洋", "北冰洋", "A"),
    ("青藏高原位于中国的", "东部", "南部", "北部", "西南部", "D"),
    ("长江注入", "渤海", "黄海", "东海", "南海", "C"),
    ("珠穆朗玛峰位于", "天山", "喜马拉雅山脉", "昆仑山", "秦岭", "B"),
]
SPORTS = [
    ("足球比赛每队上场", "九人", "十人", "十一人", "十二人", "C"),
    ("篮球比赛一次三分球得", "一分", "两分", "三分", "四分", "C"),
    ("奥运会每几年举行一次", "四年", "两年", "三年", "五年", "A"),
    ("乒乓球被称为中国的", "国球", "国花", "国鸟", "国树", "A"),
    ("马拉松全程约", "十公里", "二十一公里", "四十二公里", "一百公里", "C"),
    ("围棋棋盘有几路", "十五路", "十七路", "十九路", "二十一路", "C"),
]


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode("utf-8")


def ceval_files() -> dict[str, bytes]:
    files = {}
    for subject, rows in (("high_school_geography", GEOGRAPHY), ("sports_science", SPORTS)):
        head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
        table = [[str(i), *r, ""] for i, r in enumerate(rows)]
        files[f"dev/{subject}_dev.csv"] = _csv([head, *table[:2]])
        files[f"val/{subject}_val.csv"] = _csv([head, *table[2:]])
    return files


def write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_the_three_layouts_parse_with_subjects_splits_and_examples() -> None:
    ceval = load_benchmark(ceval_files())
    assert ceval.layout == "ceval" and ceval.language() == "zh"
    assert ceval.subjects() == {
        "high_school_geography": {"scored": 4, "examples": 2},
        "sports_science": {"scored": 4, "examples": 2},
    }
    first = ceval.questions[0]
    assert first == Question(
        "high_school_geography", "中国最长的河流是", ("黄河", "长江", "珠江", "淮河"), "B", "dev"
    )

    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    cmmlu = load_benchmark(
        {
            "dev/sports.csv": _csv([head, ["0", *SPORTS[0]]]),
            "test/sports.csv": _csv([head, *[[str(i), *r] for i, r in enumerate(SPORTS[1:])]]),
        }
    )
    assert cmmlu.layout == "cmmlu"
    assert cmmlu.subjects() == {"sports": {"scored": 5, "examples": 1}}

    # MMLU: no header and no dev file: the subject's first five questions become its examples.
    rows = [
        [f"What is {i} + {i}?", str(i), str(2 * i), str(3 * i), str(4 * i), "B"] for i in range(8)
    ]
    mmlu = load_benchmark({"college_math_test.csv": _csv(rows)})
    assert mmlu.layout == "mmlu" and mmlu.language() == "en"
    assert mmlu.subjects() == {"college_math": {"scored": 3, "examples": 5}}
    assert [q.split for q in mmlu.questions] == ["dev"] * 5 + ["test"] * 3


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"notes.txt": b"x"}, "needs CSV files in the C-Eval, CMMLU or MMLU layout"),
        (
            {
                "a_val.csv": _csv(
                    [
                        ["id", "question", "A", "B", "C", "D", "answer"],
                        ["1", "q", "x", "", "z", "w", "A"],
                    ]
                )
            },
            "a_val.csv row 2: option B is empty",
        ),
        (
            {
                "a_val.csv": _csv(
                    [
                        ["id", "question", "A", "B", "C", "D", "answer"],
                        ["1", "q", "x", "y", "z", "w", "E"],
                    ]
                )
            },
            "a_val.csv row 2: the answer 'E' is not one of A, B, C, D",
        ),
        (
            {
                "a_test.csv": _csv(
                    [
                        ["id", "question", "A", "B", "C", "D", "answer"],
                        ["1", "q", "x", "y", "z", "w", ""],
                    ]
                )
            },
            "C-Eval's test split has no public answers: use its val split",
        ),
        (
            {
                "a_val.csv": _csv(
                    [["id", "question", "A", "B", "C", "D", "answer"], ["1", "q", "x"]]
                )
            },
            "a_val.csv row 2: 3 columns, the ceval layout needs 7",
        ),
        (
            {"a.csv": _csv([["name", "option1", "option2"]])},
            "is none of C-Eval's (id,question,A,B,C,D,answer)",
        ),
        (
            {
                "a_val.csv": _csv(
                    [["id", "question", "A", "B", "C", "D", "answer"], ["1", *SPORTS[0]]]
                ),
                "b_test.csv": _csv([list(SPORTS[1])]),
            },
            "the benchmark's files mix layouts (ceval, mmlu)",
        ),
        (
            {
                "a_dev.csv": _csv(
                    [["id", "question", "A", "B", "C", "D", "answer"], ["1", *SPORTS[0]]]
                )
            },
            "no questions to score (only dev examples)",
        ),
    ],
)
def test_a_bad_benchmark_is_refused_naming_the_file_row_and_field(files, message) -> None:
    with pytest.raises(BenchmarkRejected) as exc:
        load_benchmark(files)
    assert message in exc.value.message


def test_scores_are_the_letters_log_probabilities_after_the_few_shot_prompt(
    tiny_model_dir,
) -> None:
    """Scored through the predictor's batched reads, checked against the model's own logits for
    each prompt built here by hand."""
    import torch
    from transformers import AutoModelForCausalLM

    benchmark = load_benchmark(ceval_files())
    tokenizer = load_tokenizer(tiny_model_dir)
    predictor = TransformersPredictor(tiny_model_dir, None, batch_size=3)
    scores = score_benchmark(benchmark, tokenizer, predictor.read, max_prompt_tokens=2047)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    letters = letter_ids(tokenizer, "zh")
    expected: dict[str, list[bool]] = {}
    for subject in ("high_school_geography", "sports_science"):
        shots = [q for q in benchmark.questions if q.subject == subject and q.split == "dev"]
        for q in (q for q in benchmark.questions if q.subject == subject and q.split != "dev"):
            text = (
                header(subject, "zh")
                + "".join(question_text(s, "zh", s.answer) for s in shots)
                + question_text(q, "zh")
            )
            assert text.startswith("以下是中国关于high school geography考试") or subject != (
                "high_school_geography"
            )
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            chosen = LETTERS[int(torch.argmax(logits[letters]))]
            expected.setdefault(subject, []).append(chosen == q.answer)
    for subject, hits in expected.items():
        assert scores["subjects"][subject]["questions"] == len(hits) == 4
        assert scores["subjects"][subject]["correct"] == sum(hits)
    assert scores["accuracy"] == round(sum(map(sum, expected.values())) / 8, 4)
    assert scores["questions"] == 8 and scores["shots"] == 2 and scores["layout"] == "ceval"

    # A prompt over the limit drops examples from the end, down to none.
    short = score_benchmark(benchmark, tokenizer, predictor.read, max_prompt_tokens=60)
    assert short["shots"] < 2 and short["questions"] == 8


def test_a_tokenizer_that_splits_an_option_letter_is_refused(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)  # byte-level: " A" is two tokens here
    with pytest.raises(BenchmarkRejected, match="encodes the option ' A' as 2 tokens"):
        letter_ids(tokenizer, "en")


def test_the_warning_threshold() -> None:
    within = general_summary("b", {"accuracy": 0.50}, {"accuracy": 0.51}, max_drop_pt=2.0)
    assert within["delta_pt"] == -1.0 and "warning" not in within
    better = general_summary("b", {"accuracy": 0.60}, {"accuracy": 0.50}, max_drop_pt=0.0)
    assert better["delta_pt"] == 10.0 and "warning" not in better
    beyond = general_summary("b", {"accuracy": 0.40}, {"accuracy": 0.43}, max_drop_pt=2.0)
    assert beyond["delta_pt"] == -3.0 and "dropped 3.0 points on b" in beyond["warning"]
    alone = general_summary("b", {"accuracy": 0.4}, None, max_drop_pt=2.0)
    assert alone["delta_pt"] is None and "warning" not in alone


def test_the_cli_ingests_a_benchmark_and_refuses_a_bad_one(settings, engine, tmp_path) -> None:
    folder = write(tmp_path / "ceval-mini", ceval_files())
    env = process_env(settings)
    run = subprocess.run(
        [sys.executable, "-m", "runner", "ingest", str(folder), "--name", "general", "--benchmark"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "Stored benchmark general v1" in run.stdout
    assert "ceval layout, 8 questions to score in 2 subjects, 4 few-shot examples" in run.stdout
    with new_session(engine) as session:
        dataset = session.exec(select(Dataset).where(Dataset.name == "general")).one()
    assert dataset.kind == "benchmark" and dataset.labels == list(LETTERS)
    assert read_benchmark(ArtifactStore(settings.artifact_dir), dataset) == load_benchmark(
        ceval_files()
    )

    bad = write(
        tmp_path / "bad",
        {
            "x_val.csv": _csv(
                [
                    ["id", "question", "A", "B", "C", "D", "answer"],
                    ["1", "q", "a", "b", "c", "d", "Z"],
                ]
            )
        },
    )
    run = subprocess.run(
        [sys.executable, "-m", "runner", "ingest", str(bad), "--name", "bad", "--benchmark"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode != 0 and "x_val.csv row 2: the answer 'Z'" in run.stderr
    with new_session(engine) as session:  # nothing half-written
        assert session.exec(select(Dataset).where(Dataset.name == "bad")).first() is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # CI time: PostgreSQL above
def test_every_evaluation_reports_general_ability_against_the_base(
    engine, eval_settings, dataset, tmp_path
) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)
    with new_session(engine) as session:
        benchmark = ingest_benchmark(
            session,
            store,
            write(tmp_path / "ceval-mini", ceval_files()),
            IngestOptions.from_settings(eval_settings).limits,
            name="general",
        )
    settings = eval_settings.model_copy(
        update={"eval_general_benchmark": "general", "eval_max_general_drop": 0.0}
    )
    job = train_job(engine, settings, dataset)
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        evaluated = next(
            e.payload for e in job_events(session, job_id=job.id) if e.kind == "evaluated"
        )
        rows = session.exec(
            select(Evaluation).where(Evaluation.dataset_id == benchmark.id).order_by(Evaluation.id)
        ).all()
        newest = checkpoint_evaluation(session, checkpoint_id=evaluated["checkpoint_id"])
    base, tuned = rows  # the base's score (cached) and the checkpoint's
    assert base.checkpoint_id is None and tuned.checkpoint_id == evaluated["checkpoint_id"]
    general = evaluated["general"]
    assert general["benchmark"] == "general v1"
    assert general["accuracy"] == tuned.metrics["accuracy"]
    assert general["base_accuracy"] == base.metrics["accuracy"]
    assert general["delta_pt"] == round(
        (tuned.metrics["accuracy"] - base.metrics["accuracy"]) * 100, 2
    )
    assert ("warning" in general) == (general["delta_pt"] < 0)  # EVAL_MAX_GENERAL_DROP=0
    assert set(general["subjects"]) == {"high_school_geography", "sports_science"}
    # The checkpoint's evaluation stays the eval set's, not the benchmark's newer row.
    assert newest is not None and newest.id == evaluated["evaluation_id"]

    from bot.blocks import eval_report_blocks

    blocks = eval_report_blocks(evaluated)
    assert "*General ability* " in blocks[0]["text"]["text"]
    assert "on general v1" in blocks[0]["text"]["text"]
    approve = next(
        e
        for b in blocks
        if b["type"] == "actions"
        for e in b["elements"]
        if e["action_id"] == "approve_checkpoint"
    )
    warned = approve["confirm"]["text"]["text"].startswith(":warning: general ability dropped")
    assert warned == ("warning" in general)
    dropped = {**evaluated, "general": {**general, "warning": "general ability dropped 3.0 points"}}
    approve = next(
        e
        for b in eval_report_blocks(dropped)
        if b["type"] == "actions"
        for e in b["elements"]
        if e["action_id"] == "approve_checkpoint"
    )
    assert approve["confirm"]["text"]["text"].startswith(":warning: general ability dropped 3.0")

    # Asked again (the next job), the base's benchmark score is reused, not computed again.
    with new_session(engine) as session:
        ensure_base_evaluation(
            session,
            store,
            settings,
            dataset=session.get(Dataset, dataset.id),
            base_model=settings.base_model,
        )
        bases = session.exec(
            select(Evaluation).where(
                Evaluation.dataset_id == benchmark.id, col(Evaluation.checkpoint_id).is_(None)
            )
        ).all()
    assert len(bases) == 1

    # Training on a benchmark is refused, by the runner as by /finetune start.
    refused = train_job(engine, settings, benchmark)
    assert refused.status == JobStatus.failed
    assert "is a benchmark (multiple-choice questions" in refused.error


def test_a_benchmark_setting_that_names_nothing_is_reported_not_fatal(
    engine, eval_settings, dataset
) -> None:
    settings = eval_settings.model_copy(update={"eval_general_benchmark": "nope"})
    with new_session(engine) as session:
        evaluation = evaluate_model(
            session,
            ArtifactStore(settings.artifact_dir),
            settings,
            dataset=session.get(Dataset, dataset.id),
            base_model=settings.base_model,
            checkpoint=None,
        )
    note = evaluation.metrics["general_note"]
    assert note.startswith("EVAL_GENERAL_BENCHMARK=nope names no benchmark dataset: ingest one")
    assert "general" not in evaluation.metrics
    saved = json.loads(
        (
            ArtifactStore(settings.artifact_dir).path(evaluation.report_path) / "eval.json"
        ).read_text()
    )
    assert saved["general_note"] == note
