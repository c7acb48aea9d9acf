"""The reference training job on our trainer, on the plain transformers Trainer + PEFT path
(padded batch 2, gradient checkpointing: what LLaMA-Factory runs), and on the strongest setting of
that tool (``peer``: padding-free batches, no checkpointing, Liger kernels when carried), in the
same process.

    python bench/train_throughput.py                 # on the GPU: the 7B architecture
    python bench/train_throughput.py --model tiny    # a dry run on CPU

The job: a Qwen2 model shaped as DeepSeek-R1-Distill-Qwen-7B (random bf16 weights: speed does not
depend on them), 300 samples of ~260 tokens (normal, sd 60, clipped to 96-512; a third prompt),
LoRA rank 8 on all linear layers, LoRA+ 16, lr 5e-6, batch 2 × grad accum 2, 3 epochs. Our path
runs the whole job; the baseline runs ``--baseline-steps`` optimizer steps after warm-up and its
whole-job time is extrapolated from them. MFU counts 4 × decoder matmul parameters per token plus
4 × LM-head parameters per answer token, over 790 TFLOP/s (the bf16 rate measured on the H200).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.protocol import TrainingExample
from runner.config import parse_train_args
from runner.train import graphs, memory
from runner.train.recipe import TrainSpec, train

PEAK_FLOPS = 790e12
SHAPES = {
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=4096,
    ),
}
JOB = [
    "lr=5e-6",
    "lora_rank=8",
    "lora_target=all",
    "loraplus=16",
    "epochs=3",
    "logging_steps=1000000",
    "save_steps=1000000",
]


def model_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        use_cache=False,
    )


def make_examples(n: int, vocab: int, seed: int = 0) -> list[TrainingExample]:
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=generator) * 60 + 260).clamp(96, 512).round().int()
    examples = []
    for length in lengths.tolist():
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        examples.append(TrainingExample(ids, prompt_len=length // 3))
    return examples


def useful_flops(shape: str, tokens: int, answer_tokens: int) -> float:
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * h // s["num_attention_heads"]
    decoder = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    return 4 * decoder * tokens + 4 * s["vocab_size"] * h * answer_tokens


def job_tokens(examples: list[TrainingExample], epochs: int) -> tuple[int, int]:
    return (
        sum(len(e.input_ids) for e in examples) * epochs,
        sum(e.answer_len for e in examples) * epochs,
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_ours(
    shape: str,
    examples: list[TrainingExample],
    batch: int,
    accum: int,
    *,
    compile_layers: bool,
    cuda_graphs: bool = False,
    method: str = "lora",
    base: object = None,
    max_steps: int = 0,
    gradient_checkpointing: bool = False,
) -> dict:
    free_memory()
    args = [*JOB, f"bs={batch}", f"grad_accum={accum}", f"method={method}", "cutoff_len=1024"]
    if max_steps:
        args.append(f"max_steps={max_steps}")
    spec = TrainSpec(
        config=parse_train_args(args),
        examples=examples,
        base=base if base is not None else model_config(shape),
        compile_layers=compile_layers,
        cuda_graphs=cuda_graphs,
        gradient_checkpointing=gradient_checkpointing,
    )
    started = time.perf_counter()
    result = train(spec)
    wall = time.perf_counter() - started
    steps = result.step
    per_step = batch * accum
    done = [examples[i] for s in range(steps) for i in _indices(spec, s)]
    tokens = sum(len(e.input_ids) for e in done)
    answers = sum(e.answer_len for e in done)
    extras = (
        (", per-layer compile" if compile_layers else "")
        + (", CUDA graphs" if cuda_graphs else "")
        + (", grad ckpt" if gradient_checkpointing else "")
    )
    return {
        "path": f"ours ({method}{extras})",
        "samples_per_step": per_step,
        "steps": steps,
        "train_s": result.seconds,
        "wall_s": wall,
        "tokens_per_s": tokens / result.seconds,
        "mfu": useful_flops(shape, tokens, answers) / result.seconds / PEAK_FLOPS,
        "peak_gb": (result.peak_memory_bytes or 0) / 1e9,
        "final_loss": result.losses[-1],
        "losses": result.losses,
    }


def _indices(spec: TrainSpec, step: int) -> list[int]:
    from runner.train.packing import Schedule

    c = spec.config
    return Schedule(
        len(spec.examples), c.samples_per_step, c.num_train_epochs, c.seed, c.max_steps
    ).indices(step)


def run_baseline(shape: str, examples: list[TrainingExample], steps: int, warmup: int) -> dict:
    """transformers.Trainer + PEFT as LLaMA-Factory runs it: padded batch 2, grad accum 2,
    gradient checkpointing, sdpa, PEFT's default fp32 adapter weights, LoRA+ via peft."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    free_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config(shape), dtype=dtype, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    optimizer = create_loraplus_optimizer(
        model, optimizer_cls=torch.optim.AdamW, lr=5e-6, loraplus_lr_ratio=16
    )
    rows = [
        {"input_ids": e.input_ids, "labels": [-100] * e.prompt_len + e.input_ids[e.prompt_len :]}
        for e in examples
    ]

    def collate(batch: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        ids = [r["input_ids"] for r in batch]
        return {
            "input_ids": torch.tensor(pad(ids, 0)),
            "labels": torch.tensor(pad([r["labels"] for r in batch], -100)),
            "attention_mask": torch.tensor(pad([[1] * len(x) for x in ids], 0)),
        }

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        learning_rate=5e-6,
        lr_scheduler_type="cosine",
        max_steps=warmup + steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=collate,
        optimizers=(optimizer, None),
        callbacks=[Clock()],
    )
    trainer.train()
    measured = times[warmup:]
    seconds = measured[-1] - times[warmup - 1]
    # Steps see samples in the Trainer's own shuffled order: count the tokens of as many samples
    # as were consumed, using the mean sample to stay fair to both paths.
    mean_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    mean_answer = sum(e.answer_len for e in examples) / len(examples)
    tokens = mean_tokens * 4 * len(measured)
    answers = mean_answer * 4 * len(measured)
    per_step = seconds / len(measured)
    job_steps = math.ceil(len(examples) / 4) * 3
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    del trainer, model, optimizer
    return {
        "path": "baseline (Trainer + PEFT, padded, grad ckpt)",
        "samples_per_step": 4,
        "steps": len(measured),
        "train_s": per_step * job_steps,
        "wall_s": float("nan"),
        "tokens_per_s": tokens / seconds,
        "mfu": useful_flops(shape, int(tokens), int(answers)) / seconds / PEAK_FLOPS,
        "peak_gb": peak,
        "final_loss": float("nan"),
        "extrapolated": True,
    }


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_peer(shape: str, examples: list[TrainingExample], steps: int, warmup: int) -> dict:
    """The strongest setting of the same tool: transformers.Trainer + PEFT with the baseline's LoRA
    (rank 8, all linear layers, LoRA+ 16 through peft), but padding-free batches of the 4 samples
    of a step (``DataCollatorWithFlattening``: one sequence whose position ids restart per sample,
    from which sdpa builds a per-sample causal mask), no gradient checkpointing, and Liger kernels
    (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) when liger-kernel is importable.

    It sees the samples in our trainer's order (``Schedule`` at 4 samples/step, the job's seed;
    the Trainer's sequential sampler) and starts from the same random weights (the job's seed
    before ``from_config``), so its first-step loss is comparable with ours (``loss_agreement``).
    Run it after our paths: Liger patches functions of transformers' Qwen2 module in place.
    """
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from runner.train.packing import Schedule

    free_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = parse_train_args(JOB)
    torch.manual_seed(config.seed)  # what our trainer does before building the same random model
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config(shape), dtype=dtype, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    optimizer = create_loraplus_optimizer(
        model, optimizer_cls=torch.optim.AdamW, lr=5e-6, loraplus_lr_ratio=16
    )
    per_step = 4
    schedule = Schedule(len(examples), per_step, config.num_train_epochs, config.seed)
    order = [
        examples[i]
        for s in range(warmup + steps)
        for i in schedule.indices(s % schedule.total_steps)
    ]
    rows = [
        {"input_ids": e.input_ids, "labels": [-100] * e.prompt_len + e.input_ids[e.prompt_len :]}
        for e in order
    ]
    liger = device == "cuda" and liger_available()  # Triton kernels: GPU only
    times: list[float] = []
    # Each step is one forward (no accumulation): its loss, left on the device until the end and
    # at full precision (the Trainer's logs round it, and reading them back each step syncs).
    step_losses: list[torch.Tensor] = []
    model.register_forward_hook(lambda module, inputs, out: step_losses.append(out.loss.detach()))

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        use_liger_kernel=liger,
        learning_rate=5e-6,
        lr_scheduler_type="cosine",
        max_steps=warmup + steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        seed=config.seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorWithFlattening(return_position_ids=True),
        optimizers=(optimizer, None),
        callbacks=[Clock()],
    )
    trainer.train()
    # Liger only patches what it recognises: record whether its kernels are in the model.
    liger_used = any(
        getattr(getattr(m, "forward", None), "__module__", "").startswith("liger_kernel")
        for m in model.modules()
    )
    losses = [float(x) for x in step_losses]
    measured = times[warmup:]
    seconds = measured[-1] - times[warmup - 1]
    done = order[warmup * per_step : (warmup + len(measured)) * per_step]
    tokens = sum(len(e.input_ids) for e in done)
    answers = sum(e.answer_len for e in done)
    job_steps = math.ceil(len(examples) / per_step) * 3
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    del trainer, model, optimizer
    return {
        "path": "peer (Trainer + PEFT, padding-free, no grad ckpt; liger: "
        + ("yes" if liger_used else "no, installed but not applied" if liger else "no")
        + ")",
        "samples_per_step": per_step,
        "steps": len(measured),
        "train_s": seconds / len(measured) * job_steps,
        "wall_s": float("nan"),
        "tokens_per_s": tokens / seconds,
        "mfu": useful_flops(shape, tokens, answers) / seconds / PEAK_FLOPS,
        "peak_gb": peak,
        "final_loss": losses[-1] if losses else float("nan"),
        "losses": losses,
        "liger": liger_used,
        "liger_requested": liger,  # on the GPU, with liger-kernel importable
        "extrapolated": True,
    }


