"""Label scoring pinned on the tiny model: the distribution ``core.label_scoring`` computes through
the predictor's reads equals the one computed by hand from one plain forward pass over each
label's whole answer, for labels that differ at their first token and for labels that share it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.label_scoring import (
    AnswerStyle,
    empty_head,
    plan_scoring,
    reasoning_head,
    score_batch,
)
from core.protocol import Message, render_prompt, render_prompt_text
from runner.eval.predict import TransformersPredictor


def _by_hand(model, prompt: list[int], answers: dict[str, list[int]]) -> dict[str, float]:
    """Each label's log-probability of its whole answer (up to the token where it parts from
    every other label), summed from the logits of one forward pass, then the softmax."""
    sums = {}
    for label, answer in answers.items():
        others = [a for k, a in answers.items() if k != label]
        depth = next(
            d for d in range(1, len(answer) + 1) if all(o[:d] != answer[:d] for o in others)
        )
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        sums[label] = sum(logprobs[len(prompt) + k - 1, answer[k]].item() for k in range(depth))
    top = max(sums.values())
    total = sum(math.exp(s - top) for s in sums.values())
    return {label: math.exp(s - top) / total for label, s in sums.items()}


@pytest.mark.parametrize(
    "labels",
    [["体育", "股票", "房产", "教育"], ["体育", "体育新闻", "教育"]],
    ids=["apart", "shared"],
)
def test_scores_equal_the_softmax_of_each_labels_answer_log_probability(
    tiny_model_dir: Path, tokenizer, labels
) -> None:
    predictor = TransformersPredictor(tiny_model_dir, None, batch_size=3)
    history = [Message("user", "标题：球队夺冠")]
    prompt = render_prompt(tokenizer, history)
    style = AnswerStyle(reasoning=True, separator="\n\n")
    heads = [
        reasoning_head("<think>\n讲的是球赛\n</think>", finished_by_close=True),
        empty_head(prompt_text=render_prompt_text(tokenizer, history), style=style),
    ]
    for head in heads:
        [scored] = score_batch(tokenizer, [prompt], [head], labels, style, predictor.read)
        answers = {
            label: tokenizer(f"{head.text}\n\n{label}", add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id]
            for label in labels
        }
        shared = 0
        while len({a[shared] for a in answers.values()}) == 1:
            shared += 1
        expected = _by_hand(
            predictor.model,
            prompt + answers[labels[0]][:shared],
            {k: a[shared:] for k, a in answers.items()},
        )
        assert set(scored.scores) == set(labels)
        for label in labels:
            assert abs(scored.scores[label] - expected[label]) < 1e-5, (label, scored, expected)
        assert scored.label == max(expected, key=expected.__getitem__)
        assert abs(scored.confidence - max(expected.values())) < 1e-5
        assert list(scored.scores) == sorted(scored.scores, key=lambda k: -scored.scores[k])


def test_labels_sharing_a_first_token_are_read_past_it(tokenizer) -> None:
    """体育 and 体育新闻 share every token of the shorter one: that becomes context, and they part
    at its end of sequence against the longer one's next token — one read."""
    sport = tokenizer("体育", add_special_tokens=False)["input_ids"]
    plan = plan_scoring(tokenizer, [1, 2], "", ["体育", "体育新闻"], separator="")
    assert plan.context == [1, 2, *sport]
    assert plan.tails[0] == [tokenizer.eos_token_id] and plan.tails[1][-1] == tokenizer.eos_token_id
    assert plan.reads == [((), (tokenizer.eos_token_id, plan.tails[1][0]))]


def test_a_reasoning_that_never_closes_is_closed_and_marked_cut() -> None:
    head = reasoning_head("<think>\n这条讲的是", finished_by_close=False)
    assert head.cut and head.text.endswith("</think>") and head.reasoning == "这条讲的是"
    done = reasoning_head("<think>\n球赛\n</think>\n\n体育", finished_by_close=False)
    assert not done.cut and done.text == "<think>\n球赛\n</think>"


def test_a_label_set_larger_than_one_read_is_scored_in_several() -> None:
    """vLLM reads at most 128 candidate tokens per request: 300 labels take 3 reads at the root,
    and the distribution still covers every label."""
    from core.label_scoring import MAX_CANDIDATES, _Chars, finish

    labels = [chr(0x4E00 + i) for i in range(300)]  # one character (token) each: all part at once
    plan = plan_scoring(_Chars(), [1], "", labels, separator="")
    assert [len(c) for _, c in plan.reads] == [MAX_CANDIDATES, MAX_CANDIDATES, 300 - 2 * 128]
    reads = [{t: -float(t % 7) for t in candidates} for _, candidates in plan.reads]
    scored = finish(plan, reads)
    assert len(scored.scores) == 300 and abs(sum(scored.scores.values()) - 1) < 1e-4
    assert ord(scored.label) % 7 == 0
