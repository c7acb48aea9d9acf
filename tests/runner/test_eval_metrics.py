"""Golden values for the scores, derived by hand from the formulas (derivations in comments)."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest

from runner.eval.metrics import (
    deltas,
    label_scores,
    lcs_length,
    mean_similarity,
    similarity_scores,
)

THINK_PREDICT = "<think>\n比赛新闻\n</think>\n\n体育"
THINK_LABEL = "<think>\n球赛报道\n</think>\n\n体育"


def test_exact_match_of_a_one_word_label() -> None:
    # jieba: ["财经"] both sides. ROUGE-1: P = R = 1 -> F = 2/(2 + 1e-8) -> 100.0 (4 places).
    # ROUGE-2: a one-word text has no bigram: P = R = 0 -> 0. ROUGE-L: LCS 1 of 1 -> 100.
    # BLEU-4 on characters 财,经: p1 = 2/2, p2 = 1/1, p3 = 0/1 and p4 = 0/1 smoothed by method3
    # to 1/(2^1·1) and 1/(2^2·1); BP = 1 -> (1·1·½·¼)^¼ = 0.594604 -> 59.4604.
    assert similarity_scores("财经", "财经") == {
        "rouge-1": 100.0,
        "rouge-2": 0.0,
        "rouge-l": 100.0,
        "bleu-4": 59.4604,
    }


def test_partial_character_overlap_that_jieba_splits_differently() -> None:
    # jieba: "体育消息" -> 体育/消息, "体育新闻" -> 体育新闻: no shared word, ROUGE = 0.
    # BLEU-4 on characters: p1 = 2/4 (体, 育), p2 = 1/3 (体育), p3 = 0/2 -> 1/(2·2),
    # p4 = 0/1 -> 1/(4·1); BP = 1 -> (½·⅓·¼·¼)^¼ = 0.3194716 -> 31.9472.
    assert similarity_scores("体育消息", "体育新闻") == {
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
        "bleu-4": 31.9472,
    }
    assert round(math.prod([0.5, 1 / 3, 0.25, 0.25]) ** 0.25 * 100, 4) == 31.9472


def test_a_chinese_answer_with_a_think_block() -> None:
    # jieba words, then rouge-chinese cuts sentences at "\n" and collapses whitespace, so the blank
    # line becomes an empty word "": hypothesis = < think > 比赛 新闻 < / think > "" 体育 (11 words),
    # reference the same with 球赛 报道.
    # ROUGE-1 (unique unigrams): 8 each, shared {<, think, >, /, "", 体育} = 6 -> 6/8 -> 75.0.
    # ROUGE-2 (unique bigrams): 9 each, shared (<,think) (think,>) (<,/) (/,think) (>,"")
    # ("",体育) = 6 -> 6/9 -> 66.6667. ROUGE-L: LCS < think > < / think > "" 体育 = 9 of 11
    # -> 81.8182.
    scores = similarity_scores(THINK_PREDICT, THINK_LABEL)
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (75.0, 66.6667, 81.8182)
    assert scores["bleu-4"] == round(_bleu4_by_formula(THINK_PREDICT, THINK_LABEL) * 100, 4)


def _bleu4_by_formula(predict: str, label: str) -> float:
    """BLEU-4 written out: clipped n-gram precisions on characters, method3 smoothing (the k-th
    zero precision becomes 1/(2^k · count)), brevity penalty, geometric mean."""
    hyp, ref = list(predict), list(label)
    logs, k = 0.0, 0
    for n in range(1, 5):
        hyp_ngrams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        ref_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matched = sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
        count = max(1, sum(hyp_ngrams.values()))
        if matched == 0:
            k += 1
            precision = Fraction(1, 2**k * count)
        else:
            precision = Fraction(matched, count)
        logs += 0.25 * math.log(precision)
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(logs)


def test_lcs_length_equals_the_dynamic_programming_table() -> None:
    import random

    from rouge_chinese.rouge_score import _lcs

    rng = random.Random(7)
    for _ in range(2000):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]  # over 64: more than a word
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs(a, b)[len(a), len(b)], (a, b)


def test_rouge_scores_equal_rouge_chinese_on_long_reasoning() -> None:
    """The fast ROUGE-L gives rouge-chinese's own numbers: sentences split at 。！？ and
    ellipses, repeated words, an answer after a think block."""
    import random

    from rouge_chinese import Rouge

    from runner.eval.metrics import _jieba

    rng = random.Random(3)
    pieces = ["体育", "新闻", "。", "！", "？", "的", "比赛", "……", "”", "央行", "降息", "股市"]
    for _ in range(200):
        predict = "<think>\n" + "".join(rng.choices(pieces, k=rng.randint(1, 120)))
        label = "".join(rng.choices(pieces, k=rng.randint(1, 120))) + "\n</think>\n\n体育"
        ours = similarity_scores(predict, label)
        hyp = " ".join(_jieba().cut(predict))
        ref = " ".join(_jieba().cut(label))
        theirs = Rouge().get_scores(hyp, ref)[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            assert ours[key] == round(theirs[key]["f"] * 100, 4), (key, predict, label)


def test_empty_prediction_scores_zero() -> None:
    assert similarity_scores("", "体育") == {
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
        "bleu-4": 0.0,
    }
    assert similarity_scores("   \n", "体育")["rouge-1"] == 0.0


def test_the_mean_over_samples() -> None:
    means = mean_similarity(["财经", "", "体育消息"], ["财经", "体育", "体育新闻"])
    assert means["predict_rouge-1"] == round((100.0 + 0 + 0) / 3, 4)
    assert means["predict_bleu-4"] == round((59.4604 + 0 + 31.9472) / 3, 4)


def test_macro_f1_and_confusion_on_a_small_fixed_case() -> None:
    gold = ["体育", "体育", "体育", "财经", "财经", "娱乐"]
    predicted = ["体育", "体育", "财经", "财经", None, "体育"]
    scores = label_scores(
        gold, predicted, truncated=[False] * 5 + [True], labels=["体育", "财经", "娱乐"]
    )
    # 体育: predicted 3 times (samples 0, 1, 5), 2 right -> P 2/3; 3 references -> R 2/3; F1 2/3.
    # 财经: predicted 2, 1 right -> P 1/2; 2 references -> R 1/2; F1 = 0.5.
    # 娱乐: never predicted -> P 0, R 0, F1 0 (it occurs as a reference, so it is averaged).
    assert scores["per_class"]["体育"] == {
        "precision": 0.6667,
        "recall": 0.6667,
        "f1": 0.6667,
        "support": 3,
    }
    assert scores["per_class"]["财经"]["f1"] == 0.5
    assert scores["per_class"]["娱乐"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["macro_f1"] == round((0.6667 + 0.5 + 0.0) / 3, 4)
    assert scores["accuracy"] == round(3 / 6, 4)
    assert scores["confusion"]["columns"] == ["体育", "财经", "娱乐", "(invalid)"]
    assert scores["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]]
    assert scores["invalid_rate"] == round(1 / 6, 4)
    assert scores["truncated_rate"] == round(1 / 6, 4)


def test_a_reference_label_outside_the_label_set_gets_its_own_row() -> None:
    scores = label_scores(["新类"], ["体育"], truncated=[False], labels=["体育"])
    assert scores["confusion"]["labels"] == ["体育", "新类"]
    assert scores["accuracy"] == 0.0


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (None, None),
        ({"accuracy": 0.5, "macro_f1": 0.25}, {"accuracy": 0.25, "macro_f1": 0.5}),
    ],
)
def test_deltas(other, expected) -> None:
    assert deltas({"accuracy": 0.75, "macro_f1": 0.75, "backend": "x"}, other) == expected
