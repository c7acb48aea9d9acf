"""Evaluate one model (the base model, or base + an adapter) on a dataset's eval split."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.protocol import (
    ChatTokenizer,
    Message,
    answer_of,
    match_label,
    parse_answer,
    render_prompt,
    render_prompt_text,
)
from runner.eval.metrics import label_scores, mean_similarity
from runner.eval.predict import Predictor


@dataclass
class EvalOutcome:
    metrics: dict[str, Any]
    predictions: list[dict[str, str]]  # generated_predictions.jsonl rows: prompt, predict, label


def derive_max_new_tokens(tokenizer: ChatTokenizer, answers: Sequence[str]) -> int:
    """Room for the longest reference answer (its chain of thought included) plus a quarter, so
    a model that thinks a little longer than the references is not cut off."""
    longest = max(
        (len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=16
    )
    return math.ceil(longest * 1.25) + 8


def evaluate_conversations(
    predictor: Predictor,
    tokenizer: ChatTokenizer,
    conversations: Sequence[Sequence[Message]],
    labels: Sequence[str] | None,
    *,
    max_new_tokens: int | None = None,
) -> EvalOutcome:
    histories = [c[:-1] for c in conversations]
    references = [answer_of(c) for c in conversations]
    budget = max_new_tokens or derive_max_new_tokens(tokenizer, references)
    prompts = [render_prompt(tokenizer, h) for h in histories]
    started = time.perf_counter()
    generations = predictor.generate(prompts, budget)
    runtime = time.perf_counter() - started
    texts = [g.text for g in generations]
    metrics: dict[str, Any] = {"backend": predictor.backend, "max_new_tokens": budget}
    if labels:
        parsed = [parse_answer(t) for t in texts]
        predicted = [match_label(p.label, labels) for p in parsed]
        truncated = [
            not g.finished or p.truncated for g, p in zip(generations, parsed, strict=True)
        ]
        gold = [parse_answer(r).label or r.strip() for r in references]
        metrics.update(label_scores(gold, predicted, truncated=truncated, labels=labels))
    else:
        metrics["samples"] = len(texts)
        metrics["truncated_rate"] = round(
            sum(not g.finished for g in generations) / max(len(texts), 1), 4
        )
    metrics.update(mean_similarity(texts, references))
    metrics["predict_runtime"] = round(runtime, 4)
    metrics["predict_samples_per_second"] = round(len(texts) / runtime, 3) if runtime else None
    predictions = [
        {"prompt": render_prompt_text(tokenizer, h), "predict": t, "label": r}
        for h, t, r in zip(histories, texts, references, strict=True)
    ]
    return EvalOutcome(metrics, predictions)
