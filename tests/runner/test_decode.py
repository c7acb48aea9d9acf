"""The graphed evaluation decode (``runner.eval.decode``: a static KV cache of ours, the decode step
replayed as a CUDA graph on a GPU) runs eagerly on CPU here, and is held to transformers'
``generate``: the same greedy tokens for every model family, prompts of different lengths (left
padding), the same end-of-answer cuts; and it refuses (``generate`` decodes instead) what it does
not compute: a sliding window shorter than the sequence, generation_config processors."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from runner.eval import decode
from runner.eval.predict import TransformersPredictor, generate_batched
from runner.tiny_model import FAMILY_NAMES
from tests.runner.test_families import family_dirs  # noqa: F401  (the session's family models)

PROMPTS = [[5, 17, 33, 2, 9, 41, 7, 12], [8, 3], [21, 30, 4, 4, 19], [11]]


def _model(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_decode_loop_gives_generates_greedy_tokens_for_every_family(
    family,
    family_dirs,  # noqa: F811
) -> None:
    model = _model(family_dirs[family])
    window = getattr(model.config, "sliding_window", None) or 64  # gemma3's tiny one: 16
    new_tokens = min(24, window - max(map(len, PROMPTS)))
    assert decode.refusal(model, max(map(len, PROMPTS)) + new_tokens) is None
    batched = decode.decode(model, PROMPTS, new_tokens, pad_token_id=0, device="cpu", graphs=False)
    assert batched.shape == (len(PROMPTS), new_tokens)
    want = model.generate  # the reference: transformers' own greedy decode, per prompt alone
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        alone = want(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert batched[PROMPTS.index(prompt)].tolist() == alone, (family, prompt)


def test_graphed_and_generate_give_the_same_answers_and_ends(tiny_model_dir) -> None:
    """Through ``generate_batched`` (what evaluation calls): the same answers, ended by the same
    end tokens, with batches smaller than the prompt list, and an early stop once all ended."""
    model = _model(tiny_model_dir)
    free = generate_batched(
        model, PROMPTS, 24, eos_token_id=None, pad_token_id=0, batch_size=4, device="cpu"
    )
    # end tokens the free answers do produce, so the cuts are exercised: row 0's 5th token ends
    eos = free[0][0][4]
    stop = free[1][0][3]
    kwargs = dict(eos_token_id=eos, pad_token_id=0, batch_size=3, device="cpu")
    kwargs["stop_token_ids"] = [stop]
    graphed = generate_batched(model, PROMPTS, 24, cache_implementation="graphed", **kwargs)
    plain = generate_batched(model, PROMPTS, 24, **kwargs)
    assert graphed == plain
    assert graphed[0] == (free[0][0][:4], True)  # cut before the end of sequence
    assert any(new and new[-1] == stop for new, ended in graphed if ended)  # a stop kept


def test_the_loop_stops_once_every_row_has_ended(tiny_model_dir) -> None:
    model = _model(tiny_model_dir)
    first = decode.decode(model, PROMPTS, 40, pad_token_id=0, device="cpu", graphs=False)
    ends = torch.tensor(sorted({int(t) for t in first[:, 1]}))  # every row's second token
    short = decode.decode(
        model, PROMPTS, 40, pad_token_id=0, device="cpu", graphs=False, stops=ends
    )
    assert short.shape[1] == decode.CHECK_EVERY  # the first check found every row ended
    assert torch.equal(short, first[:, : decode.CHECK_EVERY])


def test_what_the_loop_does_not_compute_is_decoded_by_generate(family_dirs, caplog) -> None:  # noqa: F811
    window = _model(family_dirs["mistral-window"])  # sliding window of 8 tokens
    assert "sliding window (8)" in (decode.refusal(window, 40) or "")
    model = _model(family_dirs["qwen2"])
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty=1.3" in (decode.refusal(model, 40) or "")
    assert decode.refusal(_model(family_dirs["qwen2"]), 40, min_new_tokens=2) is not None
    with caplog.at_level(logging.INFO, logger="runner.eval.predict"):
        got = generate_batched(
            model,
            PROMPTS,
            12,
            eos_token_id=None,
            pad_token_id=0,
            batch_size=4,
            device="cpu",
            cache_implementation="graphed",
        )
    assert "decodes with generate, not CUDA graphs" in caplog.text
    assert got == generate_batched(
        model, PROMPTS, 12, eos_token_id=None, pad_token_id=0, batch_size=4, device="cpu"
    )  # the penalty applied, as generate applies it


def test_the_evaluation_predictor_decodes_graphed_on_gpus_only(tiny_model_dir) -> None:
    cpu = TransformersPredictor(tiny_model_dir, None)
    assert cpu.cache_implementation is None  # auto on CPU: generate's dynamic cache
    asked = TransformersPredictor(tiny_model_dir, None, cache_implementation="graphed")
    prompts = PROMPTS[:2]
    assert [g.text for g in asked.generate(prompts, 16)] == [
        g.text for g in cpu.generate(prompts, 16)
    ]
