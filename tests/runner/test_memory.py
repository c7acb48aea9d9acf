"""The memory estimate that refuses jobs, against what the H200 runs measured
(docs/benchmarks.md, 2026-11-30 run 3)."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from runner.config import parse_train_args
from runner.train.memory import GiB, estimate_training_memory, parameter_counts

R1_DISTILL_7B = Qwen2Config(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
TOKENS_PER_SAMPLE, ANSWER_PER_SAMPLE = 260, 174


def test_parameter_count_of_the_7b_architecture() -> None:
    total, trainable = parameter_counts(R1_DISTILL_7B, parse_train_args(["rank=8"]))
    assert 7.5e9 < total < 7.7e9  # DeepSeek-R1-Distill-Qwen-7B: 7.6B (biases not counted)
    assert trainable == 28 * 8 * (3584 * 2 * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)


@pytest.mark.parametrize(("samples", "measured_gb"), [(4, 25.9), (16, 48.5)])
def test_lora_estimate_is_within_15_percent_of_the_measured_peak(
    samples: int, measured_gb: float
) -> None:
    estimate = estimate_training_memory(
        R1_DISTILL_7B,
        parse_train_args(["rank=8"]),
        step_tokens=samples * TOKENS_PER_SAMPLE,
        answer_tokens=samples * ANSWER_PER_SAMPLE,
    )
    assert abs(estimate.total / 1e9 - measured_gb) / measured_gb < 0.15, estimate.describe()


def test_checkpointing_and_qlora_shrink_the_estimate() -> None:
    lora = parse_train_args(["rank=8"])
    plain = estimate_training_memory(R1_DISTILL_7B, lora, step_tokens=4160, answer_tokens=2800)
    ckpt = estimate_training_memory(
        R1_DISTILL_7B, lora, step_tokens=4160, answer_tokens=2800, gradient_checkpointing=True
    )
    qlora = estimate_training_memory(
        R1_DISTILL_7B,
        parse_train_args(["method=qlora"]),
        step_tokens=1040,
        answer_tokens=700,
        gradient_checkpointing=True,
    )
    assert ckpt.activations < plain.activations / 10
    assert qlora.total < 10 * GiB  # measured: 8.1 GB peak
