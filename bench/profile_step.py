"""Where a training step's time goes on the GPU: profile our path on the reference job.

    python bench/profile_step.py [--samples-per-step 4] [--compile] [--steps 40]

Prints the step time, the GPU kernel time inside it (the rest is launch and Python overhead), and
the top operators by GPU and by CPU time. Diagnostic only: the comparison with the baseline is
bench/train_throughput.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import JOB, SHAPES, make_examples, model_config

from runner.config import parse_train_args
from runner.train.recipe import TrainHooks, TrainSpec, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--samples-per-step", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=18, help="kernels listed by GPU time")
    parser.add_argument(
        "--profile-capture",
        action="store_true",
        help="with --cuda-graphs: cProfile each bucket's capture and print where its time goes",
    )
    args = parser.parse_args()
    if args.profile_capture:
        profile_captures()
    examples = make_examples(300, SHAPES[args.model]["vocab_size"])
    batch = 2 if args.samples_per_step >= 2 else 1
    config = parse_train_args(
        [
            *JOB,
            f"bs={batch}",
            f"grad_accum={args.samples_per_step // batch}",
            f"max_steps={args.steps}",
            f"method={args.method}",
        ]
    )
    base = model_config(args.model)
    if args.method == "qlora":
        import tempfile

        from transformers import AutoModelForCausalLM

        base_dir = Path(tempfile.mkdtemp()) / "model"
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            AutoModelForCausalLM.from_config(base, dtype=torch.bfloat16).save_pretrained(base_dir)
        torch.cuda.empty_cache()
        base = base_dir
    warm = args.steps - args.profile_steps
    marks: list[float] = []
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        schedule=torch.profiler.schedule(
            wait=warm - 2, warmup=2, active=args.profile_steps, repeat=1
        ),
    )

    def tick() -> bool:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        profiler.step()
        return False

    spec = TrainSpec(
        config=config,
        examples=examples,
        base=base,
        compile_layers=args.compile,
        cuda_graphs=args.cuda_graphs,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    with profiler:
        result = train(spec, TrainHooks(should_stop=tick))
    print("step ms:", [round((b - a) * 1000) for a, b in itertools.pairwise(marks)])
    steps = marks[warm - 1 : warm - 1 + args.profile_steps + 1]
    step_ms = (steps[-1] - steps[0]) / (len(steps) - 1) * 1000 if len(steps) > 1 else float("nan")
    events = profiler.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events) / args.profile_steps
    print(
        f"== {args.method}, {args.samples_per_step} samples/step, compile={args.compile}, "
        f"graphs={args.cuda_graphs}, "
        f"ckpt={args.gradient_checkpointing}: {step_ms:.1f} ms/step, GPU busy "
        f"{kernel_us / 1000:.1f} ms/step, peak {(result.peak_memory_bytes or 0) / 1e9:.1f} GB, "
        f"{result.tokens_per_second:,.0f} tokens/s over {result.step} steps",
        flush=True,
    )
    print(
        events.table(
            sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=90
        )
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def profile_captures() -> None:
    """Wrap ``GraphedDecoder._capture`` in cProfile and print, per capture, its seconds and the
    functions that took them (the capture's cost is host time: the GPU only records)."""
    import cProfile
    import io
    import pstats

    from runner.train import graphs

    original = graphs.GraphedDecoder._capture

    def profiled(self, size, *args):  # type: ignore[no-untyped-def]
        profile = cProfile.Profile()
        started = time.perf_counter()
        bucket = profile.runcall(original, self, size, *args)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(28)
        print(f"== capture of the {size}-token bucket: {seconds:.3f} s", flush=True)
        print(text.getvalue()[-6000:], flush=True)
        return bucket

    graphs.GraphedDecoder._capture = profiled  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
