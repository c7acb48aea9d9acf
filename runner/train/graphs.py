"""CUDA graphs over the decoder layers of a packed training step.

At the tutorial's 4 samples per optimizer step a step is ~1,000 tokens and a 7B LoRA step launches
~6,000 kernels: the GPU waits on the CPU. Capturing the decoder stack's forward and backward as CUDA
graphs (``torch.cuda.make_graphed_callables``) replays them with one launch each. Graphs need
fixed shapes, so a packed step is padded to a *bucket* with a trailing padding sequence of its
own: ``cu_seqlens`` keeps the real samples apart from it, causal attention keeps them from seeing
it, and the LM head never reads it, so the padded step computes the same loss and gradients as
the unpadded one. ``cu_seqlens`` has a fixed length too (unused slots repeat the end: empty
sequences). The buckets are planned before the first step from the sizes the schedule will run
(``plan_buckets``: captures against padding).

Inside the graphs each layer is a ``FusedLayer`` where the model allows it (q/k/v and gate/up as
one LoRA GEMM each, RoPE and SiLU·mul as Triton kernels: runner/train/kernels.py), else the
transformers layer. The embedding, final norm, LM head, loss and optimizer stay eager (a few dozen
launches). One graph pair is captured per bucket (~0.2 s each on a 7B); all share one memory
pool, which is safe because a step replays only its own bucket's graphs, forward then backward,
before the next. Only for LoRA on CUDA without gradient checkpointing, with torch's varlen
attention kernel (``recipe.graphs_off_reason``); anything else trains eagerly.

A graphed backward returns the graph's static gradient buffers (rewritten by every replay) as the
parameters' gradients; autograd adopts such a tensor as ``param.grad`` when that is None, so the
recipe keeps the gradients allocated and zeroes them in place (``recipe.MasterWeights``), and every
micro-batch's gradient is added into a tensor the graph does not own.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from runner.train import families, kernels
from runner.train.attention import attend
from runner.train.packing import PackedBatch
from runner.train.recipe import causal_lm

log = logging.getLogger(__name__)

MIN_BUCKET = 128
MAX_GRAPHS = 16  # distinct buckets captured per job; steps beyond run eagerly
# Longer steps are not launch-bound (a 16-sample step of ~4,000 tokens ran no faster graphed), and
# each bucket's capture costs ~0.5 s: they run eagerly.
MAX_GRAPH_TOKENS = 2048
FUSE_LAYERS = True  # graph ``FusedLayer``s where the layers allow (False: transformers' layers)


def bucket_of(tokens: int) -> int:
    """The padded length of a packed micro-batch: a multiple of 128, or of 1/8 of its power of two
    when longer (padding stays under ~12%).

    >>> [bucket_of(n) for n in (1, 128, 129, 1040, 2049, 5000)]
    [128, 128, 256, 1152, 2304, 5120]
    """
    step = max(MIN_BUCKET, 2 ** max(0, math.floor(math.log2(max(tokens, 1))) - 3))
    return -(-tokens // step) * step


# One capture costs about as much as this many padded tokens over the job's steps (7B on an H200:
# ~0.25 s per capture against ~0.06 ms per token of a step; docs/benchmarks.md run 9).
CAPTURE_TOKENS = 4000
ALIGN = 32  # planned buckets are multiples of this


def plan_buckets(sizes: Sequence[int], capture_tokens: int = CAPTURE_TOKENS) -> list[int]:
    """Bucket sizes for a job whose graphed micro-batches have ``sizes`` tokens (the schedule
    knows them all before the first step): the set that minimises captures × ``capture_tokens``
    plus the padding of every step, each step padded to the smallest bucket that holds it.

    >>> plan_buckets([1000, 1010, 1020, 1030])
    [1056]
    >>> plan_buckets([100] * 50 + [1000] * 50)
    [128, 1024]
    >>> plan_buckets([100, 1000], capture_tokens=10**6)
    [1024]
    """
    ordered = sorted(s for s in sizes if 0 < s <= MAX_GRAPH_TOKENS)
    if not ordered:
        return []
    rounded = [-(-s // ALIGN) * ALIGN for s in ordered]
    prefix = [0]
    for s in ordered:
        prefix.append(prefix[-1] + s)
    # A bucket covers a run of the sorted sizes; runs end only where the rounded size changes.
    ends = [i for i in range(1, len(ordered)) if rounded[i] != rounded[i - 1]] + [len(ordered)]
    best: dict[int, tuple[int, list[int]]] = {0: (0, [])}
    for end in ends:
        top = rounded[end - 1]
        best[end] = min(
            (
                cost + capture_tokens + top * (end - start) - (prefix[end] - prefix[start]),
                [*chosen, top],
            )
            for start, (cost, chosen) in best.items()
        )
    return best[len(ordered)][1][:MAX_GRAPHS]


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


class FusedLayer:
    """A Qwen2/Qwen3/Llama/Mistral decoder layer computed from its own modules' weights with the
    fused pieces of ``kernels``: q/k/v as one LoRA GEMM, (Qwen3: the per-head q/k RMSNorms,) RoPE
    and the v split in one kernel, o with the residual as its accumulator, gate/up as one GEMM,
    SiLU·mul (with the gate/up adapters' products) in one kernel, down with the residual. Sliding
    windows are the attention's (``attend``). The same maths as the transformers layer (held to it
    by the tests); an architecture with anything else is refused
    (``families.fused_layers_refusal``)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attn: Any = layer.self_attn
        mlp: Any = layer.mlp
        config = attn.config
        refusal = families.fused_layers_refusal(config)
        if refusal is not None:
            raise ValueError(refusal)
        members = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        members += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        for member in members:  # refuse before any weight is fused
            kernels.lora_adapter(member)
            kernels.base_linear(member)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        # Qwen2/Qwen3 layers hold their window (None on full-attention layers); Mistral's come
        # from the config.
        self.window = (
            attn.sliding_window
            if hasattr(attn, "sliding_window")
            else getattr(config, "sliding_window", None)
        )
        self.qk_norms = (
            (attn.q_norm, attn.k_norm)
            if config.model_type in families.QK_NORM_MODEL_TYPES
            else None
        )
        self.norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.qkv = kernels.LoRAGroup(members[:3])
        self.o = kernels.LoRAGroup(members[3:4])
        self.gate_up = kernels.LoRAGroup(members[4:6])
        self.down = kernels.LoRAGroup(members[6:])

    def __call__(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv(_rms(self.norms[0], hidden))
        if self.qk_norms is not None:
            qkv = self._norm_qk(qkv)
        q, k, v = kernels.qkv_rope(qkv, cos, sin, self.heads, self.kv_heads)
        out = attend(q, k, v, cu, max_len, self.scaling, window=self.window)
        hidden = self.o(out.reshape(tokens, -1), residual=hidden)
        return self.down(self.gate_up.silu_mul(_rms(self.norms[1], hidden)), residual=hidden)

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3's RMSNorm over each q and k head (before RoPE); v as it is."""
        assert self.qk_norms is not None
        heads = qkv.view(qkv.shape[0], -1, self.head_dim)
        q, k, v = heads.split([self.heads, self.kv_heads, self.kv_heads], 1)
        q, k = (_rms(norm, part) for norm, part in zip(self.qk_norms, (q, k), strict=True))
        return torch.cat((q, k, v), 1).view(qkv.shape)


def _rms(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)


def fused_layers(layers: torch.nn.ModuleList) -> list[FusedLayer] | None:
    """Every layer as a ``FusedLayer``, or None where one cannot be (the reason is logged)."""
    try:
        return [FusedLayer(layer) for layer in layers]
    except (AttributeError, ValueError) as exc:
        log.info("decoder layers not fused (%s): graphing transformers' layers", exc)
        return None


class _Stack(torch.nn.Module):
    """The decoder layers as one callable with tensor-only arguments, as
    ``make_graphed_callables`` needs: one forward and one backward graph per bucket. (One graph pair per layer measured the same, run 7 in
    docs/benchmarks.md: capture costs running the step under capture, not the number of
    graphs.)"""

    def __init__(
        self, layers: torch.nn.ModuleList, max_len: int, fused: list[FusedLayer] | None = None
    ) -> None:
        super().__init__()
        self.layers = layers
        self.max_len = max_len
        self.fused = fused

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor
    ) -> torch.Tensor:
        if self.fused is not None:
            flat = hidden[0]
            for fused in self.fused:
                flat = fused(flat, cos[0], sin[0], cu, self.max_len)
            return flat.unsqueeze(0)
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
    """Runs a (PEFT-wrapped) Qwen2-style causal LM over packed batches with a graphed stack.

    Its backward hands autograd the graph's static gradient buffers, so the trainable
    parameters' ``.grad`` must stay allocated across micro-batches (``recipe.setup_masters``).
    ``make_graphed`` captures one bucket's stack (default: ``torch.cuda.make_graphed_callables``
    with one memory pool for all buckets; tests pass a CPU stand-in of its gradient return)."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_sequences: int,
        *,
        fuse_layers: bool | None = None,
        make_graphed: Callable[..., Any] | None = None,
    ) -> None:
        log.info("fused kernels: %s", fuse_kernels(model))
        inner = causal_lm(model)
        self.backbone = inner.model
        self.lm_head = inner.lm_head
        fuse = FUSE_LAYERS if fuse_layers is None else fuse_layers
        self.fused = fused_layers(self.backbone.layers) if fuse else None
        if self.fused:
            first = self.fused[0]
            seconds = kernels.warm_up(
                first.heads,
                first.kv_heads,
                first.head_dim,
                first.gate_up,
                self.backbone.embed_tokens.weight.device,
            )
            log.info("fused kernels compiled or loaded in %.2f s", seconds)
        self.slots = max_sequences + 2  # boundaries of the samples, the padding sequence, the end
        self.buckets: dict[int, _Bucket] = {}
        self.planned: list[int] = []
        if make_graphed is None:
            make_graphed = functools.partial(
                torch.cuda.make_graphed_callables, pool=torch.cuda.graph_pool_handle()
            )
        self.make_graphed = make_graphed
        self.capture_seconds = 0.0

    def plan(self, sizes: Sequence[int]) -> list[int]:
        """Choose the buckets from the micro-batch sizes the job will run (``plan_buckets``);
        a step no planned bucket holds falls back to ``bucket_of``."""
        self.planned = plan_buckets(sizes)
        log.info("planned CUDA graph buckets: %s", self.planned)
        return self.planned

    def bucket(self, tokens: int) -> int:
        return next((b for b in self.planned if b >= tokens), None) or bucket_of(tokens)

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """Logits at ``batch.logit_positions``, (A, vocab): what the eager model would give."""
        n = batch.cu_seqlens.numel() - 1
        size = self.bucket(batch.tokens)
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
        hidden = self.backbone.norm(bucket.stack(hidden, bucket.cos, bucket.sin, bucket.cu))
        return self.lm_head(hidden[0, batch.logit_positions])

    def _eager(self, batch: PackedBatch) -> torch.Tensor:
        """A step no graph covers (over ``MAX_GRAPH_TOKENS``, too many samples, too many
        buckets), unpadded: the fused layers where there are some, else the transformers model."""
        if self.fused is None:
            inputs = {k: v for k, v in batch.model_inputs().items() if k != "logits_to_keep"}
            hidden = self.backbone(**inputs).last_hidden_state
        else:
            hidden = self.backbone.embed_tokens(batch.input_ids)
            cos, sin = self.backbone.rotary_emb(hidden, batch.position_ids)
            stack = _Stack(self.backbone.layers, batch.max_len, self.fused)
            hidden = self.backbone.norm(stack(hidden, cos, sin, batch.cu_seqlens))
        return self.lm_head(hidden[0, batch.logit_positions])

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
        static.stack = self.make_graphed(
            _Stack(self.backbone.layers, size, self.fused),
            (hidden.detach().clone(), static.cos, static.sin, static.cu),
            # Warm-up settles lazy initialisation (cuBLAS handles, workspaces, kernel loading)
            # outside a capture: needed once per job, not once per bucket.
            num_warmup_iters=0 if self.buckets else 1,
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
