"""Fused pieces of a LoRA decoder layer for the graphed training step (runner/train/graphs.py).

A 7B step at the tutorial's 4 samples is ~1,000 tokens: too few for the GEMMs to hide the ~25
small elementwise kernels per layer that RoPE, SiLU·mul and the LoRA sums cost in eager PyTorch,
nor the extra passes over the layer's activations they make. Three functions replace them:

- ``LoRAGroup``: one GEMM for several projections that read the same input (q/k/v, gate/up)
  plus their rank-r adapters; the adapter product is added in place into the projection's output
  columns, the residual is the GEMM's accumulator (o/down), and the backward adds the adapters'
  input gradient into the base one in place (``addmm_``) instead of summing separate tensors.
- ``qkv_rope``: rotary embedding of q and k and the split of v out of the fused projection, one
  kernel forward and one backward (Triton on CUDA).
- ``silu_mul``: ``silu(gate) * up`` from the fused gate/up output, one kernel each way (Triton).

The maths is transformers' own (RoPE with ``rotate_half``, SiLU); Triton kernels compute in fp32
and round once, so bf16 results can differ from eager PyTorch in the last bit. Without Triton or
off CUDA the same functions run as plain PyTorch (the reference the tests hold the kernels to;
``TRITON_INTERPRET=1`` runs the kernels themselves on the CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs have no Triton
    triton = None


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``tensor``: on CUDA when Triton is installed, or on the
    CPU under Triton's interpreter (tests)."""
    if triton is None:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def warm_up(
    heads: int, kv_heads: int, head_dim: int, gate_up: LoRAGroup, device: torch.device
) -> float:
    """Compile (or load from Triton's disk cache) the kernels for a model of these dimensions, so
    that no compilation lands inside a training step or a CUDA graph capture; returns seconds.
    Triton specialises a kernel on its integer arguments, so the real dimensions are used."""
    if not triton_enabled(torch.empty(0, device=device)):
        return 0.0
    started = time.perf_counter()
    dtype = gate_up.weight.dtype
    tokens = 2
    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    x = torch.zeros(tokens, gate_up.weight.shape[1], device=device, dtype=dtype)
    for t in (qkv, x):
        t.requires_grad_(True)
    cos = torch.ones(tokens, head_dim, device=device, dtype=dtype)
    outs = [*qkv_rope(qkv, cos, torch.zeros_like(cos), heads, kv_heads)]
    outs.append(gate_up.silu_mul(x))  # whichever SiLU·mul kernel the layers will run
    torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    for adapter in gate_up.adapters:  # the warm-up's gradients are not the job's
        adapter.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


# --- LoRA projections -------------------------------------------------------------------------


class _LoRALinear(torch.autograd.Function):
    """``out = x Wᵀ + b (+ residual)``; then for each adapter ``i`` its columns
    ``out[:, cols_i] += s_i · (x A_iᵀ) B_iᵀ``. W and b are frozen; A and B get gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: tuple[tuple[int, int, float], ...],
        *adapters: torch.Tensor,
    ) -> torch.Tensor:
        n = len(layout)
        a, b = adapters[:n], adapters[n:]
        flat = x.reshape(-1, x.shape[-1])
        if residual is not None:
            out = torch.addmm(residual.reshape(-1, weight.shape[0]), flat, weight.t())
            if bias is not None:
                out.add_(bias)
        else:
            out = F.linear(flat, weight, bias)
        a_all = a[0] if n == 1 else torch.cat(a)
        low = flat @ a_all.t()
        r0 = 0
        for (col, width, scale), a_i, b_i in zip(layout, a, b, strict=True):
            r = a_i.shape[0]
            out[:, col : col + width].addmm_(low[:, r0 : r0 + r], b_i.t(), alpha=scale)
            r0 += r
        ctx.layout = layout
        ctx.has_residual = residual is not None
        ctx.x_shape = x.shape
        ctx.save_for_backward(flat, low, weight, a_all, *b)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, low, weight, a_all, *b = ctx.saved_tensors
        d = grad.reshape(-1, weight.shape[0])
        d_x, d_a, d_b = _lora_grads(d, flat, low, weight, a_all, b, ctx.layout)
        d_residual = grad if ctx.has_residual else None
        return (d_x.view(ctx.x_shape), d_residual, None, None, None, *d_a, *d_b)


def _lora_grads(
    d: torch.Tensor,
    flat: torch.Tensor,
    low: torch.Tensor,
    weight: torch.Tensor,
    a_all: torch.Tensor,
    b: Sequence[torch.Tensor],
    layout: tuple[tuple[int, int, float], ...],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Input and adapter gradients of ``out = x Wᵀ + Σ s_i (x A_iᵀ) B_iᵀ`` given ``d`` = dL/dout:
    the adapters' share of the input gradient is added into the base one in place."""
    pieces, d_b = [], []
    r0 = 0
    for (col, width, scale), b_i in zip(layout, b, strict=True):
        r = b_i.shape[1]
        d_out_i = d[:, col : col + width]
        pieces.append(torch.mm(d_out_i, b_i).mul_(scale))
        d_b.append(torch.mm(d_out_i.t(), low[:, r0 : r0 + r]).mul_(scale))
        r0 += r
    d_low = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
    d_x = torch.mm(d, weight).addmm_(d_low, a_all)
    d_a_all = torch.mm(d_low.t(), flat)
    d_a = list(d_a_all.split([b_i.shape[1] for b_i in b])) if len(b) > 1 else [d_a_all]
    return d_x, d_a, d_b


