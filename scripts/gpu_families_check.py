"""On a GPU host: every family the support matrix calls fused through the real fast path — fused
Triton kernels, the decoder layers captured as CUDA graphs by ``torch.cuda.make_graphed_callables``
— against transformers' eager gradients of the same LoRA step (tests/runner/test_families.py runs
the same comparison on CPU with a stand-in for the graphs), bf16 against float32; then a
short graphed training run per family whose loss must fall.

    python3 scripts/gpu_families_check.py OUTDIR     (service wheels on PYTHONPATH)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from core.protocol import render_training_example
from runner.config import parse_train_args
from runner.models import SUPPORT_MATRIX, load_tokenizer
from runner.tiny_model import build_tiny_family_model
from runner.train.graphs import GraphedDecoder
from runner.train.packing import pack_step
from runner.train.recipe import (
    TrainSpec,
    accumulate_step,
    setup_masters,
    train,
    trainable_parameters,
)
from tests.runner.train_helpers import (
    eager_gradients,
    examples,
    lora_model,
    perturb_norms,
    synthetic,
)


def gradient_errors(model_dir: Path) -> dict:
    """The bf16 graphed step's LoRA gradients, and transformers' eager bf16 ones on the same GPU,
    each against the eager float32 gradients on the CPU (the packed attention on a GPU is flash
    attention, bf16 only): the fast path should be as close to float32 as eager bf16 is."""
    model = lora_model(model_dir, device="cuda", dtype=torch.bfloat16)
    perturb_norms(model)
    model.train()
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tokenizer = load_tokenizer(model_dir)
    samples = examples(tokenizer, synthetic(2)[:6])
    batches = pack_step(samples, token_budget=3 * max(len(e.input_ids) for e in samples))

    def eager(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
        reference = lora_model(model_dir, device=device, dtype=dtype)
        reference.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        reference.train()
        params = [p for _, p in trainable_parameters(reference)]
        return [
            g.cpu() for g in eager_gradients(reference, [b.to(device) for b in batches], params)
        ]

    truth = eager("cpu", torch.float32)
    eager_bf16 = eager("cuda", torch.bfloat16)
    graphed = GraphedDecoder(model, 6)
    assert graphed.fused is not None, "not fused"
    on_gpu = [b.to("cuda") for b in batches]
    graphed.plan([b.tokens for b in on_gpu])
    masters = setup_masters(trainable_parameters(model), graphed)
    accumulate_step(model, on_gpu, graphed.logits, masters)

    def worst(got: list[torch.Tensor]) -> float:
        return max(
            float((g.float() - w).norm() / w.norm()) for g, w in zip(got, truth, strict=True)
        )

    return {
        "graphed": worst([m.grad.cpu() for m in masters.masters]),
        "eager_bf16": worst(eager_bf16),
        "tensors": len(truth),
        "layers": len(graphed.fused),
    }


def short_run(model_dir: Path) -> dict:
    tokenizer = load_tokenizer(model_dir)
    spec = TrainSpec(
        config=parse_train_args(["epochs=4", "bs=4", "ga=1", "lr=2e-3", "lora_target=all"]),
        examples=[render_training_example(tokenizer, c) for c in synthetic(4)],
        base=model_dir,
        cuda_graphs=True,
    )
    result = train(spec)
    return {"steps": result.step, "first_loss": result.losses[0], "last_loss": result.losses[-1]}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/families")
    out.mkdir(parents=True, exist_ok=True)
    models = Path("/tmp/families-models")
    rows = []
    for row in SUPPORT_MATRIX:
        if not row.fused:
            continue
        model_dir = build_tiny_family_model(models / row.tiny, row.tiny)
        dirs = {row.tiny: model_dir}
        if row.tiny == "mistral":  # a window shorter than the samples
            window = models / "mistral-window"
            shutil.copytree(model_dir, window, dirs_exist_ok=True)
            config = json.loads((window / "config.json").read_text())
            (window / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
            dirs["mistral-window"] = window
        for name, path in dirs.items():
            result = {"family": name}
            try:
                result["grads"] = gradient_errors(path)
                result["train"] = short_run(path)
            except Exception as exc:  # report and go on with the next family
                result["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(result)
            print(json.dumps(result), flush=True)
    print(
        "| family | layers fused | LoRA tensors | worst rel. error, graphed bf16 | "
        "worst rel. error, eager bf16 | graphed steps | loss first → last |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | error: {r['error'][:120]} | | | | | |")
            continue
        t = r["train"]
        print(
            f"| {r['family']} | {r['grads']['layers']} | {r['grads']['tensors']} | "
            f"{r['grads']['graphed']:.1e} | {r['grads']['eager_bf16']:.1e} | {t['steps']} | "
            f"{t['first_loss']:.3f} → {t['last_loss']:.3f} |"
        )
    (out / "families.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
