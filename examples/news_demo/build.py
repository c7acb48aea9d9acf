"""Build the demo dataset in the reference tutorial's layout from THUCNews headlines.

    python examples/news_demo/build.py [--source ../shared/data/thucnews]

Writes examples/news_demo/{dataset_info.json,train.json,eval.json} (300 train and 100 eval samples,
ShareGPT format, a short <think> block before each label), runner/assets/tokenizer_corpus.txt
(the text the tiny model's tokenizer is trained on) and runner/assets/pretrain_headlines.tsv (the
headlines the tiny model is pre-trained on, ``source_line<TAB>headline<TAB>label``). Deterministic
for a given source.

Each class's headlines are shuffled once (seed 42) and cut in order: 30 train, 10 eval, 100 for the
tokenizer corpus, 50 held out from everything (bench/tiny_recipes.py scores on them), the rest. The
pre-training headlines are the tokenizer-corpus ones and the rest: never a demo train/eval headline,
never a held-out one.
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
TRAIN_PER_CLASS, EVAL_PER_CLASS, CORPUS_EXTRA_PER_CLASS, HELD_OUT_PER_CLASS = 30, 10, 100, 50


def sample(headline: str, label: str) -> dict:
    # Short enough for the tiny default model to write: the topic, then the label. (The headline
    # copied into the reasoning, as the tutorial's teacher wrote it, is beyond a 1.4M-parameter
    # model: bench/tiny_recipes.py in docs/benchmarks.md.)
    thinking = f"{TOPICS[label]}，属于{label}类。"
    return {
        "conversations": [
            {"from": "human", "value": INSTRUCTION + headline},
            {"from": "gpt", "value": f"<think>\n{thinking}\n</think>\n\n{label}"},
        ]
    }


def split_headlines(
    source: Path, rng: random.Random | None = None
) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """Per label, the ``(source line, headline)`` pairs of each use: train, eval, corpus (the
    tokenizer's extra text), held_out, rest. The cut described in the module docstring; ``rng``
    (default ``Random(42)``) is left where the demo's sample shuffles continue from."""
    by_class: dict[int, list[tuple[int, str]]] = {}
    seen: set[str] = set()
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        headline, _, index = line.rpartition("\t")
        if headline and headline not in seen:
            seen.add(headline)
            by_class.setdefault(int(index), []).append((number, headline))
    rng = rng or random.Random(42)
    cuts = {
        "train": TRAIN_PER_CLASS,
        "eval": EVAL_PER_CLASS,
        "corpus": CORPUS_EXTRA_PER_CLASS,
        "held_out": HELD_OUT_PER_CLASS,
    }
    splits: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for index, label in enumerate(LABELS_ZH):
        headlines = by_class[index][:]
        rng.shuffle(headlines)
        at = 0
        for use, size in cuts.items():
            splits.setdefault(use, {})[label] = headlines[at : at + size]
            at += size
        splits.setdefault("rest", {})[label] = headlines[at:]
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/thucnews")
    args = parser.parse_args()
    rng = random.Random(42)
    splits = split_headlines(args.source / "test.txt", rng)
    train, evals, corpus = [], [], []
    for label in LABELS_ZH:
        train += [sample(h, label) for _, h in splits["train"][label]]
        evals += [sample(h, label) for _, h in splits["eval"][label]]
        corpus += [h for _, h in splits["corpus"][label]]
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
    pretrain = sorted(
        (number, headline, label)
        for use in ("corpus", "rest")
        for label, pairs in splits[use].items()
        for number, headline in pairs
    )
    (REPO / "runner/assets/pretrain_headlines.tsv").write_text(
        "".join(f"{number}\t{headline}\t{label}\n" for number, headline, label in pretrain),
        encoding="utf-8",
    )
    print(
        f"{len(train)} train, {len(evals)} eval, {len(texts)} corpus lines, "
        f"{len(pretrain)} pre-training headlines"
    )


if __name__ == "__main__":
    main()