def save_random_model(shape: str, directory: Path) -> Path:
    from transformers import AutoModelForCausalLM

    free_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="20GB")
    del model
    return directory


def loss_agreement(rows: list[dict]) -> str:
    """Graphed and eager runs of the same job see the same data: their per-step losses must agree
    (bf16: GEMMs of another shape round differently, so not bit for bit)."""
    lines = []
    for a in rows:
        for b in rows:
            if (
                "losses" in a
                and "losses" in b
                and a is not b
                and "CUDA graphs" in b["path"]
                and "CUDA graphs" not in a["path"]
                and a["path"].startswith("ours")
                and "compile" not in a["path"]
                and a["samples_per_step"] == b["samples_per_step"]
                and len(a["losses"]) == len(b["losses"])
            ):
                diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
                rel = diff / max(abs(x) for x in a["losses"])
                lines.append(
                    f"loss agreement, {b['samples_per_step']} samples/step: max |graphed - eager|"
                    f" = {diff:.4g} over {len(a['losses'])} steps ({rel:.2%} of the largest loss)"
                )
    lines += peer_loss_agreement(rows)
    return "\n".join(lines)


def peer_loss_agreement(rows: list[dict]) -> list[str]:
    """The peer's first step sees our first step's samples from the same initial weights (LoRA B
    starts at zero, so that loss is the base model's): the two first-step losses must agree. Only
    the first step: later ones differ by design (other optimizer numerics, fp32 vs bf16 adapters)."""
    peer = next((r for r in rows if r["path"].startswith("peer")), None)
    if peer is None:
        return []
    if not peer.get("losses"):
        return ["peer loss agreement: the peer logged no loss, nothing to compare"]
    ours = [
        r
        for r in rows
        if r["path"].startswith("ours (lora")
        and r["samples_per_step"] == peer["samples_per_step"]
        and r.get("losses")
    ]
    lines = [
        f"peer loss agreement, step 1: peer {peer['losses'][0]:.6f},"
        f" {r['path']} {r['losses'][0]:.6f}, |diff| = {abs(peer['losses'][0] - r['losses'][0]):.4g}"
        f" ({abs(peer['losses'][0] - r['losses'][0]) / abs(r['losses'][0]):.3%})"
        for r in ours
    ]
    if not ours:
        lines.append(
            f"peer loss agreement: no run of ours at {peer['samples_per_step']} samples/step in"
            " this invocation (run ours4 or graphs4 with it) to compare the first-step loss with"
        )
    if any(r["path"].startswith("baseline") for r in rows):
        lines.append(
            "peer vs baseline: not compared (the baseline draws samples in the Trainer's random"
            " order, with other random weights, and records no loss)"
        )
    return lines


