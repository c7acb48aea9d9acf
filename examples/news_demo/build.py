"""Build the demo dataset in the reference tutorial's layout from THUCNews headlines.

    python examples/news_demo/build.py [--source ../shared/data/thucnews]

Writes examples/news_demo/{dataset_info.json,train.json,eval.json} (300 train and 100 eval samples,
ShareGPT format, a short <think> block before each label) and runner/assets/tokenizer_corpus.txt
(the text the tiny model's tokenizer is trained on). Deterministic for a given source.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LABELS_ZH = ["财经", "房产", "股票", "教育", "科技", "社会", "时政", "体育", "游戏", "娱乐"]
# What the reasoning says each category is about (demo data only; the product reads labels from data).
TOPICS = {
    "财经": "经济、金融和企业经营",
    "房产": "楼市、房价和房地产",
    "股票": "股市行情和个股",
    "教育": "考试、招生和学习",
    "科技": "互联网、数码产品和科技公司",
    "社会": "社会事件和民生",
    "时政": "政策、政务和国际关系",
    "体育": "体育赛事和运动员",
    "游戏": "电子游戏和玩家",
    "娱乐": "明星、影视和综艺",
}
INSTRUCTION = (
    "请判断下面这条新闻标题属于哪个类别（"
    + "、".join(LABELS_ZH)
    + "），先简要思考，再只回答类别名称。\n标题："
)
TRAIN_PER_CLASS, EVAL_PER_CLASS, CORPUS_EXTRA_PER_CLASS = 30, 10, 100


def sample(headline: str, label: str) -> dict:
    thinking = f"这条标题“{headline}”讲的是{TOPICS[label]}方面的内容，所以属于{label}类。"
    return {
        "conversations": [
            {"from": "human", "value": INSTRUCTION + headline},
            {"from": "gpt", "value": f"<think>\n{thinking}\n</think>\n\n{label}"},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/thucnews")
    args = parser.parse_args()
    by_class: dict[int, list[str]] = {}
    seen: set[str] = set()
    for line in (args.source / "test.txt").read_text(encoding="utf-8").splitlines():
        headline, _, index = line.rpartition("\t")
        if headline and headline not in seen:
            seen.add(headline)
            by_class.setdefault(int(index), []).append(headline)
    rng = random.Random(42)
    train, evals, corpus = [], [], []
    for index, label in enumerate(LABELS_ZH):
        headlines = by_class[index][:]
        rng.shuffle(headlines)
        train += [sample(h, label) for h in headlines[:TRAIN_PER_CLASS]]
        evals += [
            sample(h, label) for h in headlines[TRAIN_PER_CLASS : TRAIN_PER_CLASS + EVAL_PER_CLASS]
        ]
        corpus += headlines[TRAIN_PER_CLASS + EVAL_PER_CLASS :][:CORPUS_EXTRA_PER_CLASS]
    rng.shuffle(train)
    rng.shuffle(evals)
    entry = {
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
        },
    }
    info = {
        "news_train": {"file_name": "train.json", **entry},
        "news_eval": {"file_name": "eval.json", **entry},
    }
    dump = lambda obj: json.dumps(obj, ensure_ascii=False, indent=2) + "\n"  # noqa: E731
    (HERE / "dataset_info.json").write_text(dump(info), encoding="utf-8")
    (HERE / "train.json").write_text(dump(train), encoding="utf-8")
    (HERE / "eval.json").write_text(dump(evals), encoding="utf-8")
    texts = [turn["value"] for s in train + evals for turn in s["conversations"]] + corpus
    (REPO / "runner/assets/tokenizer_corpus.txt").write_text(
        "\n".join(texts) + "\n", encoding="utf-8"
    )
    print(f"{len(train)} train, {len(evals)} eval, {len(texts)} corpus lines")


if __name__ == "__main__":
    main()
