"""The fused decoder layer of the graphed step (runner/train/graphs.py ``FusedLayer``) against
transformers' own layers, and the Triton kernels it uses against their PyTorch references (run by
Triton's interpreter on the CPU)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch

from runner.train import graphs, kernels
from runner.train.graphs import _Stack, fused_layers, pad_batch
from runner.train.packing import pack
from runner.train.recipe import trainable_parameters
from tests.runner.train_helpers import examples, lora_model, synthetic


def _stack_output_and_grads(model, stack_of, batch, weights):
    """The decoder stack's output over a padded packed batch, and every LoRA gradient of a
    weighted sum of it."""
    backbone = model.get_base_model().model
    size = batch.tokens + 5
    ids, positions, cu = pad_batch(batch, size, slots=batch.cu_seqlens.numel() + 2)
    model.zero_grad(set_to_none=True)
    hidden = backbone.embed_tokens(ids)
    cos, sin = backbone.rotary_emb(hidden, positions)
    out = stack_of(backbone, size)(hidden, cos, sin, cu)
    (out * weights[:size]).sum().backward()
    grads = {n: p.grad.clone() for n, p in trainable_parameters(model)}
    return out.detach(), grads


@pytest.mark.parametrize("kernel_build", ["pytorch", "triton-interpreted"])
def test_fused_layers_give_transformers_outputs_and_lora_gradients(
    tiny_model_dir, tokenizer, kernel_build, request, monkeypatch
):
    if kernel_build == "triton-interpreted":  # the Triton kernels themselves, on the CPU
        monkeypatch.setattr(graphs, "kernels", request.getfixturevalue("interpreted"))
    batch = pack(examples(tokenizer, synthetic(1)[:4]))
    plain = lora_model(tiny_model_dir)
    fused = copy.deepcopy(plain)
    layers = fused_layers(fused.get_base_model().model.layers)
    assert layers is not None and len(layers) == plain.config.num_hidden_layers
    hidden_size = plain.config.hidden_size
    weights = torch.randn(batch.tokens + 5, hidden_size, generator=torch.Generator().manual_seed(0))

    want, want_grads = _stack_output_and_grads(
        plain, lambda b, size: _Stack(b.layers, size), batch, weights
    )
    got, got_grads = _stack_output_and_grads(
        fused, lambda b, size: _Stack(b.layers, size, layers), batch, weights
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 14 * len(layers)
    for name, expected in want_grads.items():
        assert expected.abs().sum() > 0, name
        scale = float(expected.abs().max())
        torch.testing.assert_close(got_grads[name], expected, rtol=1e-4, atol=1e-4 * scale)


def test_fusing_keeps_the_modules_weights_as_views_and_the_model_unchanged(
    tiny_model_dir, tokenizer
):
    batch = pack(examples(tokenizer, synthetic(1)[:2]))
    model = lora_model(tiny_model_dir)
    model.eval()
    with torch.no_grad():
        before = model(**batch.model_inputs()).logits
    layers = fused_layers(model.get_base_model().model.layers)
    assert layers is not None
    attn = model.get_base_model().model.layers[0].self_attn
    q, k = attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight
    assert q.data_ptr() == layers[0].qkv.weight.data_ptr()  # no copy of the frozen weights
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    with torch.no_grad():
        after = model(**batch.model_inputs()).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_layers_that_cannot_be_fused_are_left_to_transformers(tiny_model_dir):
    model = lora_model(tiny_model_dir, "lora_dropout=0.1")
    layers = model.get_base_model().model.layers
    weight = layers[0].self_attn.q_proj.base_layer.weight
    ptr = weight.data_ptr()
    assert fused_layers(layers) is None
    assert weight.data_ptr() == ptr  # refused before any weight was touched


@pytest.fixture
def interpreted(monkeypatch):
    """A second copy of runner.train.kernels whose Triton kernels run in Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("kernels_interpreted", kernels.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.triton is not None, "Triton is a dev dependency"
        yield module
    finally:
        del sys.modules[spec.name]


def _grads(fn, inputs, seed):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=generator)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_qkv_rope_matches_its_reference(interpreted, dtype):
    tokens, heads, kv_heads, dim = 7, 4, 2, 16
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    angles = torch.randn(tokens, dim // 2, generator=generator)
    cos, sin = (
        torch.cat([angles.cos()] * 2, -1).to(dtype),
        torch.cat([angles.sin()] * 2, -1).to(dtype),
    )
    assert interpreted.triton_enabled(qkv)
    got, got_grads = _grads(lambda x: interpreted.qkv_rope(x, cos, sin, heads, kv_heads), [qkv], 2)
    want, want_grads = _grads(
        lambda x: interpreted.qkv_rope_reference(x, cos, sin, heads, kv_heads), [qkv], 2
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for g, w in zip(got + got_grads, want + want_grads, strict=True):
        assert g.is_contiguous() and g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_silu_mul_matches_its_reference(interpreted, dtype):
    gate_up = (torch.randn(5, 2 * 1100, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    assert interpreted.triton_enabled(gate_up)
    got, got_grads = _grads(interpreted.silu_mul, [gate_up], 4)
    want, want_grads = _grads(interpreted.silu_mul_reference, [gate_up], 4)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for g, w in zip(got + got_grads, want + want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)


def test_warm_up_runs_every_kernel_for_the_models_dimensions(interpreted, tiny_model_dir):
    mlp = lora_model(tiny_model_dir).get_base_model().model.layers[0].mlp
    gate_up = interpreted.LoRAGroup([mlp.gate_proj, mlp.up_proj])
    calls = []
    for name in ("_QKVRope", "_SiluMul", "_LoRASiluMul"):
        function = getattr(interpreted, name)
        original = function.forward

        def spy(ctx, *args, _original=original, _name=name):
            calls.append((_name, tuple(args[0].shape)))
            return _original(ctx, *args)

        function.forward = staticmethod(spy)
    seconds = interpreted.warm_up(4, 2, 16, gate_up, torch.device("cpu"))
    assert seconds > 0
    assert gate_up.fused_silu  # the tiny model's rank-8 pair: the adapters go inside SiLU·mul
    assert calls == [("_QKVRope", (2, 128)), ("_LoRASiluMul", (2, 128))]
    assert all(adapter.grad is None for adapter in gate_up.adapters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gate_up_adapters_inside_silu_mul_match_the_unfused_group(
    interpreted, tiny_model_dir, dtype
):
    mlp = lora_model(tiny_model_dir).to(dtype).get_base_model().model.layers[0].mlp
    gate_up = interpreted.LoRAGroup([mlp.gate_proj, mlp.up_proj])
    assert gate_up.fused_silu  # else both sides below would be the unfused path
    x = torch.randn(21, gate_up.weight.shape[1], generator=torch.Generator().manual_seed(5))
    x = x.to(dtype)
    params = list(gate_up.adapters)

    def run(fn):
        for p in params:
            p.grad = None
        inputs = x.clone().requires_grad_(True)
        out = fn(inputs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        (out.float() * weights).sum().backward()
        return [out.detach(), inputs.grad] + [p.grad.clone() for p in params]

    got = run(gate_up.silu_mul)  # the fused kernel (21 tokens: a partial row tile)
    want = run(lambda t: interpreted.silu_mul_reference(gate_up(t)))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for g, w in zip(got, want, strict=True):
        assert w.abs().sum() > 0
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale)