class _LoRASiluMul(torch.autograd.Function):
    """``silu(gate) * up`` of a fused gate/up LoRA pair whose adapters have one rank: the
    adapters' products are added inside the SiLU·mul kernel (saving a read and a write of both
    (T, I) outputs per layer) and recomputed by its backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        layout: tuple[tuple[int, int, float], ...],
        a_gate: torch.Tensor,
        a_up: torch.Tensor,
        b_gate: torch.Tensor,
        b_up: torch.Tensor,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        base = flat @ weight.t()
        a_all = torch.cat((a_gate, a_up))
        low = flat @ a_all.t()
        tokens, width = base.shape[0], base.shape[1] // 2
        out = base.new_empty(tokens, width)
        rank = a_gate.shape[0]
        grid = (triton.cdiv(tokens, _LORA_ROWS), triton.cdiv(width, _LORA_BLOCK))
        scales = (layout[0][2], layout[1][2])
        _lora_silu_mul_fwd[grid](
            base, low, b_gate, b_up, out, tokens, width, *scales, rank, _LORA_ROWS, _LORA_BLOCK
        )
        ctx.layout = layout
        ctx.x_shape = x.shape
        ctx.save_for_backward(flat, base, low, weight, a_all, b_gate, b_up)
        return out.view(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, base, low, weight, a_all, b_gate, b_up = ctx.saved_tensors
        tokens, width = base.shape[0], base.shape[1] // 2
        d_out = d_out.reshape(tokens, width).contiguous()
        d_base = torch.empty_like(base)
        grid = (triton.cdiv(tokens, _LORA_ROWS), triton.cdiv(width, _LORA_BLOCK))
        scales = (ctx.layout[0][2], ctx.layout[1][2])
        _lora_silu_mul_bwd[grid](
            d_out,
            base,
            low,
            b_gate,
            b_up,
            d_base,
            tokens,
            width,
            *scales,
            b_gate.shape[1],
            _LORA_ROWS,
            _LORA_BLOCK,
        )
        d_x, d_a, d_b = _lora_grads(d_base, flat, low, weight, a_all, (b_gate, b_up), ctx.layout)
        return (d_x.view(ctx.x_shape), None, None, *d_a, *d_b)


_LORA_ROWS, _LORA_BLOCK = 16, 128


class LoRAGroup:
    """Projections that read the same input, fused: the base weights concatenated (the modules'
    own weights become views of the fused one, so no memory is duplicated) and the adapters of
    the members that have one."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        bases = [base_linear(m) for m in members]
        biases = [base.bias for base in bases]
        if any(bias is None for bias in biases) and not all(bias is None for bias in biases):
            raise ValueError("fused projections must all have a bias or none")
        with torch.no_grad():
            self.weight = _fuse([base.weight for base in bases])
            self.bias = None if biases[0] is None else _fuse(biases)  # type: ignore[arg-type]
        layout, a, b = [], [], []
        col = 0
        for member, base in zip(members, bases, strict=True):
            adapter = lora_adapter(member)
            if adapter is not None:
                a_i, b_i, scale = adapter
                layout.append((col, base.out_features, scale))
                a.append(a_i)
                b.append(b_i)
            col += base.out_features
        self.layout = tuple(layout)
        self.adapters = (*a, *b)
        ranks = {a_i.shape[0] for a_i in a}
        rank = ranks.pop() if len(ranks) == 1 else 0
        # The adapters can go inside the SiLU·mul kernel: a gate/up pair, both adapted, one
        # power-of-2 rank up to 64 (the kernel unrolls it), no bias.
        self.fused_silu = (
            len(members) == 2
            and len(layout) == 2
            and self.bias is None
            and triton_enabled(self.weight)
            and 0 < rank <= 64
            and rank & (rank - 1) == 0
        )

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a gate/up group: the adapters added inside one Triton kernel
        where ``fused_silu``, else the group's output through ``silu_mul``."""
        if self.fused_silu:
            return _LoRASiluMul.apply(x, self.weight, self.layout, *self.adapters)  # type: ignore[no-any-return]
        return silu_mul(self(x))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.layout:
            out = F.linear(x, self.weight, self.bias)
            return out if residual is None else out + residual
        return _LoRALinear.apply(x, residual, self.weight, self.bias, self.layout, *self.adapters)  # type: ignore[no-any-return]


