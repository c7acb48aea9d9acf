"""Scores of predictions against references. Pure functions, no model.

Label scores are what matter for a classifier: the label parsed from each answer (after
``</think>``) against the reference label. ROUGE/BLEU are kept for parity with the reference
workflow and computed as LLaMA-Factory computes them: per sample, jieba words joined by spaces scored
by rouge-chinese (F × 100), BLEU-4 on characters with nltk's ``sentence_bleu`` and
``SmoothingFunction().method3`` (× 100), rounded to 4 places, then the mean; empty text scores 0.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

INVALID = "(invalid)"
SIMILARITY_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.CRITICAL)
    return jieba


def similarity_scores(predict: str, label: str) -> dict[str, float]:
    """LLaMA-Factory's per-sample ROUGE-1/2/L F and BLEU-4, each × 100.

    >>> similarity_scores("体育消息", "体育新闻")["bleu-4"]
    31.9472
    """
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis = " ".join(jieba.cut(predict))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        rouge = Rouge(metrics=["rouge-1", "rouge-2"])
        result = rouge.get_scores(hypothesis, reference)[0]
        scores = {key: round(value["f"] * 100, 4) for key, value in result.items()}
        scores["rouge-l"] = round(_rouge_l_f(rouge, hypothesis, reference) * 100, 4)
    if predict and label:
        with warnings.catch_warnings():  # nltk warns about short hypotheses; the score stands
            warnings.simplefilter("ignore")
            bleu = sentence_bleu(
                [list(label)], list(predict), smoothing_function=SmoothingFunction().method3
            )
    else:
        bleu = 0.0
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def _rouge_l_f(rouge: Any, hypothesis: str, reference: str) -> float:
    """rouge-chinese's ROUGE-L F (``rouge_l_summary_level``: the LCS of the two texts' words,
    sentences joined) on the same words, with a bit-parallel LCS instead of its dictionary table,
    which took seconds per 100 answers of reasoning."""
    from rouge_chinese.rouge_score import _split_into_words

    def words(text: str) -> list[str]:
        sentences = [" ".join(s.split()) for s in rouge.cut_sent(text) if len(s) > 0]
        return list(_split_into_words(sentences))

    hyp, ref = words(hypothesis), words(reference)
    llcs = lcs_length(ref, hyp)
    r_lcs, p_lcs = llcs / len(ref), llcs / len(hyp)
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common subsequence of ``a`` and ``b`` (Allison–Dix: one
    integer as a bit vector over ``a``, one step per item of ``b``).

    >>> lcs_length("ABCBDAB", "BDCABA")
    4
    """
    masks: dict[str, int] = {}
    for i, item in enumerate(a):
        masks[item] = masks.get(item, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for item in b:
        u = v & masks.get(item, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def mean_similarity(predicts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """``predict_rouge-1`` … ``predict_bleu-4``: the means of the per-sample scores."""
    totals = dict.fromkeys(SIMILARITY_KEYS, 0.0)
    for predict, label in zip(predicts, labels, strict=True):
        for key, value in similarity_scores(predict, label).items():
            totals[key] += value
    n = max(len(predicts), 1)
    return {f"predict_{key}": round(total / n, 4) for key, total in totals.items()}


def label_scores(
    gold: Sequence[str],
    predicted: Sequence[str | None],
    *,
    truncated: Sequence[bool],
    labels: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix (rows: reference
    label, columns: predicted label, then ``(invalid)``), invalid and truncated rates.

    ``predicted[i]`` is None when no label from the set could be parsed from answer i (it counts
    as wrong and as invalid). Macro-F1 averages over the classes that occur as a reference or as
    a valid prediction.

    >>> s = label_scores(["a", "a", "b"], ["a", "b", None], truncated=[False, False, True],
    ...                  labels=["a", "b"])
    >>> s["accuracy"], s["confusion"]["matrix"], s["invalid_rate"], s["truncated_rate"]
    (0.3333, [[1, 1, 0], [0, 0, 1]], 0.3333, 0.3333)
    """
    n = len(gold)
    classes = list(labels) + sorted({g for g in gold if g not in labels})
    index = {label: i for i, label in enumerate(classes)}
    matrix = [[0] * (len(classes) + 1) for _ in classes]
    for reference, guess in zip(gold, predicted, strict=True):
        column = index[guess] if guess is not None and guess in index else len(classes)
        matrix[index[reference]][column] += 1
    correct = sum(1 for g, p in zip(gold, predicted, strict=True) if p is not None and g == p)
    predicted_counts = Counter(p for p in predicted if p is not None)
    gold_counts = Counter(gold)
    per_class: dict[str, dict[str, float]] = {}
    for label in classes:
        tp = matrix[index[label]][index[label]]
        precision = tp / predicted_counts[label] if predicted_counts[label] else 0.0
        recall = tp / gold_counts[label] if gold_counts[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": gold_counts[label],
        }
    present = [label for label in classes if gold_counts[label] or predicted_counts[label]]
    macro_f1 = sum(per_class[label]["f1"] for label in present) / len(present) if present else 0.0
    invalid = sum(1 for p in predicted if p is None)
    return {
        "samples": n,
        "accuracy": round(correct / n, 4) if n else 0.0,
        "macro_f1": round(macro_f1, 4),
        "per_class": per_class,
        "confusion": {"labels": classes, "columns": [*classes, INVALID], "matrix": matrix},
        "invalid_rate": round(invalid / n, 4) if n else 0.0,
        "truncated_rate": round(sum(truncated) / n, 4) if n else 0.0,
    }


def calibration(
    confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10
) -> dict[str, Any]:
    """Expected calibration error over ``bins`` equal-width confidence bins (the weighted mean
    gap between each bin's accuracy and its mean confidence: 0 is "90% sure is right 90% of the
    time") and the bins themselves, for the reliability plot.

    >>> c = calibration([0.95, 0.9, 0.65, 0.55], [True, False, True, True], bins=10)
    >>> c["ece"], [(b["lo"], b["count"], b["accuracy"], b["confidence"]) for b in c["bins"]]
    (0.4125, [(0.5, 1, 1.0, 0.55), (0.6, 1, 1.0, 0.65), (0.9, 2, 0.5, 0.925)])
    """
    n = len(confidences)
    grouped: dict[int, list[int]] = {}
    for i, confidence in enumerate(confidences):
        grouped.setdefault(min(int(confidence * bins), bins - 1), []).append(i)
    table, gap = [], 0.0
    for b in sorted(grouped):
        members = grouped[b]
        accuracy = sum(correct[i] for i in members) / len(members)
        mean_conf = sum(confidences[i] for i in members) / len(members)
        gap += len(members) / n * abs(accuracy - mean_conf)
        table.append(
            {
                "lo": round(b / bins, 4),
                "hi": round((b + 1) / bins, 4),
                "count": len(members),
                "accuracy": round(accuracy, 4),
                "confidence": round(mean_conf, 4),
            }
        )
    return {"ece": round(gap, 4) if n else 0.0, "bins": table}


HEADLINE_KEYS = (
    "accuracy",
    "macro_f1",
    "ece",
    "accuracy_reasoning_off",
    "macro_f1_reasoning_off",
    "free_accuracy",
    "invalid_rate",
    "truncated_rate",
    "reasoning_cut_rate",
    "predict_rouge-1",
    "predict_rouge-2",
    "predict_rouge-l",
    "predict_bleu-4",
)


def deltas(current: dict[str, Any], other: dict[str, Any] | None) -> dict[str, float] | None:
    """Differences of the headline scores (current − other); None without another evaluation."""
    if other is None:
        return None
    return {
        key: round(current[key] - other[key], 4)
        for key in HEADLINE_KEYS
        if isinstance(current.get(key), int | float) and isinstance(other.get(key), int | float)
    }
