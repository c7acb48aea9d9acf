"""How far each bf16 path's LoRA gradients are from a float32 reference, on the GPU.

    python3 bench/grad_check.py [--model 7b] [--samples-per-step 4]

One optimizer step of the reference job (random weights, adapters with non-zero B so every
gradient is live): the gradients of the eager bf16 path and of the graphed path (fused layers,
Triton kernels, CUDA graphs) are each compared with the same step computed in float32 (attention
by PyTorch's SDPA, since FlashAttention has no float32). Prints, per adapter matrix kind, the median
and worst relative error ‖g − g_fp32‖ / ‖g_fp32‖ over the model's matrices. The graphed path is
as accurate as eager bf16 when its errors are no larger.
"""

from __future__ import annotations

import argparse
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
from runner.train.recipe import TrainSpec, _step_loss, setup_model, trainable_parameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--samples-per-step", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda")
    examples = make_examples(args.samples_per_step, SHAPES[args.model]["vocab_size"])
    spec = TrainSpec(
        config=parse_train_args(list(JOB)), examples=examples, base=model_config(args.model)
    )
    model = setup_model(spec, device, torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=generator)
    batches = [b.to(device) for b in pack_step(examples, spec.token_budget)]
    model.train()

    def grads(logits_of) -> tuple[dict[str, torch.Tensor], float]:  # type: ignore[no-untyped-def]
        model.zero_grad(set_to_none=True)
        loss, _ = _step_loss(model, batches, logits_of)
        return {n: p.grad.float().clone() for n, p in trainable_parameters(model)}, float(loss)

    eager, eager_loss = grads(None)
    graphed = GraphedDecoder(model, args.samples_per_step)
    graphed.plan([b.tokens for b in batches])
    grads(graphed.logits)  # captures the bucket's graphs
    replayed, replayed_loss = grads(graphed.logits)
    del graphed
    torch.cuda.empty_cache()
    model.float()
    attention._varlen_attn = None  # type: ignore[assignment]  # float32: SDPA per sample
    reference, reference_loss = grads(None)

    print(
        f"loss: float32 {reference_loss:.6f}, eager bf16 {eager_loss:.6f}, "
        f"graphed bf16 {replayed_loss:.6f}"
    )
    print("| matrices | path | median relative error | worst relative error |")
    print("| --- | --- | --- | --- |")
    for kind in ("lora_A", "lora_B"):
        for label, got in (("eager bf16", eager), ("graphed bf16 (fused)", replayed)):
            errors = [
                float((got[n] - ref).norm() / ref.norm())
                for n, ref in reference.items()
                if kind in n and ref.norm() > 0
            ]
            print(
                f"| {kind} ({len(errors)}) | {label} | {statistics.median(errors):.4f} | "
                f"{max(errors):.4f} |"
            )


if __name__ == "__main__":
    main()
