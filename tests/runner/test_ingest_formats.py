"""Every accepted input format ingests with a correct report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.enums import Split
from core.settings import Settings
from runner.datasets.ingest import IngestOptions, ingest_dataset, read_split, validate_dataset
from runner.datasets.report import render_report
from storage.db import new_session
from tests.conftest import DEMO_DATASET
from tests.runner import dataset_files as files


@pytest.fixture
def options() -> IngestOptions:
    return IngestOptions.from_settings(Settings(_env_file=None))


def _report(path: Path, options: IngestOptions, tokenizer=None) -> dict:
    return validate_dataset(path, options, tokenizer=tokenizer)


@pytest.mark.parametrize("make", [files.sharegpt, files.openai, files.alpaca])
@pytest.mark.parametrize("writer", [files.write_json, files.write_jsonl])
def test_chat_and_alpaca_files(tmp_path: Path, options: IngestOptions, make, writer) -> None:
    suffix = ".json" if writer is files.write_json else ".jsonl"
    report = _report(writer(tmp_path / f"data{suffix}", make()), options)
    assert report["samples"] == {"train": 4}
    assert sorted(report["labels"]) == sorted(label for _, label in files.HEADLINES)
    assert report["splits"]["train"]["label_counts"] == {label: 1 for _, label in files.HEADLINES}
    expected_think = 0 if make is files.alpaca else 4
    assert report["splits"]["train"]["with_think"] == expected_think
    expected_format = {files.sharegpt: "sharegpt", files.openai: "openai", files.alpaca: "alpaca"}[
        make
    ]
    assert report["format"] == expected_format
    assert any("no eval split" in p["message"] for p in report["problems"])


def test_alpaca_joins_instruction_and_input_and_infers_the_frame(tmp_path, options) -> None:
    report = _report(files.write_json(tmp_path / "a.json", files.alpaca()), options)
    assert report["prompt_frame"] == {"system": None, "prefix": "请分类：\n标题：", "suffix": ""}


def test_openai_system_prompt_becomes_part_of_the_frame(tmp_path, options) -> None:
    report = _report(files.write_json(tmp_path / "m.json", files.openai()), options)
    assert report["prompt_frame"]["system"] == "你是编辑"


@pytest.mark.parametrize("top_folder", ["data_news_300", None])
def test_tutorial_zip_layout_ingests_as_it_is(tmp_path, options, tokenizer, top_folder) -> None:
    path = files.tutorial_zip(tmp_path / "data_news_300.zip", top_folder=top_folder)
    report = _report(path, options, tokenizer)
    assert report["format"] == "llamafactory/sharegpt"
    assert report["samples"] == {"train": 300, "eval": 100}
    assert report["sources"] == {"train": ["train.json"], "eval": ["eval.json"]}
    assert len(report["labels"]) == 10
    assert set(report["splits"]["train"]["label_counts"].values()) == {30}
    assert set(report["splits"]["eval"]["label_counts"].values()) == {10}
    assert report["splits"]["train"]["with_think"] == 300
    tokens = report["splits"]["train"]["tokens"]
    assert 0 < tokens["p50"] <= tokens["p95"] <= tokens["max"] and tokens["over_cutoff"] == 0
    assert report["leakage"] == 0 and report["duplicates"] == {"train": 0, "eval": 0}
    assert report["problems"] == []
    assert report["prompt_frame"]["prefix"].endswith("标题：")


def test_llamafactory_folder_with_alpaca_entries_and_custom_columns(tmp_path, options) -> None:
    folder = tmp_path / "lf"
    folder.mkdir()
    rows = [{"q": "标题：" + h, "a": label} for h, label in files.HEADLINES]
    files.write_json(folder / "mine.json", rows)
    files.write_json(folder / "held_out.json", rows[:2])
    entry = {"columns": {"prompt": "q", "response": "a"}}
    files.write_json(
        folder / "dataset_info.json",
        {
            "my_data": {"file_name": "mine.json", **entry},
            "my_test": {"file_name": "held_out.json", **entry},
        },
    )
    report = _report(folder, options)
    assert report["format"] == "llamafactory/alpaca"
    assert report["samples"] == {"train": 4, "eval": 2}
    assert report["leakage"] == 2  # the eval prompts are train prompts: flagged


@pytest.mark.parametrize(("name", "sep"), [("news.csv", ","), ("news.tsv", "\t")])
def test_csv_and_tsv_become_chat_samples(tmp_path, options, name, sep) -> None:
    lines = [f"title{sep}category"] + [f"{h}{sep}{label}" for h, label in files.HEADLINES]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = _report(path, options)
    assert report["format"] == "table"
    assert report["samples"] == {"train": 4}
    assert report["splits"]["train"]["label_counts"] == {label: 1 for _, label in files.HEADLINES}
    assert report["prompt_frame"] == {"system": None, "prefix": "", "suffix": ""}


def test_csv_columns_can_be_named(tmp_path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("id,headline_text,tag\n1,球队夺冠,体育\n2,股市大涨,股票\n", encoding="utf-8")
    options = IngestOptions.from_settings(
        Settings(_env_file=None), text_column="headline_text", label_column="tag"
    )
    report = _report(path, options)
    assert report["splits"]["train"]["label_counts"] == {"体育": 1, "股票": 1}


def test_report_flags_duplicates_leakage_missing_labels_and_long_samples(
    tmp_path,
    tokenizer,
) -> None:
    train = files.sharegpt([*files.HEADLINES, files.HEADLINES[0]])  # an exact duplicate
    evals = files.sharegpt([files.HEADLINES[1], ("外星人访问地球", "科幻")])  # a leak, a new label
    files.write_json(tmp_path / "train.json", train)
    files.write_json(tmp_path / "eval.json", evals)
    options = IngestOptions.from_settings(Settings(_env_file=None), cutoff_len=20)
    report = validate_dataset(tmp_path, options, tokenizer=tokenizer)
    assert report["duplicates"] == {"train": 1, "eval": 0}
    assert report["leakage"] == 1
    assert report["eval_labels_missing_from_train"] == ["科幻"]
    assert report["splits"]["train"]["tokens"]["over_cutoff"] == 5
    messages = [p["message"] for p in report["problems"]]
    assert any("exact duplicate of record 0" in m for m in messages)
    assert any("train record 1" in m for m in messages)
    assert any("over cutoff_len 20" in m for m in messages)
    text = render_report(report)
    assert "Eval labels missing from train: 科幻" in text and "leakage: 1" in text


def test_free_form_answers_have_no_label_set(tmp_path, options) -> None:
    rows = [(f"问题{i}", f"一段不同的回答{i}") for i in range(12)]
    report = _report(files.write_json(tmp_path / "qa.json", files.sharegpt(rows)), options)
    assert report["labels"] is None
    assert "free-form" in render_report(report)


def test_ingest_stores_normalised_splits_and_one_row(engine, store, tokenizer) -> None:
    options = IngestOptions.from_settings(Settings(_env_file=None))
    with new_session(engine) as session:
        dataset, report = ingest_dataset(
            session,
            store,
            DEMO_DATASET,
            options,
            name="news",
            tokenizer=tokenizer,
            channel_id="C1",
            uploaded_by="U1",
        )
    assert (dataset.name, dataset.version, dataset.train_samples, dataset.eval_samples) == (
        "news",
        1,
        300,
        100,
    )
    assert dataset.labels == report["labels"] and len(dataset.labels) == 10
    train = read_split(store, dataset.train_sha256)
    source = json.loads((DEMO_DATASET / "train.json").read_text(encoding="utf-8"))
    assert len(train) == 300
    assert train[0][0].content == source[0]["conversations"][0]["value"]
    assert [m.role for m in train[0]] == ["user", "assistant"]
    assert len(read_split(store, dataset.eval_sha256)) == 100
    assert len(store.files()) == 2
    with new_session(engine) as session:
        again, _ = ingest_dataset(
            session, store, DEMO_DATASET, options, name="news", tokenizer=None, channel_id="C1"
        )
        elsewhere, _ = ingest_dataset(  # the deployment's own "news": versions count per scope
            session, store, DEMO_DATASET, options, name="news", tokenizer=None
        )
    assert again.version == 2 and again.train_sha256 == dataset.train_sha256
    assert elsewhere.version == 1 and elsewhere.channel_id is None
    assert len(store.files()) == 2  # same content, same blobs
    assert Split.train.value in report["splits"]
