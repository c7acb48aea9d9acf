"""Builders of upload files in every accepted format (and broken ones) for the ingestion tests."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

from tests.conftest import DEMO_DATASET

HEADLINES = [
    ("股市今日大涨", "股票"),
    ("球队夺得冠军", "体育"),
    ("新楼盘开盘热销", "房产"),
    ("高考分数线公布", "教育"),
]
PREFIX = "请分类：\n标题："


def answer(label: str) -> str:
    return f"<think>\n判断一下。\n</think>\n\n{label}"


def sharegpt(rows=HEADLINES) -> list[dict]:
    return [
        {
            "conversations": [
                {"from": "human", "value": PREFIX + h},
                {"from": "gpt", "value": answer(label)},
            ]
        }
        for h, label in rows
    ]


def openai(rows=HEADLINES) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "你是编辑"},
                {"role": "user", "content": PREFIX + h},
                {"role": "assistant", "content": answer(label)},
            ]
        }
        for h, label in rows
    ]


def alpaca(rows=HEADLINES) -> list[dict]:
    return [
        {"instruction": "请分类：", "input": "标题：" + h, "output": label} for h, label in rows
    ]


def write_json(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8"
    )
    return path


def tutorial_zip(path: Path, *, top_folder: str | None = "data_news_300") -> Path:
    """The reference tutorial's layout: dataset_info.json, train.json, eval.json."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("dataset_info.json", "train.json", "eval.json"):
            arcname = f"{top_folder}/{name}" if top_folder else name
            archive.write(DEMO_DATASET / name, arcname)
    return path


def demo_folder(path: Path) -> Path:
    path.mkdir()
    for name in ("dataset_info.json", "train.json", "eval.json"):
        shutil.copy(DEMO_DATASET / name, path / name)
    return path


def zip_with(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


LABEL_ONLY_SPORTS = ["球队夺冠", "联赛开幕", "冠军诞生", "主场大胜", "球员转会", "奥运夺金"]
LABEL_ONLY_MARKETS = ["股市上涨", "央行降息", "财报发布", "基金净值"]


def label_only_csv(folder: Path) -> Path:
    """A label-only CSV for distillation: text and label (6 体育 then 4 财经), with an eval
    split."""
    folder.mkdir(exist_ok=True)
    rows = [(f"标题：{t}", "体育") for t in LABEL_ONLY_SPORTS] + [
        (f"标题：{t}", "财经") for t in LABEL_ONLY_MARKETS
    ]
    (folder / "train.csv").write_text(
        "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows), encoding="utf-8"
    )
    (folder / "eval.csv").write_text(
        "text,label\n标题：球赛直播,体育\n标题：汇率走低,财经\n", encoding="utf-8"
    )
    return folder
