"""The graphed training step's LoRA gradients equal the eager step's when several micro-batches of
one step replay the same bucket (pytorch/pytorch#181723: with ``param.grad = None`` before a
graphed backward, autograd adopts the graph's static gradient buffer and the next replay
overwrites it). CUDA graphs do not exist on the CPU: ``graph_stand_in`` reproduces their gradient
return; everything else is the recipe's own step (``GraphedDecoder.logits``, ``setup_masters``,
``accumulate_step``, ``optimizer_step``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner.config import parse_train_args
from runner.train import memory
from runner.train.graphs import GraphedDecoder
from runner.train.packing import pack_step
from runner.train.recipe import (
    TrainSpec,
    accumulate_step,
    optimizer_step,
    setup_masters,
    setup_model,
    setup_optimizer,
    setup_scheduler,
    trainable_parameters,
)
from tests.runner.graph_stand_in import GraphStandIn, make_graphed_stand_in
from tests.runner.train_helpers import eager_gradients, examples, synthetic

ARGS = ["lora_rank=8", "lora_target=all", "lr=1e-2", "bs=6", "grad_accum=1", "warmup_steps=0"]


def _relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)]


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # float32: the masters are the parameters. bfloat16: the GPU's mixed path (fp32 masters of
    # bf16 parameters). Both measured exactly equal on the CPU (torch 2.13); the tolerances leave
    # room for a different summation order, far below the aliasing bug's error (~1).
    [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)],
)
def test_micro_batches_replaying_one_bucket_give_the_eager_gradient(
    tiny_model_dir, tokenizer, dtype, tolerance
) -> None:
    config = parse_train_args(ARGS)
    spec = TrainSpec(config=config, examples=[], base=tiny_model_dir, device="cpu")
    model = setup_model(spec, torch.device("cpu"), dtype)
    with torch.no_grad():  # non-zero B: every adapter matrix gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    samples = examples(tokenizer, synthetic(2)[:6])
    batches = pack_step(samples, token_budget=3 * max(len(e.input_ids) for e in samples))
    graphed = GraphedDecoder(
        model, config.samples_per_step, fuse_layers=False, make_graphed=make_graphed_stand_in
    )
    graphed.plan([b.tokens for b in batches])
    assert len(batches) >= 2
    assert len({graphed.bucket(b.tokens) for b in batches}) == 1  # one bucket, replayed per batch

    named = trainable_parameters(model)
    params = [p for _, p in named]
    masters = setup_masters(named, graphed)
    assert masters.mixed == (dtype != torch.float32)
    optimizer = setup_optimizer(named, masters, config, torch.device("cpu"))
    scheduler = setup_scheduler(optimizer, config, total_steps=10)
    for step in range(2):  # the second step runs after the loop's zeroing
        want = eager_gradients(model, batches, params)
        accumulate_step(model, batches, graphed.logits, masters)
        got = [m.grad.float() for m in masters.masters]
        errors = _relative_errors(got, want)
        assert all(w.norm() > 0 for w in want)
        assert max(errors) < tolerance, (step, max(errors), sorted(errors)[len(errors) // 2])
        optimizer_step(masters, optimizer, scheduler, config.max_grad_norm)

    (graph,) = (bucket.stack for bucket in graphed.buckets.values())
    assert isinstance(graph, GraphStandIn) and graph.replays == 2 * len(batches)


def test_the_stand_in_reproduces_the_aliasing_it_guards_against(tiny_model_dir, tokenizer) -> None:
    """With the gradients set to None before the step (what the recipe did before), the same
    step gives 2 × the last micro-batch's gradient: the stand-in has the bug CUDA graphs have."""
    config = parse_train_args(ARGS)
    spec = TrainSpec(config=config, examples=[], base=tiny_model_dir, device="cpu")
    model = setup_model(spec, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    samples = examples(tokenizer, synthetic(2)[:6])
    batches = pack_step(samples, token_budget=3 * max(len(e.input_ids) for e in samples))
    graphed = GraphedDecoder(
        model, config.samples_per_step, fuse_layers=False, make_graphed=make_graphed_stand_in
    )
    graphed.plan([b.tokens for b in batches])
    params = [p for _, p in trainable_parameters(model)]
    want = eager_gradients(model, batches, params)
    last = eager_gradients(model, batches[-1:], params)
    answer_tokens = sum(int(b.targets.numel()) for b in batches)
    last = [g * batches[-1].targets.numel() / answer_tokens for g in last]  # its share of the step
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss = F.cross_entropy(graphed.logits(batch), batch.targets, reduction="sum")
        (loss / answer_tokens).backward()
    got = [p.grad for p in params]
    assert min(_relative_errors(got, want)) > 0.1  # wrong everywhere ...
    assert max(_relative_errors(got, [2 * g for g in last])) < 1e-5  # ... and exactly this way


def test_the_kept_gradients_cost_what_the_memory_estimate_counts(tiny_model_dir) -> None:
    """Between two graphed steps (bf16 weights, fp32 masters) the trainer holds, per trainable
    weight, exactly the bytes ``memory.TRAINER_BYTES_PER_TRAINABLE`` says."""
    config = parse_train_args(ARGS)
    spec = TrainSpec(config=config, examples=[], base=tiny_model_dir, device="cpu")
    model = setup_model(spec, torch.device("cpu"), torch.bfloat16)
    named = trainable_parameters(model)
    masters = setup_masters(named, graphed=object())  # any graphed decoder: grads kept
    optimizer = setup_optimizer(named, masters, config, torch.device("cpu"))
    scheduler = setup_scheduler(optimizer, config, total_steps=10)
    for _, p in named:
        p.grad.normal_()  # as a backward leaves them
    masters.grads_to_masters()
    optimizer_step(masters, optimizer, scheduler, config.max_grad_norm)
    trainable = sum(p.numel() for _, p in named)
    held = sum(p.grad.numel() * p.grad.element_size() for _, p in named)
    held += sum(m.grad.numel() * m.grad.element_size() for m in masters.masters)
    held += sum(m.numel() * m.element_size() for m in masters.masters)
    held += sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0  # the moments, not the step counters
    )
    assert held == trainable * memory.TRAINER_BYTES_PER_TRAINABLE
