"""Every bad input is rejected with a message that names the problem, and stores nothing: no row in
any table, no file in the artifact folder (checked on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlmodel import SQLModel, select

from core.errors import ConfigError, DatasetRejected
from core.settings import Settings
from runner.datasets import ingest as ingest_module
from runner.datasets.ingest import IngestOptions, ingest_dataset
from storage.artifacts import ArtifactStore
from storage.db import new_session
from tests.runner import dataset_files as files

SMALL = {"max_upload_bytes": 64 * 1024, "max_archive_bytes": 256 * 1024, "max_archive_files": 8}


def _snapshot(engine, store: ArtifactStore) -> tuple:
    with new_session(engine) as session:
        counts = tuple(
            session.exec(select(func.count()).select_from(table)).one()
            for table in SQLModel.metadata.sorted_tables
        )
    tmp = sorted(store.tmp.iterdir()) if store.tmp.exists() else []
    return counts, store.files(), tmp


def _reject(engine, store: ArtifactStore, path: Path, *fragments: str, **settings) -> str:
    options = IngestOptions.from_settings(Settings(_env_file=None, **settings))
    before = _snapshot(engine, store)
    with new_session(engine) as session, pytest.raises(DatasetRejected) as caught:
        ingest_dataset(session, store, path, options, name="bad", tokenizer=None)
    message = caught.value.message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert _snapshot(engine, store) == before
    return message


def test_invalid_json_names_line_and_column(engine, store, tmp_path) -> None:
    path = tmp_path / "train.json"
    path.write_text(
        '[\n  {"conversations": [\n    {"from": "human" "value": "x"}]}\n]', encoding="utf-8"
    )
    _reject(engine, store, path, "train.json", "line 3, column 22", "invalid JSON")


def test_invalid_jsonl_line(engine, store, tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(files.sharegpt()[0]) + "\n{broken\n", encoding="utf-8")
    _reject(engine, store, path, "train.jsonl", "line 2", "invalid JSON")


def test_record_missing_a_field_names_record_and_field(engine, store, tmp_path) -> None:
    records = files.sharegpt()
    del records[2]["conversations"][1]["value"]
    records[3] = {"text": "no conversations here"}
    message = _reject(
        engine,
        store,
        files.write_json(tmp_path / "d.json", records),
        "2 problems",
        "d.json, record 2, field `conversations[1].value`: missing",
        "d.json, record 3, field `conversations`: missing",
    )
    assert "record 0" not in message


def test_alpaca_record_missing_output(engine, store, tmp_path) -> None:
    records = files.alpaca()
    del records[1]["output"]
    _reject(
        engine,
        store,
        files.write_json(tmp_path / "a.json", records),
        "record 1, field `output`: missing",
    )


def test_roles_out_of_order(engine, store, tmp_path) -> None:
    records = files.sharegpt()
    records[1]["conversations"].reverse()
    _reject(
        engine,
        store,
        files.write_json(tmp_path / "d.json", records),
        "record 1",
        "roles out of order at turn 0: expected user, got assistant",
    )


def test_unknown_role(engine, store, tmp_path) -> None:
    records = files.sharegpt()
    records[0]["conversations"][0]["from"] = "robot"
    _reject(
        engine,
        store,
        files.write_json(tmp_path / "d.json", records),
        "record 0",
        "unknown role 'robot'",
        "allowed: human, user",
    )


def test_conversation_ending_with_the_user(engine, store, tmp_path) -> None:
    records = files.sharegpt()
    records[0]["conversations"].pop()
    _reject(
        engine,
        store,
        files.write_json(tmp_path / "d.json", records),
        "record 0",
        "last turn must be the assistant's answer",
    )


def test_empty_dataset(engine, store, tmp_path) -> None:
    _reject(engine, store, files.write_json(tmp_path / "d.json", []), "d.json: no records")


def test_empty_file(engine, store, tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b"")
    _reject(engine, store, path, "d.json is empty")


def test_unknown_format(engine, store, tmp_path) -> None:
    path = files.write_json(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    _reject(engine, store, path, "unknown format", "answer, question", "ShareGPT")


def test_unknown_file_type(engine, store, tmp_path) -> None:
    path = tmp_path / "notes.docx"
    path.write_text("hello")
    _reject(engine, store, path, "unknown file type .docx")


def test_zip_with_parent_path(engine, store, tmp_path) -> None:
    path = files.zip_with(tmp_path / "evil.zip", {"../../escape.json": b"[]", "train.json": b"[]"})
    _reject(engine, store, path, "'../../escape.json' has '..' in its path")
    assert not (tmp_path.parent / "escape.json").exists()


def test_zip_with_absolute_path(engine, store, tmp_path) -> None:
    path = files.zip_with(tmp_path / "evil.zip", {"/etc/cron.d/x.json": b"[]"})
    _reject(engine, store, path, "'/etc/cron.d/x.json' has an absolute path")


def test_zip_with_symlink(engine, store, tmp_path) -> None:
    path = files.zip_with(tmp_path / "evil.zip", {"train.json": b"[]"}, symlink="eval.json")
    _reject(engine, store, path, "'eval.json' is a symbolic link")


def test_zip_bomb_over_uncompressed_limit(engine, store, tmp_path) -> None:
    path = files.zip_with(tmp_path / "bomb.zip", {"train.json": b" " * (1024 * 1024)})
    assert path.stat().st_size < SMALL["max_upload_bytes"]
    _reject(engine, store, path, "would unpack to 1.0 MiB", "over the limit of", **SMALL)


def test_zip_whose_header_understates_its_size(engine, store, tmp_path) -> None:
    path = files.zip_with(tmp_path / "liar.zip", {"train.json": b" " * (1024 * 1024)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    # Rewrite the declared uncompressed size (local header and central directory) to 100 bytes.
    real = info.file_size.to_bytes(4, "little")
    assert data.count(real) == 2
    data = bytearray(bytes(data).replace(real, (100).to_bytes(4, "little")))
    path.write_bytes(bytes(data))
    _reject(engine, store, path, "liar.zip", "cannot be read", **SMALL)


def test_zip_with_too_many_files(engine, store, tmp_path) -> None:
    members = {f"part{i}.json": b"[]" for i in range(9)}
    _reject(
        engine,
        store,
        files.zip_with(tmp_path / "many.zip", members),
        "holds 9 entries, over the limit of 8",
        **SMALL,
    )


def test_file_over_the_size_limit(engine, store, tmp_path) -> None:
    records = files.sharegpt() * 500
    path = files.write_json(tmp_path / "big.json", records)
    _reject(engine, store, path, "big.json is", "over the upload limit of 65536 bytes", **SMALL)


def test_dataset_info_naming_a_missing_file(engine, store, tmp_path) -> None:
    folder = files.demo_folder(tmp_path / "lf")
    (folder / "eval.json").unlink()
    _reject(
        engine,
        store,
        folder,
        "dataset_info.json, field `news_eval`",
        "names `eval.json`, which is not in the upload",
    )


def test_dataset_info_that_is_not_json(engine, store, tmp_path) -> None:
    folder = files.demo_folder(tmp_path / "lf")
    (folder / "dataset_info.json").write_text("{ nope", encoding="utf-8")
    _reject(engine, store, folder, "dataset_info.json, line 1, column 3", "invalid JSON")


def test_folder_with_a_symlink(engine, store, tmp_path) -> None:
    folder = files.demo_folder(tmp_path / "lf")
    (folder / "extra.json").symlink_to("/etc/hostname")
    _reject(engine, store, folder, "extra.json is a symbolic link")


def test_csv_without_a_label_column(engine, store, tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("title,notes\n球队夺冠,x\n", encoding="utf-8")
    _reject(engine, store, path, "no label column", "header: title, notes", "--label-column")


def test_csv_row_with_an_empty_label(engine, store, tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n球队夺冠,体育\n股市大涨,\n", encoding="utf-8")
    _reject(engine, store, path, "d.csv, line 3, record 1, field `label`: empty")


def test_not_utf8(engine, store, tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps(files.sharegpt(), ensure_ascii=False).encode("gb18030"))
    _reject(engine, store, path, "not UTF-8 text")


def test_bad_dataset_name_is_refused_before_anything_is_read(engine, store, tmp_path) -> None:
    options = IngestOptions.from_settings(Settings(_env_file=None))
    with new_session(engine) as session, pytest.raises(ConfigError, match="not allowed"):
        ingest_dataset(
            session, store, tmp_path / "missing.json", options, name="../x", tokenizer=None
        )


def test_a_database_failure_removes_the_blobs_it_wrote(
    engine, store, tmp_path, monkeypatch
) -> None:
    """Fault injection: the insert fails after the splits were written."""

    def failing_create(session, **fields):
        raise RuntimeError("database went away")

    monkeypatch.setattr(ingest_module, "create_dataset", failing_create)
    path = files.write_json(tmp_path / "d.json", files.sharegpt())
    options = IngestOptions.from_settings(Settings(_env_file=None))
    with new_session(engine) as session, pytest.raises(RuntimeError, match="went away"):
        ingest_dataset(session, store, path, options, name="ok", tokenizer=None)
    assert store.files() == []
