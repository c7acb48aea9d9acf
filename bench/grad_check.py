"""How far each bf16 path's LoRA gradients are from a float32 reference, and the graphed path's
from the eager one, on the GPU.

    python3 bench/grad_check.py [--model 7b] [--samples-per-step 4] [--token-budget 16384]
    python3 bench/grad_check.py --samples-per-step 16 --token-budget 2048   # 3 micro-batches

One optimizer step of the reference job (random weights, adapters with non-zero B so every
gradient is live), through the recipe's own step functions (``setup_masters``,
``accumulate_step``): the gradients of the eager bf16 path and of the graphed path (fused layers,
Triton kernels, CUDA graphs) are each compared with the same step computed in float32 (attention
by PyTorch's SDPA, since FlashAttention has no float32), and the graphed one with the eager one.
Prints the step's micro-batch sizes and their buckets, then, per adapter matrix kind, the median
and worst relative error ‖g − g_ref‖ / ‖g_ref‖ over the model's matrices. The graphed path is as
accurate as eager bf16 when its errors are no larger; graphed against eager is bf16 noise
(≤ 0.02), not ~1.0, when several micro-batches replaying one bucket accumulate correctly
(pytorch/pytorch#181723; ``--grads-to-none`` reproduces the bug: the gradients set to None before
each graphed backward).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import JOB, SHAPES, make_examples, model_config

from runner.config import parse_train_args
from runner.train import attention
from runner.train.graphs import GraphedDecoder
from runner.train.packing import pack_step
from runner.train.recipe import (
    MasterWeights,
    TrainSpec,
    _step_loss,
    accumulate_step,
    setup_masters,
    setup_model,
    trainable_parameters,
)

Grads = dict[str, torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--samples-per-step", type=int, default=4)
    parser.add_argument("--token-budget", type=int, default=TrainSpec.token_budget)
    parser.add_argument(
        "--grads-to-none",
        action="store_true",
        help="set the model's gradients to None before each graphed step (the bug being checked)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda")
    examples = make_examples(args.samples_per_step, SHAPES[args.model]["vocab_size"])
    spec = TrainSpec(
        config=parse_train_args(list(JOB)),
        examples=examples,
        base=model_config(args.model),
        token_budget=args.token_budget,
    )
    model = setup_model(spec, device, torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=generator)
    batches = [b.to(device) for b in pack_step(examples, spec.token_budget)]
    named = trainable_parameters(model)
    model.train()

    def step(logits_of, masters: MasterWeights) -> tuple[Grads, float]:  # type: ignore[no-untyped-def]
        if args.grads_to_none and logits_of is not None:
            model.zero_grad(set_to_none=True)
        loss, _ = accumulate_step(model, batches, logits_of, masters)
        grads = {
            n: m.grad.float().clone() for (n, _), m in zip(named, masters.masters, strict=True)
        }
        masters.zero_grad()
        return grads, float(loss)

    eager, eager_loss = step(None, setup_masters(named, None))
    graphed = GraphedDecoder(model, args.samples_per_step)
    graphed.plan([b.tokens for b in batches])
    masters = setup_masters(named, graphed)
    step(graphed.logits, masters)  # captures the buckets' graphs
    replayed, replayed_loss = step(graphed.logits, masters)
    sizes = [b.tokens for b in batches]
    buckets = [
        graphed.bucket(s) if graphed.bucket(s) in graphed.buckets else "eager" for s in sizes
    ]
    del graphed, masters
    torch.cuda.empty_cache()
    model.float()
    attention._varlen_attn = None  # type: ignore[assignment]  # float32: SDPA per sample
    model.zero_grad(set_to_none=True)
    reference_loss = float(_step_loss(model, batches, None)[0])
    reference = {n: p.grad.clone() for n, p in named}

    print(f"micro-batches (tokens): {sizes}; CUDA graph buckets: {buckets}")
    print(
        f"loss: float32 {reference_loss:.6f}, eager bf16 {eager_loss:.6f}, "
        f"graphed bf16 {replayed_loss:.6f}"
    )
    print("| matrices | path | against | median relative error | worst relative error |")
    print("| --- | --- | --- | --- | --- |")
    rows = (
        ("eager bf16", eager, "float32", reference),
        ("graphed bf16 (fused)", replayed, "float32", reference),
        ("graphed bf16 (fused)", replayed, "eager bf16", eager),
    )
    for kind in ("lora_A", "lora_B"):
        for label, got, against, ref in rows:
            errors = [
                float((got[n] - r).norm() / r.norm())
                for n, r in ref.items()
                if kind in n and r.norm() > 0
            ]
            print(
                f"| {kind} ({len(errors)}) | {label} | {against} | "
                f"{statistics.median(errors):.4f} | {max(errors):.4f} |"
            )


if __name__ == "__main__":
    main()
