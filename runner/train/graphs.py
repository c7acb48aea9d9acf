"""CUDA graphs over the decoder layers of a packed training step.

At the tutorial's 4 samples per optimizer step a step is ~1,000 tokens and a 7B LoRA step launches
~6,000 kernels: the GPU waits on the CPU. Capturing the decoder stack's forward and backward as CUDA
graphs (``torch.cuda.make_graphed_callables``) replays them with one launch each. Graphs need fixed
shapes, so a packed step is padded to a *bucket* (a multiple of 128 tokens, coarser for long steps)
with a trailing padding sequence of its own: ``cu_seqlens`` keeps the real samples apart from it,
causal attention keeps them from seeing it, and the LM head never reads it, so the padded step
computes the same loss and gradients as the unpadded one. ``cu_seqlens`` has a fixed length too
(unused slots repeat the end: empty sequences).

The embedding, final norm, LM head, loss and optimizer stay eager (a few dozen launches). One graph
pair is captured per bucket the job meets (lazily, ~0.3 s each on a 7B); all share one memory pool, which is
safe because a step replays only its own bucket's graphs, forward then backward, before the next.
Only for LoRA on CUDA without gradient checkpointing; anything else trains eagerly.
"""

from __future__ import annotations

import logging
import math
import time
import types
from typing import Any

import torch
import torch.nn.functional as F

from runner.train.packing import PackedBatch

log = logging.getLogger(__name__)

MIN_BUCKET = 128
MAX_GRAPHS = 16  # distinct buckets captured per job; steps beyond run eagerly
# Longer steps are not launch-bound (a 16-sample step of ~4,000 tokens ran no faster graphed), and
# each bucket's capture costs ~0.5 s: they run eagerly.
MAX_GRAPH_TOKENS = 2048


