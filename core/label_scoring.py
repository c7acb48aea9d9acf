"""Label-constrained answers: the model reasons freely, then the label is *scored* from the label
set instead of generated, so every answer is a label from the set with a probability.

Serving (both engines) and evaluation (both predictors) run exactly this, so the evaluation's
headline accuracy is what ``/v1/classify`` will answer:

1. The answer's head: the chain of thought the model generates up to ``</think>`` (closed by us,
   ``reasoning_cut``, when it ends or spends its budget without closing it), or for
   ``reasoning=off`` an empty closed ``<think>`` block, or nothing for data without reasoning.
2. Each label's continuation ``head + separator + label`` tokenized as training tokenized the
   answer (the answer text on its own, then end-of-sequence), after the prompt. The tokens every
   continuation shares become context; each label is scored on its own tokens up to the first one
   that tells it apart from every other label (after that the label is decided: a constrained
   decoder would have to finish it). Labels whose first tokens all differ need one read.
3. A read is the log-probabilities of a few candidate next tokens after a prefix (vLLM:
   ``SamplingParams(max_tokens=1, logprob_token_ids=…)``; transformers: one forward pass). Each
   label's score is the sum of its tokens' log-probabilities; the answer is the softmax over the
   labels' scores: the best label, its probability and the whole distribution.

>>> plan = plan_scoring(_Chars(), [9], "", ["体育", "体操", "财经"], separator="")
>>> plan.context, plan.depths, plan.reads
([9], [2, 2, 1], [((), (20307, 36130)), ((20307,), (32946, 25805))])
>>> import math
>>> result = finish(plan, [{20307: math.log(0.8), 36130: math.log(0.2)},
...                        {32946: math.log(0.75), 25805: math.log(0.25)}])
>>> result.label, result.scores
('体育', {'体育': 0.6, '体操': 0.2, '财经': 0.2})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.protocol import THINK_CLOSE, THINK_OPEN, ChatTokenizer, parse_answer

DEFAULT_SEPARATOR = "\n\n"
REASONING_MODES = ("on", "off")
MAX_CANDIDATES = 128  # vLLM's bound on logprob_token_ids per request


@dataclass(frozen=True)
class AnswerStyle:
    """How the training answers put the label: after a ``<think>`` block or bare, and the text
    between ``</think>`` and the label."""

    reasoning: bool = True
    separator: str = DEFAULT_SEPARATOR

    def to_dict(self) -> dict[str, Any]:
        return {"reasoning": self.reasoning, "separator": self.separator}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AnswerStyle:
        if not data:
            return cls()
        return cls(bool(data.get("reasoning", True)), str(data.get("separator", DEFAULT_SEPARATOR)))


def answer_style(answers: Sequence[str]) -> AnswerStyle:
    """The style of most reference answers (ties: with reasoning, the default separator).

    >>> answer_style(["<think>\\n想\\n</think>\\n\\n体育", "<think>x</think>\\n财经"])
    AnswerStyle(reasoning=True, separator='\\n\\n')
    >>> answer_style(["体育", "财经"])
    AnswerStyle(reasoning=False, separator='')
    """
    with_reasoning: dict[str, int] = {}
    bare = 0
    for answer in answers:
        close = answer.rfind(THINK_CLOSE)
        if close < 0:
            bare += 1
            continue
        tail = answer[close + len(THINK_CLOSE) :]
        separator = tail[: len(tail) - len(tail.lstrip())]
        with_reasoning[separator] = with_reasoning.get(separator, 0) + 1
    if bare > sum(with_reasoning.values()):
        return AnswerStyle(reasoning=False, separator="")
    if not with_reasoning:
        return AnswerStyle()
    best = max(
        with_reasoning, key=lambda s: (with_reasoning[s], s == DEFAULT_SEPARATOR)
    )  # the most common separator
    return AnswerStyle(reasoning=True, separator=best)


@dataclass(frozen=True)
class Head:
    """What the label follows in the answer, and what the user is shown of it."""

    text: str
    reasoning: str | None
    cut: bool  # the model did not close its reasoning: we closed it
    mode: str  # on | off | none


def prompt_opens_think(prompt_text: str) -> bool:
    """DeepSeek-R1 templates end the generation prompt with ``<think>\\n``."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def reasoning_head(generated: str, *, finished_by_close: bool) -> Head:
    """The head from a generation stopped at ``</think>`` (``finished_by_close``), or one that
    ended or ran out of budget before it (then closed here and marked cut).

    >>> reasoning_head("<think>\\n球赛\\n</think>", finished_by_close=True)
    Head(text='<think>\\n球赛\\n</think>', reasoning='球赛', cut=False, mode='on')
    >>> reasoning_head("<think>\\n球赛还", finished_by_close=False).text
    '<think>\\n球赛还\\n</think>'
    """
    close = generated.find(THINK_CLOSE)
    if finished_by_close and close >= 0:
        text = generated[: close + len(THINK_CLOSE)]
        return Head(text, parse_answer(text).reasoning, cut=False, mode="on")
    if close >= 0:  # closed, then went on (a backend without stop strings)
        text = generated[: close + len(THINK_CLOSE)]
        return Head(text, parse_answer(text).reasoning, cut=False, mode="on")
    body = generated.rstrip()
    text = f"{body}\n{THINK_CLOSE}" if body else THINK_CLOSE
    return Head(text, parse_answer(text).reasoning or None, cut=True, mode="on")


