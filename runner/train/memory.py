"""How much GPU memory a training job needs, estimated before it starts, so a job that cannot fit
is refused with the reason instead of dying with an out-of-memory error half-way.

The activation term is calibrated on the H200 measurements in TRAINING-SPEED.md (a 7B Qwen2,
16 packed samples ≈ 4,200 tokens: 43 GB peak of which 15 GB weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.config import TrainConfig

GiB = 1024**3
LOSS_CHUNK = 256  # answer positions per loss chunk under gradient checkpointing
# Bytes per trainable weight beyond the weight itself (see estimate_training_memory).
TRAINER_BYTES_PER_TRAINABLE = 4 + 4 + 8 + 2


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return int((self.weights + self.optimizer + self.activations + self.logits) * 1.1)

    def describe(self) -> str:
        return (
            f"~{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, optimizer "
            f"{self.optimizer / GiB:.1f}, activations {self.activations / GiB:.1f}, logits "
            f"{self.logits / GiB:.1f})"
        )


def parameter_counts(model_config: Any, train: TrainConfig) -> tuple[int, int]:
    """(all parameters, trainable parameters) of a Qwen2/Llama-style decoder."""
    h = model_config.hidden_size
    inter = model_config.intermediate_size
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_dim = model_config.num_key_value_heads * (
        getattr(model_config, "head_dim", None) or h // heads
    )
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv_dim),
        "v_proj": (h, kv_dim),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(i * o for i, o in shapes.values())
    embeddings = model_config.vocab_size * h * (1 if model_config.tie_word_embeddings else 2)
    total = per_layer * layers + embeddings
    if train.method in ("lora", "qlora"):
        modules = train.lora_modules()
        trainable = layers * sum(train.lora_rank * (shapes[m][0] + shapes[m][1]) for m in modules)
    elif train.method == "freeze":
        trainable = per_layer * min(train.freeze_trainable_layers, layers)
    else:
        trainable = total
    return total, trainable


def estimate_training_memory(
    model_config: Any,
    train: TrainConfig,
    *,
    step_tokens: int,
    answer_tokens: int,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    total, trainable = parameter_counts(model_config, train)
    bits = train.effective_quantization_bit
    weight_bytes = {4: 0.55, 8: 1.05}.get(bits or 0, 2.0)
    # Per trainable weight: the fp32 master and its fp32 gradient (kept between steps), two Adam
    # moments, and the bf16 gradient of the model's copy (live through the backward; kept
    # allocated between steps under CUDA graphs, recipe.MasterWeights) (+ the bf16 weight itself
    # for full/freeze, already counted in the weights).
    optimizer = trainable * TRAINER_BYTES_PER_TRAINABLE
    h, inter = model_config.hidden_size, model_config.intermediate_size
    layers = model_config.num_hidden_layers
    per_token_layer = 2 * (6 * h + 4 * inter) * 1.2
    stored_layers = 1 if gradient_checkpointing else layers
    activations = int(
        step_tokens * per_token_layer * stored_layers
        + (step_tokens * h * 2 * layers if gradient_checkpointing else 0)
    )
    # bf16 logits, their float32 copy and log-softmax; with checkpointing the loss runs over
    # LOSS_CHUNK answer positions at a time (recipe.chunked_cross_entropy).
    rows = min(answer_tokens, LOSS_CHUNK) if gradient_checkpointing else answer_tokens
    logits = rows * model_config.vocab_size * (2 + 4 + 4)
    return MemoryEstimate(int(total * weight_bytes), optimizer, activations, logits)