def base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    base = getattr(module, "base_layer", module)
    if type(base) is not torch.nn.Linear:
        raise ValueError(f"not a plain linear layer: {type(base).__name__}")
    return base


def lora_adapter(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, scale)`` of a PEFT LoRA linear's one active vanilla adapter; None for a plain
    linear. Anything else (DoRA, dropout, several adapters, merged) is refused."""
    if not hasattr(module, "lora_A"):
        return None
    names = list(module.active_adapters)  # type: ignore[arg-type]
    if len(names) != 1 or module.disable_adapters or module.merged:
        raise ValueError("fused LoRA needs exactly one active, unmerged adapter")
    name = names[0]
    if name in getattr(module, "lora_variant", {}) or not isinstance(
        module.lora_dropout[name],  # type: ignore[index]
        torch.nn.Identity,
    ):
        raise ValueError("fused LoRA supports vanilla adapters without dropout")
    lora_a: Any = module.lora_A[name]  # type: ignore[index]
    lora_b: Any = module.lora_B[name]  # type: ignore[index]
    if lora_a.bias is not None or lora_b.bias is not None:
        raise ValueError("fused LoRA supports adapters without bias")
    return lora_a.weight, lora_b.weight, float(module.scaling[name])  # type: ignore[index]


def _fuse(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor holding ``tensors`` end to end along dim 0; each original parameter's data
    becomes its view into it."""
    if len(tensors) == 1:
        return tensors[0]
    fused = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = fused[start : start + t.shape[0]]
        start += t.shape[0]
    return fused


# --- RoPE on the fused q/k/v ------------------------------------------------------------------