def table(rows: list[dict], baseline: dict | None, peer: dict | None = None) -> str:
    head = (
        "| path | samples/step | steps run | tokens/s | MFU | peak GB | job train s "
        "| × baseline tokens/s | × peer tokens/s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )

    def times(row: dict, reference: dict | None) -> str:
        return f"{row['tokens_per_s'] / reference['tokens_per_s']:.1f}×" if reference else ""

    lines = [head]
    for r in rows:
        job = f"{r['train_s']:.1f}" + (" (extrapolated)" if r.get("extrapolated") else "")
        lines.append(
            f"| {r['path']} | {r['samples_per_step']} | {r['steps']} | "
            f"{r['tokens_per_s']:,.0f} | {r['mfu'] * 100:.1f}% | {r['peak_gb']:.1f} | "
            f"{job} | {times(r, baseline)} | {times(r, peer)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument(
        "--baseline-steps",
        type=int,
        default=12,
        help="optimizer steps timed for the baseline and the peer, after 2 warm-up steps",
    )
    parser.add_argument(
        "--runs",
        default="baseline,peer,ours4,graphs4,ours16,graphs16,compile4,compile16,qlora",
        help="comma list of: baseline, peer, ours4, graphs4, graphs4-layers, ours16, graphs16, "
        "compile4, compile16, qlora (the peer always runs last: Liger patches transformers)",
    )
    parser.add_argument(
        "--label", default="", help="appended to each path name (e.g. 'warm cache')"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("runner.train.graphs").setLevel(logging.INFO)
    runs = set(filter(None, args.runs.split(",")))
    examples = make_examples(args.samples, SHAPES[args.model]["vocab_size"])
    tokens, answers = job_tokens(examples, 3)
    print(
        f"job: {len(examples)} samples, {tokens} tokens over 3 epochs ({answers} answer)",
        flush=True,
    )
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "train_throughput.json").write_text(json.dumps(rows, indent=2))

    baseline = peer = None
    previous = args.out / "train_throughput.json"
    if "baseline" in runs:
        baseline = run_baseline(args.model, examples, args.baseline_steps, warmup=2)
        record(baseline)
    elif previous.exists():  # an earlier invocation in the same $OUT measured it
        earlier = json.loads(previous.read_text())
        baseline = next((r for r in earlier if r["path"].startswith("baseline")), None)
        peer = next((r for r in earlier if r["path"].startswith("peer")), None)
        rows.extend(earlier)
    plan = [
        ("ours4", 2, 2, False, False),
        ("graphs4", 2, 2, False, True),
        ("ours16", 4, 4, False, False),
        ("graphs16", 4, 4, False, True),
        ("compile4", 2, 2, True, False),
        ("compile16", 4, 4, True, False),
    ]
    if "graphs4-layers" in runs:  # the previous graphed path: transformers' layers, unfused
        plan.append(("graphs4-layers", 2, 2, False, True))
    for name, batch, accum, compiled, graphed in plan:
        if name in runs:
            graphs.FUSE_LAYERS = not name.endswith("-layers")
            row = run_ours(
                args.model, examples, batch, accum, compile_layers=compiled, cuda_graphs=graphed
            )
            graphs.FUSE_LAYERS = True
            if name.endswith("-layers"):
                row["path"] = row["path"].replace(")", ", transformers layers)")
            row["path"] += f" {args.label}".rstrip()
            record(row)
    qlora_runs = [r for r in args.runs.split(",") if r.startswith("qlora")]
    if qlora_runs:  # "qlora-unchunked": the loss over all answer positions at once (as before)
        chunk = memory.LOSS_CHUNK
        with tempfile.TemporaryDirectory() as tmp:
            base = save_random_model(args.model, Path(tmp) / "model")
            for name in qlora_runs:
                memory.LOSS_CHUNK = 0 if name == "qlora-unchunked" else chunk
                row = run_ours(
                    args.model,
                    examples,
                    2,
                    2,
                    compile_layers=False,
                    method="qlora",
                    base=base,
                    max_steps=30,
                    gradient_checkpointing=True,
                )
                if name == "qlora-unchunked":
                    row["path"] = row["path"].replace(")", ", loss unchunked)")
                record(row)
            memory.LOSS_CHUNK = chunk
    if "peer" in runs:  # last: Liger patches functions of transformers' Qwen2 module in place
        peer = run_peer(args.model, examples, args.baseline_steps, warmup=2)
        peer["path"] += f" {args.label}".rstrip()
        record(peer)
    print(loss_agreement(rows), flush=True)
    print(table(rows, baseline, peer), flush=True)
    (args.out / "train_throughput.md").write_text(table(rows, baseline, peer) + "\n")


if __name__ == "__main__":
    main()
