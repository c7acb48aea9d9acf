"""Evaluate one model (the base model, or base + an adapter) on a dataset's eval split."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
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

log = logging.getLogger(__name__)


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


def fit_prompt(prompt: list[int], limit: int) -> list[int]:
    """A prompt cut to its last ``limit`` tokens when it is longer. The end is what matters: it
    holds the text to classify and the generation prompt the answer continues from (training
    cuts a sequence's end instead, where the answer it learns from is).

    >>> fit_prompt([1, 2, 3, 4, 5], 3), fit_prompt([1, 2], 3)
    ([3, 4, 5], [1, 2])
    """
    return prompt[-limit:] if len(prompt) > limit else prompt


def prompt_room(max_model_len: int, budget: int) -> int:
    """Tokens a prompt may have so that ``budget`` new tokens fit in the evaluation context."""
    room = max_model_len - budget
    if room < 1:
        raise ConfigError(
            f"an answer budget of {budget} tokens (max_new_tokens) leaves no room for the "
            f"prompt in the evaluation context of {max_model_len} tokens (EVAL_MAX_MODEL_LEN): "
            "raise EVAL_MAX_MODEL_LEN or lower max_new_tokens"
        )
    return room


def evaluate_conversations(
    predictor: Predictor,
    tokenizer: ChatTokenizer,
    conversations: Sequence[Sequence[Message]],
    labels: Sequence[str] | None,
    *,
    max_model_len: int,
    max_new_tokens: int | None = None,
) -> EvalOutcome:
    """Predict every conversation's answer and score it. A prompt that leaves no room for the
    answer budget in ``max_model_len`` keeps its last tokens and is counted
    (``truncated_prompts``), whatever the backend, so both backends score the same prompts."""
    histories = [c[:-1] for c in conversations]
    references = [answer_of(c) for c in conversations]
    budget = max_new_tokens or derive_max_new_tokens(tokenizer, references)
    room = prompt_room(max_model_len, budget)
    rendered = [render_prompt(tokenizer, h) for h in histories]
    prompts = [fit_prompt(p, room) for p in rendered]
    cut = sum(len(p) > room for p in rendered)
    started = time.perf_counter()
    generations = predictor.generate(prompts, budget)
    runtime = time.perf_counter() - started
    texts = [g.text for g in generations]
    metrics: dict[str, Any] = {
        "backend": predictor.backend,
        "max_new_tokens": budget,
        "truncated_prompts": cut,
        "prompt_token_limit": room,
    }
    if cut:
        metrics["prompts_note"] = (
            f"{cut} of {len(prompts)} eval prompts were longer than {room} tokens "
            f"(EVAL_MAX_MODEL_LEN {max_model_len} minus the answer budget of {budget}) and kept "
            f"their last {room}"
        )
        log.warning("%s", metrics["prompts_note"])
    if predictor.note:
        metrics["backend_note"] = predictor.note
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
