"""Evaluate one model (the base model, or base + an adapter) on a dataset's eval split."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.label_scoring import (
    AnswerStyle,
    LabelScore,
    answer_style,
    empty_head,
    reasoning_head,
    score_batch,
)
from core.protocol import (
    ChatTokenizer,
    Message,
    PromptFrame,
    answer_of,
    match_label,
    parse_answer,
    render_prompt,
    render_prompt_text,
)
from runner.eval.metrics import calibration, label_scores, mean_similarity
from runner.eval.predict import Predictor

log = logging.getLogger(__name__)


@dataclass
class EvalOutcome:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]  # generated_predictions.jsonl rows: prompt, predict, label…


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
    frame: PromptFrame | None = None,
) -> EvalOutcome:
    """Predict every conversation's answer and score it. A prompt that leaves no room for the
    answer budget in ``max_model_len`` keeps its last tokens and is counted
    (``truncated_prompts``), whatever the backend, so both backends score the same prompts.

    With a label set the headline scores are serving's label-constrained answers
    (``core.label_scoring``): the label scored after the model's own reasoning, which is the
    free generation up to ``</think>`` (greedy decoding makes it the same text serving generates),
    and again after an empty ``<think>`` block (``reasoning=off``). The free generation itself
    gives the invalid and truncated rates and ROUGE/BLEU."""
    histories = [c[:-1] for c in conversations]
    references = [answer_of(c) for c in conversations]
    budget = max_new_tokens or derive_max_new_tokens(tokenizer, references)
    room = prompt_room(max_model_len, budget)
    rendered = [render_prompt(tokenizer, h) for h in histories]
    prompts = [fit_prompt(p, room) for p in rendered]
    prompt_texts = [render_prompt_text(tokenizer, h) for h in histories]
    cut = sum(len(p) > room for p in rendered)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    generations = predictor.generate(prompts, budget)
    timings["generate_s"] = round(time.perf_counter() - started, 3)
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
    if getattr(predictor, "merged", False):
        metrics["adapter_merged"] = True
    predictions: list[dict[str, Any]] = [
        {"prompt": t, "predict": g, "label": r, "text": _text_of(h, frame)}
        for t, g, r, h in zip(prompt_texts, texts, references, histories, strict=True)
    ]
    if labels:
        gold = [parse_answer(r).label or r.strip() for r in references]
        style = answer_style(references)
        parsed = [parse_answer(t) for t in texts]
        free = [match_label(p.label, labels) for p in parsed]
        free_truncated = [
            not g.finished or p.truncated for g, p in zip(generations, parsed, strict=True)
        ]
        free_scores = label_scores(gold, free, truncated=free_truncated, labels=labels)
        if style.reasoning:
            heads = [reasoning_head(g.text, finished_by_close=False) for g in generations]
        else:
            heads = [empty_head(prompt_text=t, style=style) for t in prompt_texts]
        reads_started = time.perf_counter()
        scored = score_batch(tokenizer, prompts, heads, labels, style, predictor.read)
        metrics.update(
            _constrained(gold, scored, [h.cut for h in heads], labels),
            free_accuracy=free_scores["accuracy"],
            free_macro_f1=free_scores["macro_f1"],
            invalid_rate=free_scores["invalid_rate"],
            truncated_rate=free_scores["truncated_rate"],
            free_invalid_rate=free_scores["invalid_rate"],
            free_truncated_rate=free_scores["truncated_rate"],
            free_confusion=free_scores["confusion"],
            label_scoring=_scoring_note(style),
        )
        off: list[LabelScore] | None = None
        if style.reasoning:
            blank = [empty_head(prompt_text=t, style=style) for t in prompt_texts]
            off = score_batch(tokenizer, prompts, blank, labels, style, predictor.read)
            off_scores = label_scores(
                gold, [s.label for s in off], truncated=[False] * len(off), labels=labels
            )
            off_calibration = calibration(
                [s.confidence for s in off], [s.label == g for s, g in zip(off, gold, strict=True)]
            )
            metrics.update(
                accuracy_reasoning_off=off_scores["accuracy"],
                macro_f1_reasoning_off=off_scores["macro_f1"],
                ece_reasoning_off=off_calibration["ece"],
            )
        timings["label_reads_s"] = round(time.perf_counter() - reads_started, 3)
        for i, row in enumerate(predictions):
            row.update(
                reference=gold[i],
                prediction=scored[i].label,
                confidence=round(scored[i].confidence, 6),
                correct=scored[i].label == gold[i],
                scores=scored[i].scores,
                reasoning=heads[i].reasoning,
                reasoning_cut=heads[i].cut,
                free_prediction=free[i],
            )
            if off is not None:
                row.update(
                    prediction_reasoning_off=off[i].label,
                    confidence_reasoning_off=round(off[i].confidence, 6),
                )
    else:
        metrics["samples"] = len(texts)
        metrics["truncated_rate"] = round(
            sum(not g.finished for g in generations) / max(len(texts), 1), 4
        )
    runtime = time.perf_counter() - started
    similarity_started = time.perf_counter()
    metrics.update(mean_similarity(texts, references))
    timings["similarity_s"] = round(time.perf_counter() - similarity_started, 3)
    metrics["timings"] = timings
    metrics["predict_runtime"] = round(runtime, 4)
    metrics["predict_samples_per_second"] = round(len(texts) / runtime, 3) if runtime else None
    return EvalOutcome(metrics, predictions)


def _constrained(
    gold: Sequence[str], scored: Sequence[LabelScore], cut: Sequence[bool], labels: Sequence[str]
) -> dict[str, Any]:
    scores = label_scores(gold, [s.label for s in scored], truncated=cut, labels=labels)
    correct = [s.label == g for s, g in zip(scored, gold, strict=True)]
    confidences = [s.confidence for s in scored]
    reliability = calibration(confidences, correct)
    return {
        "samples": scores["samples"],
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "per_class": scores["per_class"],
        "confusion": scores["confusion"],
        "reasoning_cut_rate": scores["truncated_rate"],
        "ece": reliability["ece"],
        "reliability": reliability["bins"],
        "mean_confidence": round(sum(confidences) / max(len(confidences), 1), 4),
    }


def _scoring_note(style: AnswerStyle) -> dict[str, Any]:
    return {
        "method": "label-constrained: softmax over the labels' log-probabilities "
        + ("after the model's reasoning" if style.reasoning else "as the whole answer"),
        **style.to_dict(),
    }


def _text_of(history: Sequence[Message], frame: PromptFrame | None) -> str:
    """The variable part of the last user turn (the headline), without the dataset's frame."""
    users = [m.content for m in history if m.role == "user"]
    text = users[-1] if users else ""
    if frame is not None and text.startswith(frame.prefix) and text.endswith(frame.suffix):
        text = text[len(frame.prefix) : len(text) - len(frame.suffix) or None]
    return text