def empty_head(*, prompt_text: str, style: AnswerStyle) -> Head:
    """``reasoning=off``: an empty closed ``<think>`` block (or no head for data without one)."""
    if not style.reasoning:
        return Head("", None, cut=False, mode="none")
    if prompt_opens_think(prompt_text):
        return Head(f"\n{THINK_CLOSE}", None, cut=False, mode="off")
    return Head(f"{THINK_OPEN}\n\n{THINK_CLOSE}", None, cut=False, mode="off")


@dataclass(frozen=True)
class ScoringPlan:
    labels: tuple[str, ...]
    context: list[int]  # prompt + what every continuation shares
    tails: list[list[int]]  # per label: its tokens after the context (to end of sequence)
    depths: list[int]  # per label: how many of its tail tokens are scored
    reads: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (prefix after context, candidates)


def continuation_ids(tokenizer: ChatTokenizer, head: str, separator: str, label: str) -> list[int]:
    """The answer's tokens as training tokenizes them: the answer text alone, then end of
    sequence."""
    text = f"{head}{separator}{label}" if head else label
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokenizer.eos_token_id is not None
    return [*ids, tokenizer.eos_token_id]


def plan_scoring(
    tokenizer: ChatTokenizer,
    prompt_ids: Sequence[int],
    head: str,
    labels: Sequence[str],
    *,
    separator: str,
) -> ScoringPlan:
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"a label set needs distinct labels, got {list(labels)}")
    full = [continuation_ids(tokenizer, head, separator, label) for label in labels]
    shared = 0
    while all(len(f) > shared for f in full) and len({f[shared] for f in full}) == 1:
        shared += 1
    if len(labels) == 1:
        shared = 0
    context = list(prompt_ids) + full[0][:shared]
    tails = [f[shared:] for f in full]
    depths = []
    for i, tail in enumerate(tails):
        others = [t for j, t in enumerate(tails) if j != i]
        depth = 1
        while depth < len(tail) and any(o[:depth] == tail[:depth] for o in others):
            depth += 1
        depths.append(min(depth, len(tail)))
    reads: dict[tuple[int, ...], list[int]] = {}
    for tail, depth in zip(tails, depths, strict=True):
        for k in range(depth):
            candidates = reads.setdefault(tuple(tail[:k]), [])
            if tail[k] not in candidates:
                candidates.append(tail[k])
    chunks = [  # vLLM reads at most MAX_CANDIDATES tokens at once: a larger set takes more reads
        (prefix, tuple(candidates[i : i + MAX_CANDIDATES]))
        for prefix, candidates in reads.items()
        for i in range(0, len(candidates), MAX_CANDIDATES)
    ]
    return ScoringPlan(tuple(labels), context, tails, depths, chunks)


@dataclass(frozen=True)
class LabelScore:
    label: str
    confidence: float
    scores: dict[str, float]  # label -> probability, highest first
    logprobs: dict[str, float]  # label -> summed log-probability of its scored tokens


def finish(plan: ScoringPlan, read_logprobs: Sequence[dict[int, float]]) -> LabelScore:
    """Each label's score from the reads (in ``plan.reads`` order), then the softmax."""
    by_prefix: dict[tuple[int, ...], dict[int, float]] = {}
    for (prefix, _), logprobs in zip(plan.reads, read_logprobs, strict=True):
        by_prefix.setdefault(prefix, {}).update(logprobs)
    sums = []
    for tail, depth in zip(plan.tails, plan.depths, strict=True):
        sums.append(sum(by_prefix[tuple(tail[:k])][tail[k]] for k in range(depth)))
    top = max(sums)
    weights = [math.exp(s - top) for s in sums]
    total = sum(weights)
    probabilities = [w / total for w in weights]
    order = sorted(range(len(plan.labels)), key=lambda i: -probabilities[i])
    scores = {plan.labels[i]: round(probabilities[i], 6) for i in order}
    best = order[0]
    return LabelScore(
        plan.labels[best],
        probabilities[best],
        scores,
        {plan.labels[i]: sums[i] for i in order},
    )


def read_requests(plan: ScoringPlan) -> list[tuple[list[int], list[int]]]:
    """The reads as (token ids to run, candidate next tokens)."""
    return [(plan.context + list(prefix), list(candidates)) for prefix, candidates in plan.reads]


class _Chars:
    """A stand-in tokenizer for the doctest: one token per character (its code point); eos 0."""

    eos_token_id = 0

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def score_batch(
    tokenizer: ChatTokenizer,
    prompts: Sequence[Sequence[int]],
    heads: Sequence[Head],
    labels: Sequence[str],
    style: AnswerStyle,
    read: Any,
) -> list[LabelScore]:
    """Score every (prompt, head) with one batch of reads: ``read(requests)`` returns, for each
    (token ids, candidates), {candidate: log-probability of it next}."""
    plans = [
        plan_scoring(tokenizer, prompt, head.text, labels, separator=style.separator)
        for prompt, head in zip(prompts, heads, strict=True)
    ]
    requests = [request for plan in plans for request in read_requests(plan)]
    answers = read(requests) if requests else []
    results, at = [], 0
    for plan in plans:
        results.append(finish(plan, answers[at : at + len(plan.reads)]))
        at += len(plan.reads)
    return results
