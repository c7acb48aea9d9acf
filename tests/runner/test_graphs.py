"""The pieces of the CUDA-graphed training step that do not need a GPU: the fused forwards and the
padding to a bucket give the same logits and gradients as the plain model (fp32, CPU); when a job
trains without graphs, and why (the varlen attention kernel's torch release among the reasons)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from runner.config import parse_train_args
from runner.train import attention
from runner.train.graphs import bucket_of, fuse_kernels, pad_batch
from runner.train.packing import pack
from runner.train.recipe import TrainSpec, graphs_off_reason, setup_graphs, trainable_parameters
from tests.runner.train_helpers import examples, lora_model, synthetic


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs()).logits[0]
    loss = F.cross_entropy(logits, batch.targets)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model)}


def test_fused_forwards_give_the_plain_models_logits_and_gradients(
    tiny_model_dir, tokenizer
) -> None:
    batch = pack(examples(tokenizer, synthetic(1)[:4]))
    plain = lora_model(tiny_model_dir)
    fused = copy.deepcopy(plain)
    counts = fuse_kernels(fused)
    layers = plain.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "lora": 7 * layers}
    want_logits, want_grads = _loss_and_grads(plain, batch)
    got_logits, got_grads = _loss_and_grads(fused, batch)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 14 * layers
    for name, want in want_grads.items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_step_padded_to_its_bucket_gives_the_same_answer_logits(
    tiny_model_dir, tokenizer
) -> None:
    model = lora_model(tiny_model_dir)
    model.eval()
    batch = pack(examples(tokenizer, synthetic(1)[:3]))
    size = bucket_of(batch.tokens)
    assert size > batch.tokens  # there is padding to get wrong
    # Two spare boundary slots: a padding sequence and an empty one, as a short last step has.
    ids, positions, cu = pad_batch(batch, size, slots=batch.cu_seqlens.numel() + 2)
    assert cu.tolist()[-2:] == [size, size]
    with torch.no_grad():
        want = model(**batch.model_inputs()).logits[0]
        got = model(
            input_ids=ids,
            position_ids=positions,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=size,
            max_length_k=size,
            use_cache=False,
        ).logits[0, batch.logit_positions]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _spec(tiny_model_dir, *args: str, **kwargs) -> TrainSpec:
    return TrainSpec(
        config=parse_train_args(list(args)),
        examples=[],
        base=tiny_model_dir,
        cuda_graphs=kwargs.pop("cuda_graphs", True),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "device", "varlen", "reason"),
    [
        ((), {}, "cuda", True, None),
        ((), {"cuda_graphs": False}, "cuda", True, "turned off (RUNNER_CUDA_GRAPHS=false)"),
        ((), {}, "cpu", True, "need a GPU (training on cpu)"),
        (("method=full",), {}, "cuda", True, "apply to method=lora, not method=full"),
        (("method=qlora",), {}, "cuda", True, "apply to method=lora, not method=qlora"),
        ((), {"gradient_checkpointing": True}, "cuda", True, "with gradient checkpointing"),
        ((), {"compile_layers": True}, "cuda", True, "per-layer torch.compile"),
        ((), {}, "cuda", False, "no CUDA graphs, no fused layers"),
    ],
)
def test_why_a_job_trains_without_cuda_graphs(
    tiny_model_dir, args, kwargs, device, varlen, reason
) -> None:
    spec = _spec(tiny_model_dir, *args, **kwargs)
    got = graphs_off_reason(spec, torch.device(device), varlen_kernel=varlen)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_without_the_varlen_kernel_the_reason_names_the_torch_release(monkeypatch) -> None:
    monkeypatch.setattr(attention, "_varlen_attn", None)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", set())
    assert not attention.varlen_kernel_available()
    reason = attention.varlen_missing_reason()
    assert reason.startswith(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    assert "torch >= 2.11 has the kernel" in reason and "per-sample SDPA" in reason


def test_the_minimum_torch_agrees_with_the_installed_kernel() -> None:
    """The installed torch is past the minimum and its varlen_attn has the signature attend
    calls: the constant is not contradicted by the one torch at hand."""
    assert attention.torch_release(torch.__version__) >= attention.MIN_TORCH_VARLEN
    assert attention.torch_has_varlen_kernel()
    assert attention.torch_release("2.8.0+cu128") < attention.MIN_TORCH_VARLEN
    assert attention.torch_release("2.10.0a0+git1234") < attention.MIN_TORCH_VARLEN


def test_a_cpu_job_asked_for_graphs_trains_eagerly_and_says_why(tiny_model_dir, caplog) -> None:
    spec = _spec(tiny_model_dir)
    model = lora_model(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="runner.train.recipe"):
        assert setup_graphs(spec, model, torch.device("cpu")) is None
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs need a GPU (training on cpu): training eagerly"
    ]


def test_a_gpu_job_on_a_torch_without_the_varlen_kernel_warns_and_trains_eagerly(
    tiny_model_dir, caplog, monkeypatch
) -> None:
    """What the vllm-openai v0.11 image (torch 2.8) did: graphs would capture attention that reads
    cu_seqlens back to the host and fail at step 1; now the job is told and trains eagerly."""
    monkeypatch.setattr(attention, "_varlen_attn", None)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", set())
    model = lora_model(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="runner.train.recipe"):
        assert setup_graphs(_spec(tiny_model_dir), model, torch.device("cuda")) is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == attention.varlen_missing_reason() + ": training eagerly"