def qkv_rope(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (rotated) and v, each (T, heads, head_dim) and contiguous, from the fused projection
    ``qkv`` (T, (heads + 2·kv_heads)·head_dim); ``cos``/``sin`` are (T, head_dim) as transformers'
    rotary embedding gives them."""
    dim = cos.shape[-1]
    if triton_enabled(qkv) and dim >= 4 and dim & (dim - 1) == 0:  # Triton ranges: powers of 2
        return _QKVRope.apply(qkv, cos, sin, heads, kv_heads)  # type: ignore[no-any-return]
    return qkv_rope_reference(qkv, cos, sin, heads, kv_heads)


def qkv_rope_reference(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = qkv.shape[0]
    dim = cos.shape[-1]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k, v = (
        q.view(tokens, heads, dim),
        k.view(tokens, kv_heads, dim),
        v.view(tokens, kv_heads, dim),
    )
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * c + _rotate_half(q) * s), (k * c + _rotate_half(k) * s), v.contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


class _QKVRope(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int,
        kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, width = qkv.shape
        dim = cos.shape[-1]
        assert width == (heads + 2 * kv_heads) * dim and qkv.stride(1) == 1
        cos, sin = cos.contiguous(), sin.contiguous()
        q = qkv.new_empty(tokens, heads, dim)
        k = qkv.new_empty(tokens, kv_heads, dim)
        v = qkv.new_empty(tokens, kv_heads, dim)
        grid = (tokens, heads + 2 * kv_heads)
        _rope_fwd[grid](qkv, cos, sin, q, k, v, qkv.stride(0), heads, kv_heads, dim)
        ctx.save_for_backward(cos, sin)
        ctx.shape = (tokens, width, heads, kv_heads)
        return q, k, v

    @staticmethod
    def backward(
        ctx: Any, d_q: torch.Tensor, d_k: torch.Tensor, d_v: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        tokens, width, heads, kv_heads = ctx.shape
        dim = cos.shape[-1]
        d_q, d_k, d_v = (
            torch.zeros(tokens, h, dim, dtype=cos.dtype, device=cos.device)
            if g is None
            else g.contiguous()
            for g, h in ((d_q, heads), (d_k, kv_heads), (d_v, kv_heads))
        )
        d_qkv = d_q.new_empty(tokens, width)
        grid = (tokens, heads + 2 * kv_heads)
        _rope_bwd[grid](d_q, d_k, d_v, cos, sin, d_qkv, width, heads, kv_heads, dim)
        return d_qkv, None, None, None, None


# --- SiLU · mul -------------------------------------------------------------------------------


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` is (T, 2·I): gate in the first I columns."""
    if triton_enabled(gate_up):
        return _SiluMul.apply(gate_up)  # type: ignore[no-any-return]
    return silu_mul_reference(gate_up)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


_SILU_BLOCK = 1024


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tokens, width = gate_up.shape
        assert gate_up.is_contiguous()
        out = gate_up.new_empty(tokens, width // 2)
        grid = (tokens, triton.cdiv(width // 2, _SILU_BLOCK))
        _silu_mul_fwd[grid](gate_up, out, width // 2, _SILU_BLOCK)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        tokens, width = gate_up.shape
        d_out = d_out.contiguous()
        d_gate_up = torch.empty_like(gate_up)
        grid = (tokens, triton.cdiv(width // 2, _SILU_BLOCK))
        _silu_mul_bwd[grid](d_out, gate_up, d_gate_up, width // 2, _SILU_BLOCK)
        return d_gate_up


if triton is not None:

    @triton.jit
    def _rope_fwd(qkv, cos, sin, q, k, v, row_stride, HEADS, KV_HEADS, DIM: tl.constexpr):  # type: ignore[no-untyped-def]
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        half = tl.arange(0, DIM // 2)
        src = qkv + t * row_stride + h * DIM
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + DIM // 2 + half).to(tl.float32)
        if h < HEADS + KV_HEADS:
            c1 = tl.load(cos + t * DIM + half).to(tl.float32)
            c2 = tl.load(cos + t * DIM + DIM // 2 + half).to(tl.float32)
            s1 = tl.load(sin + t * DIM + half).to(tl.float32)
            s2 = tl.load(sin + t * DIM + DIM // 2 + half).to(tl.float32)
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
            if h < HEADS:  # noqa: SIM108 - Triton branches on a runtime scalar
                dst = q + (t * HEADS + h) * DIM
            else:
                dst = k + (t * KV_HEADS + h - HEADS) * DIM
        else:
            o1 = x1
            o2 = x2
            dst = v + (t * KV_HEADS + h - HEADS - KV_HEADS) * DIM
        tl.store(dst + half, o1.to(dst.dtype.element_ty))
        tl.store(dst + DIM // 2 + half, o2.to(dst.dtype.element_ty))

    @triton.jit
    def _rope_bwd(d_q, d_k, d_v, cos, sin, d_qkv, row_stride, HEADS, KV_HEADS, DIM: tl.constexpr):  # type: ignore[no-untyped-def]
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        half = tl.arange(0, DIM // 2)
        if h < HEADS + KV_HEADS:
            if h < HEADS:
                src = d_q + (t * HEADS + h) * DIM
            else:
                src = d_k + (t * KV_HEADS + h - HEADS) * DIM
            g1 = tl.load(src + half).to(tl.float32)
            g2 = tl.load(src + DIM // 2 + half).to(tl.float32)
            c1 = tl.load(cos + t * DIM + half).to(tl.float32)
            c2 = tl.load(cos + t * DIM + DIM // 2 + half).to(tl.float32)
            s1 = tl.load(sin + t * DIM + half).to(tl.float32)
            s2 = tl.load(sin + t * DIM + DIM // 2 + half).to(tl.float32)
            o1 = g1 * c1 + g2 * s2
            o2 = g2 * c2 - g1 * s1
        else:
            src = d_v + (t * KV_HEADS + h - HEADS - KV_HEADS) * DIM
            o1 = tl.load(src + half).to(tl.float32)
            o2 = tl.load(src + DIM // 2 + half).to(tl.float32)
        dst = d_qkv + t * row_stride + h * DIM
        tl.store(dst + half, o1.to(d_qkv.dtype.element_ty))
        tl.store(dst + DIM // 2 + half, o2.to(d_qkv.dtype.element_ty))

    @triton.jit
    def _silu_mul_fwd(gate_up, out, width, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(gate_up + row * 2 * width + cols, mask=mask).to(tl.float32)
        up = tl.load(gate_up + row * 2 * width + width + cols, mask=mask).to(tl.float32)
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + row * width + cols, h.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _lora_gate_up(  # type: ignore[no-untyped-def]
        base,
        low,
        b_gate,
        b_up,
        rows,
        cols,
        tokens,
        width,
        scale_gate,
        scale_up,
        RANK: tl.constexpr,
    ):
        """A (ROWS, BLOCK) tile of gate and up: the base GEMM's output plus each adapter's
        rank-RANK product, in fp32."""
        row_ok = rows < tokens
        col_ok = cols < width
        mask = row_ok[:, None] & col_ok[None, :]
        at = rows[:, None] * 2 * width + cols[None, :]
        gate = tl.load(base + at, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(base + at + width, mask=mask, other=0.0).to(tl.float32)
        for r in tl.static_range(RANK):
            low_g = tl.load(low + rows * 2 * RANK + r, mask=row_ok, other=0.0).to(tl.float32)
            low_u = tl.load(low + rows * 2 * RANK + RANK + r, mask=row_ok, other=0.0).to(tl.float32)
            b_g = tl.load(b_gate + cols * RANK + r, mask=col_ok, other=0.0).to(tl.float32)
            b_u = tl.load(b_up + cols * RANK + r, mask=col_ok, other=0.0).to(tl.float32)
            gate += scale_gate * low_g[:, None] * b_g[None, :]
            up += scale_up * low_u[:, None] * b_u[None, :]
        return gate, up, mask

    @triton.jit(do_not_specialize=["tokens"])
    def _lora_silu_mul_fwd(  # type: ignore[no-untyped-def]
        base,
        low,
        b_gate,
        b_up,
        out,
        tokens,
        width,
        scale_gate,
        scale_up,
        RANK: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        gate, up, mask = _lora_gate_up(
            base, low, b_gate, b_up, rows, cols, tokens, width, scale_gate, scale_up, RANK
        )
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + rows[:, None] * width + cols[None, :], h.to(out.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["tokens"])
    def _lora_silu_mul_bwd(  # type: ignore[no-untyped-def]
        d_out,
        base,
        low,
        b_gate,
        b_up,
        d_base,
        tokens,
        width,
        scale_gate,
        scale_up,
        RANK: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        gate, up, mask = _lora_gate_up(
            base, low, b_gate, b_up, rows, cols, tokens, width, scale_gate, scale_up, RANK
        )
        d = tl.load(d_out + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)
        d = d.to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        d_up = d * gate * sig
        d_gate = d * up * sig * (1.0 + gate * (1.0 - sig))
        at = rows[:, None] * 2 * width + cols[None, :]
        dtype = d_base.dtype.element_ty
        tl.store(d_base + at, d_gate.to(dtype), mask=mask)
        tl.store(d_base + at + width, d_up.to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_bwd(d_out, gate_up, d_gate_up, width, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(gate_up + row * 2 * width + cols, mask=mask).to(tl.float32)
        up = tl.load(gate_up + row * 2 * width + width + cols, mask=mask).to(tl.float32)
        d = tl.load(d_out + row * width + cols, mask=mask).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        d_up = d * gate * sig
        d_gate = d * up * sig * (1.0 + gate * (1.0 - sig))
        dtype = d_gate_up.dtype.element_ty
        tl.store(d_gate_up + row * 2 * width + cols, d_gate.to(dtype), mask=mask)
        tl.store(d_gate_up + row * 2 * width + width + cols, d_up.to(dtype), mask=mask)
