"""Greedy decoding with a static KV cache of our own, each decode step replayed as one CUDA graph.

transformers' ``generate`` with a dynamic cache spends ~60 ms a step on a 7B model at batch 100
launching kernels and growing the cache (docs/benchmarks.md, run 26): 9.5 s for a 100-sample
evaluation whose weights read takes ~3 ms a step. Its static cache compiles the forward (20–45 s
the first time in a process). Here the cache is preallocated, the attention mask is ours (a 4D
boolean mask that the models' mask code passes through as is) and the whole step — the forward,
the argmax, the writes of the next token, position and mask column — is captured once per batch
and replayed: no host work between steps but one read every ``CHECK_EVERY`` steps to stop when
every row ended.

On a CPU (or with ``graphs=False``) the same loop runs eagerly: tests hold it to ``generate``'s
tokens. ``refusal`` says why a model or request cannot take this path (the caller then uses
``generate``), and a capture that fails falls back the same way, logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # decode steps between the host's checks that every row has ended
# generation_config settings that change greedy tokens (generate applies them; this loop does not)
_PROCESSORS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "min_length": 0,
}


def refusal(model: Any, total_length: int, min_new_tokens: int = 0) -> str | None:
    """Why ``model`` cannot decode ``total_length`` tokens (prompt + answer) on this path; None
    when it can."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention is {getattr(config, '_attn_implementation', None)!r}, not sdpa"
    window = getattr(text, "sliding_window", None)
    if window and total_length > window and getattr(text, "use_sliding_window", True):
        return f"{total_length} tokens exceed the model's sliding window ({window})"
    if min_new_tokens:
        return "min_new_tokens is set"
    generation = getattr(model, "generation_config", None)
    for name, neutral in _PROCESSORS.items():
        value = getattr(generation, name, neutral) if generation is not None else neutral
        if value not in (neutral, None):
            return f"the model's generation_config sets {name}={value!r}"
    return None


ATTENTION = "ftb_decode"


def grouped_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """sdpa for a decode step (one query token) without materialising the KV heads for each
    query head: transformers' sdpa repeats them whenever there is a mask (on CUDA: 2 × 220 MB a
    layer for a 7B at batch 100 and 300 tokens, most of a step's memory traffic); here each KV
    head's query heads are its queries instead — the same products, exactly. The prefill (several
    query tokens) goes to transformers' sdpa."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads % kv_heads:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, grouped_attention)


class _Cache:
    """The KV cache the attention layers write through ``update``: one (batch, heads, length,
    dim) buffer per layer, allocated at the first write (the prefill), written at ``positions``
    (a device tensor the step advances in place)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.keys: dict[int, Any] = {}
        self.values: dict[int, Any] = {}
        self.positions: Any = None

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        import torch

        if layer_idx not in self.keys:
            shape = (key.shape[0], key.shape[1], self.length, key.shape[3])
            self.keys[layer_idx] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.values[layer_idx] = torch.zeros(
                (*shape[:3], value.shape[3]), dtype=value.dtype, device=value.device
            )
        self.keys[layer_idx].index_copy_(2, self.positions, key)
        self.values[layer_idx].index_copy_(2, self.positions, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # models ask when no positions are given
        return self.length

    def __len__(self) -> int:
        return len(self.keys)


def decode(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    pad_token_id: int,
    device: Any,
    graphs: bool,
    stops: Any = None,
) -> Any:
    """Greedy tokens for one batch of ``prompts`` (left-padded here): a (rows, n) tensor on the
    host, n ≤ ``max_new_tokens`` (fewer once every row holds one of ``stops``, a device tensor of end tokens: the caller cuts each
    row at its end anyway). Raises whatever capture raises (the caller falls back)."""
    import torch

    rows, width = len(prompts), max(len(p) for p in prompts)
    length = width + max_new_tokens
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    real = torch.zeros((rows, width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        real[row, width - len(prompt) :] = True
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    # The prefill's mask: causal over real tokens; a padding position sees itself only (a row
    # of a query that sees nothing would be NaN, and its keys are never seen by real tokens).
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    prefill = causal[None] & real[:, None, :]
    prefill |= torch.eye(width, dtype=torch.bool)[None]
    mask = torch.zeros((rows, 1, 1, length), dtype=torch.bool)
    mask[:, 0, 0, :width] = real
    prefill_mask = torch.zeros((rows, 1, width, length), dtype=torch.bool)
    prefill_mask[:, 0, :, :width] = prefill

    cache = _Cache(length)
    out = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=device)
    mask = mask.to(device)
    _register()
    config = model.config
    attention = config._attn_implementation
    config._attn_implementation = ATTENTION  # read by every attention layer at each forward
    try:
        return _decode(model, ids, prefill_mask, positions, mask, cache, out, device, graphs, stops)
    finally:
        config._attn_implementation = attention


def _decode(
    model: Any,
    ids: Any,
    prefill_mask: Any,
    positions: Any,
    mask: Any,
    cache: _Cache,
    out: Any,
    device: Any,
    graphs: bool,
    stops: Any,
) -> Any:
    import torch

    width, max_new_tokens = ids.shape[1], out.shape[1]
    with torch.no_grad():
        cache.positions = torch.arange(width, device=device)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=prefill_mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out[:, :1] = token
        state = {
            "token": token,
            "position": positions[:, -1:].to(device) + 1,
            "at": torch.tensor([width], device=device),
            "step": torch.tensor([1], device=device),
        }

        def step() -> None:
            mask.index_fill_(3, state["at"], True)
            cache.positions = state["at"]
            logits = model(
                input_ids=state["token"],
                attention_mask=mask,
                position_ids=state["position"],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
            state["token"].copy_(logits[:, -1].argmax(-1, keepdim=True))
            out.index_copy_(1, state["step"], state["token"])
            for name in ("position", "at", "step"):
                state[name].add_(1)

        replay = step
        done = 1
        if graphs and max_new_tokens > 1:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                step()  # the warm-up is a real step (its writes are the second token's)
            torch.cuda.current_stream(device).wait_stream(stream)
            done = 2
            graph = torch.cuda.CUDAGraph()
            if done < max_new_tokens:
                with torch.cuda.graph(graph):
                    step()  # recorded, not run
                replay = graph.replay
        while done < max_new_tokens:
            replay()
            done += 1
            if done % CHECK_EVERY == 0 and _all_ended(out[:, :done], stops):
                break
    return out[:, :done].cpu()


def _all_ended(tokens: Any, stops: Any) -> bool:
    if stops is None:
        return False
    import torch

    return bool(torch.isin(tokens, stops).any(1).all())