def bucket_of(tokens: int) -> int:
    """The padded length of a packed micro-batch: a multiple of 128, or of 1/8 of its power of two
    when longer (padding stays under ~12%).

    >>> [bucket_of(n) for n in (1, 128, 129, 1040, 2049, 5000)]
    [128, 128, 256, 1152, 2304, 5120]
    """
    step = max(MIN_BUCKET, 2 ** max(0, math.floor(math.log2(max(tokens, 1))) - 3))
    return -(-tokens // step) * step


def _fused_rms_norm(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden, (hidden.shape[-1],), self.weight, self.variance_epsilon)


def _fused_lora_linear(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's vanilla LoRA forward, ``base(x) + B(A(x)) * scaling``, with the scaled B product
    and the sum in one GEMM epilogue (addmm): two fewer passes over the layer's output."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or self.disable_adapters
        or self.merged
        or name in self.lora_variant
        or not isinstance(self.lora_dropout[name], torch.nn.Identity)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    out = F.linear(x, base.weight, base.bias)
    low = F.linear(x, self.lora_A[name].weight)
    flat = torch.addmm(
        out.reshape(-1, out.shape[-1]),
        low.reshape(-1, low.shape[-1]),
        self.lora_B[name].weight.t(),
        alpha=self.scaling[name],
    )
    return flat.view(out.shape)


def fuse_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Swap in fused forwards on this model's instances (not the classes): torch's fused RMSNorm
    kernel for the RMSNorm modules, one addmm for each vanilla LoRA linear. Same maths; float
    rounding differs in the last bf16 bit."""
    counts = {"rms_norm": 0, "lora": 0}
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_rms_norm, module)  # type: ignore[method-assign]
            counts["rms_norm"] += 1
        elif kind == "Linear" and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            module.forward = types.MethodType(_fused_lora_linear, module)  # type: ignore[method-assign]
            counts["lora"] += 1
    return counts


def pad_batch(
    batch: PackedBatch, size: int, slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` padded to ``size`` tokens: input ids, position ids and ``slots`` boundaries. The
    padding is a sequence of its own after the samples; unused boundary slots repeat the end.

    >>> from core.protocol import TrainingExample
    >>> from runner.train.packing import pack
    >>> b = pack([TrainingExample([5, 6, 7], 1), TrainingExample([8, 9], 1)])
    >>> ids, pos, cu = pad_batch(b, 8, 5)
    >>> ids.tolist(), pos.tolist(), cu.tolist()
    ([[5, 6, 7, 8, 9, 0, 0, 0]], [[0, 1, 2, 0, 1, 0, 1, 2]], [0, 3, 5, 8, 8])
    """
    device = batch.input_ids.device
    pad = size - batch.tokens
    ids = F.pad(batch.input_ids, (0, pad))
    positions = torch.cat([batch.position_ids, torch.arange(pad, device=device).unsqueeze(0)], 1)
    tail = torch.full((slots - batch.cu_seqlens.numel(),), size, dtype=torch.int32, device=device)
    return ids, positions, torch.cat([batch.cu_seqlens, tail])


class _Stack(torch.nn.Module):
    """The decoder layers as one callable with tensor-only arguments, as
    ``make_graphed_callables`` needs: one forward and one backward graph per bucket. (One graph
    pair per layer measured the same, run 7 in docs/benchmarks.md: capture costs running the step
    under capture, not the number of graphs.)"""

    def __init__(self, layers: torch.nn.ModuleList, max_len: int) -> None:
        super().__init__()
        self.layers = layers
        self.max_len = max_len

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=None,
                position_embeddings=(cos, sin),
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=self.max_len,
                max_length_k=self.max_len,
                use_cache=False,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class _Bucket:
    """The graphed stack of one bucket and the static tensors it reads (a step copies its
    cos/sin/cu into them, so the graph's own input copies find them in place)."""

    def __init__(self, stack: Any, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor):
        self.stack = stack
        self.cos, self.sin, self.cu = cos, sin, cu


class GraphedDecoder:
    """Runs a (PEFT-wrapped) Qwen2-style causal LM over packed batches with a graphed stack."""

    def __init__(self, model: torch.nn.Module, max_sequences: int) -> None:
        log.info("fused kernels: %s", fuse_kernels(model))
        inner: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
        self.backbone = inner.model
        self.lm_head = inner.lm_head
        self.slots = max_sequences + 2  # boundaries of the samples, the padding sequence, the end
        self.buckets: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds = 0.0

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """Logits at ``batch.logit_positions``, (A, vocab): what the eager model would give."""
        n = batch.cu_seqlens.numel() - 1
        size = bucket_of(batch.tokens)
        if (
            n + 2 > self.slots
            or size > MAX_GRAPH_TOKENS
            or (size not in self.buckets and len(self.buckets) >= MAX_GRAPHS)
        ):
            return self._eager(batch)
        ids, positions, cu = pad_batch(batch, size, self.slots)
        hidden = self.backbone.embed_tokens(ids)
        cos, sin = self.backbone.rotary_emb(hidden, positions)
        bucket = self.buckets.get(size) or self._capture(size, hidden, cos, sin, cu)
        bucket.cos.copy_(cos)
        bucket.sin.copy_(sin)
        bucket.cu.copy_(cu)
        hidden = bucket.stack(hidden, bucket.cos, bucket.sin, bucket.cu)
        hidden = self.backbone.norm(hidden)
        return self.lm_head(hidden[0, batch.logit_positions])

    def _eager(self, batch: PackedBatch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.model_inputs().items() if k != "logits_to_keep"}
        out = self.backbone(**inputs)
        return self.lm_head(out.last_hidden_state[0, batch.logit_positions])

    def _capture(
        self,
        size: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu: torch.Tensor,
    ) -> _Bucket:
        static = _Bucket(None, cos.clone(), sin.clone(), cu.clone())
        started = time.perf_counter()
        static.stack = torch.cuda.make_graphed_callables(
            _Stack(self.backbone.layers, size),
            (hidden.detach().clone(), static.cos, static.sin, static.cu),
            # Warm-up settles lazy initialisation (cuBLAS handles, workspaces) outside a capture:
            # needed once per job, not once per bucket (~0.3 s each).
            num_warmup_iters=0 if self.buckets else 2,
            pool=self.pool,
        )
        seconds = time.perf_counter() - started
        self.capture_seconds += seconds
        log.info(
            "captured CUDA graphs for %d-token steps in %.2f s (%.1f s in all)",
            size,
            seconds,
            self.capture_seconds,
        )
        self.buckets[size] = static
        return static
