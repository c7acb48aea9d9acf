"""Attention over packed sequences, registered with transformers as ``packed_varlen``.

Qwen2 passes ``cu_seq_lens_q`` / ``max_length_q`` through to the attention function and builds no
dense mask for an implementation transformers does not know, so a packed step costs no T×T mask.
On CUDA the FlashAttention kernel inside torch (``torch.nn.attention.varlen``) runs it; elsewhere
each sample is attended on its own with causal SDPA (the same result, slower, fine for CPU tests).
Without ``cu_seq_lens_q`` (generation, plain batches) it defers to transformers' SDPA.

Sliding-window layers (Mistral with ``sliding_window`` set, Gemma 3's local layers) pass their
window: a query attends to the last ``window`` positions of its own sequence, itself included, as
transformers' ``sliding_window_overlay`` masks them. Logit soft-capping (Gemma 2) is not supported:
such a layer raises ``PackedAttentionUnsupported`` instead of computing something else.
"""

from __future__ import annotations

import inspect
import itertools
import re
from typing import Any

import torch
import torch.nn.functional as F

NAME = "packed_varlen"

# The first torch release whose ``varlen_attn`` takes ``scale`` and ``window_size``: torch 2.10's
# took ``is_causal`` instead (TRAINING-SPEED.md); ``window_size`` replaced it in
# pytorch/pytorch#172238 and #172245 (merged 2026-01-21); torch 2.11 has it (the H200 image's
# torch, where the graphed step was measured) and so has 2.13 (installed here). The signature is
# still checked at import, not assumed from the version.
MIN_TORCH_VARLEN = (2, 11)

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
    if not {"window_size", "scale"} <= _VARLEN_PARAMS:
        _varlen_attn = None  # type: ignore[assignment]
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None  # type: ignore[assignment]
    _VARLEN_PARAMS = set()


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string.

    >>> torch_release("2.13.0+cpu"), torch_release("2.8.0a0+5228986c39.nv25.05")
    ((2, 13), (2, 8))
    """
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())  # type: ignore[union-attr]


def torch_has_varlen_kernel() -> bool:
    """Whether this torch's ``varlen_attn`` has the signature ``attend`` calls (no GPU needed:
    the Dockerfile checks it at build time)."""
    return _varlen_attn is not None


def varlen_kernel_available() -> bool:
    """Whether packed attention runs torch's varlen FlashAttention kernel: CUDA and a torch whose
    ``varlen_attn`` has the signature ``attend`` calls. Without it ``attend`` reads ``cu_seqlens``
    back to the host (per-sample SDPA), which CUDA graph capture forbids."""
    return torch_has_varlen_kernel() and torch.cuda.is_available()


def varlen_missing_reason() -> str:
    """What to log when a GPU step cannot use the varlen kernel."""
    if _varlen_attn is not None:
        have = "has the varlen kernel but no CUDA device"
    elif _VARLEN_PARAMS:
        have = "has torch.nn.attention.varlen.varlen_attn without scale/window_size"
    else:
        have = "has no torch.nn.attention.varlen"
    want = ".".join(map(str, MIN_TORCH_VARLEN))
    return (
        f"torch {torch.__version__} {have} (torch >= {want} has the kernel): packed attention "
        "runs per-sample SDPA, so the step trains eagerly (no CUDA graphs, no fused layers)"
    )


class PackedAttentionUnsupported(ValueError):
    """An attention feature packed attention does not compute (the message names it)."""


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed sequence per forward")
    if kwargs.get("softcap") is not None:
        raise PackedAttentionUnsupported(
            f"attention logit soft-capping (softcap={kwargs['softcap']}) is not supported by "
            "packed training attention"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, head_dim)
    window = kwargs.get("sliding_window")
    out = attend(q, k, v, cu_seqlens, int(kwargs["max_length_q"]), scaling, window=window)
    return out.unsqueeze(0), None  # (1, T, heads, head_dim), as transformers expects


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scaling: float | None,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence; q/k/v are (T, heads, head_dim). ``window``:
    each query sees only the last ``window`` positions up to itself (None: all of them)."""
    if window is not None and window >= max_len:
        window = None  # no sequence is longer than the window: plain causal attention
    if q.is_cuda and _varlen_attn is not None:
        extra: dict[str, Any] = {"enable_gqa": True} if "enable_gqa" in _VARLEN_PARAMS else {}
        out = _varlen_attn(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_len,
            max_len,
            scale=scaling,
            window_size=(-1 if window is None else window - 1, 0),
            **extra,
        )
    else:
        out = _per_sample_sdpa(q, k, v, cu_seqlens, scaling, window)
    assert isinstance(out, torch.Tensor)
    return out


def _per_sample_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scaling: float | None,
    window: int | None = None,
) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = None
        if window is not None and end - start > window:
            at = torch.arange(end - start, device=q.device)
            distance = at[:, None] - at[None, :]  # query minus key position
            mask = (distance >= 0) & (distance < window)
        out = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=ks.shape[1] != qs.shape[1],
        )
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces, dim=0)


def register() -> str:
    """Register the implementation with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
