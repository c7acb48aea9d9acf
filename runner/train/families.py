"""Which training path a model architecture takes, and why.

Every architecture transformers can load trains with its own decoder layers over packed sequences
(``attention.packed_attention``). On a GPU, LoRA jobs go faster through the CUDA-graphed decoder
(runner/train/graphs.py), whose layers are ``FusedLayer``s where the architecture is one they
compute exactly. These functions read the model's config and say, for each of the two, why not
(None: it applies); the job's thread is told when the architecture is the reason
(``recipe.train``), and the support matrix in ``runner.models`` / docs/models.md is held to them.

``FusedLayer`` computes a pre-norm decoder layer: RMSNorm (``weight · x̂``), q/k/v projections
(optionally with a per-head RMSNorm on q and k, as Qwen3), rotary embedding over the whole head,
causal attention (optionally within a sliding window), o projection plus residual, RMSNorm,
``down(silu(gate) · up)`` plus residual. A layer with anything else is left to transformers.
"""

from __future__ import annotations

from typing import Any

# The model types whose decoder layers are known to be exactly what ``FusedLayer`` computes (the
# gradient tests in tests/runner/test_families.py hold each one to transformers' layer).
FUSED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
# The model types whose q and k get a per-head RMSNorm before RoPE (``FusedLayer`` applies it).
QK_NORM_MODEL_TYPES = ("qwen3",)


def _activation(config: Any) -> str | None:
    return getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)


def _per_layer_rotary(config: Any) -> bool:
    """Whether the model has a rotary embedding per layer type (Gemma 3: local and global)."""
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = set(getattr(config, "layer_types", None) or ())
    return bool(layer_types) and layer_types <= set(params)


def _features(config: Any) -> list[str]:
    """What in this config ``FusedLayer`` does not compute, in words (empty: nothing)."""
    features = []
    act = _activation(config)
    if act != "silu":
        features.append(f"a {act} MLP (GeGLU) where the fused layer computes SiLU·mul")
    if getattr(config, "attention_dropout", 0.0):
        features.append(f"attention dropout {config.attention_dropout}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        features.append(f"attention logit soft-capping ({config.attn_logit_softcapping})")
    if getattr(config, "final_logit_softcapping", None) is not None:
        features.append(f"final logit soft-capping ({config.final_logit_softcapping})")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        features.append(f"rotary embedding on part of each head ({config.partial_rotary_factor})")
    if _per_layer_rotary(config):
        features.append("a rotary embedding per layer type (local and global layers)")
    if config.model_type.startswith("gemma"):
        features.append(
            "four RMSNorms per layer (pre/post attention and feed-forward), RMSNorm as "
            "(1 + weight)·x̂, q/k norms and embeddings scaled by √hidden_size"
        )
    return features


def fused_layers_refusal(config: Any) -> str | None:
    """Why this architecture's decoder layers cannot be ``FusedLayer``s (None: they can)."""
    model_type = getattr(config, "model_type", "unknown")
    features = _features(config)
    if model_type not in FUSED_MODEL_TYPES:
        known = ", ".join(FUSED_MODEL_TYPES)
        what = f": {'; '.join(features)}" if features else ""
        return f"the fused decoder layer computes {known} layers, not {model_type}{what}"
    if features:
        return f"this {model_type} config has {'; '.join(features)}"
    return None


def graphs_refusal(config: Any) -> str | None:
    """Why the CUDA-graphed decoder cannot run this architecture at all, fused or not (None: it
    can). The graphed stack computes one rotary embedding for all layers and passes each layer
    the packed-sequence boundaries, nothing else."""
    if _per_layer_rotary(config):
        return (
            f"{config.model_type} has a rotary embedding per layer type (local and global "
            "layers) and the graphed decoder computes one for all layers"
        )
    return packed_training_refusal(config)


def packed_training_refusal(config: Any) -> str | None:
    """Why this architecture cannot train over packed sequences at all (None: it can): what
    ``attention.packed_attention`` does not compute. The job fails with this before step 1."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return (
            f"{config.model_type} soft-caps its attention logits "
            f"(attn_logit_softcapping={config.attn_logit_softcapping}), which packed training "
            "attention does not compute"
        )
    if getattr(config, "use_bidirectional_attention", False):
        return f"{config.model_type} is configured for bidirectional attention, not a causal LM"
    return None


def training_path_note(config: Any) -> str | None:
    """The job thread's note when the architecture keeps a GPU LoRA job off the fused layers:
    which path it takes and why (None for the architectures the fused layers compute)."""
    architecture = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    graphs = graphs_refusal(config)
    fused = fused_layers_refusal(config)
    if graphs is not None:
        also = f"; and {fused}" if fused is not None else ""
        return (
            f"{architecture} trains with transformers' own decoder layers, eagerly (no fused "
            f"layers, no CUDA graphs): {graphs}{also}."
        )
    if fused is not None:
        return (
            f"{architecture} trains with transformers' own decoder layers (CUDA-graphed on a "
            f"GPU, not the fused ones): {fused}."
        )
    return None
