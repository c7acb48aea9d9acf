"""Which tiny base and demo data make the embedded default learn, as the product scores it?

    python bench/tiny_recipes.py [--variants a,b,…] [--jobs N] [--source ../shared/data/thucnews]

Each variant builds a tiny base (its dimensions, pre-training plan and line format), fine-tunes it
with the job's own ``train()`` on the demo's 300 train samples rewritten in the variant's answer
style, and scores base and adapter with the job's own evaluation (``evaluate_conversations`` on the
transformers backend): the label-constrained accuracy after the model's *own* reasoning (what
serving answers with reasoning on), after an empty ``<think>`` block (reasoning off), and the free
generation's invalid rate — never a likelihood after the reference reasoning, which holds the label.
Scored on the demo eval split (100) and on held-out headlines in no demo split and not pre-trained
on. Variants run in parallel processes of one torch thread each (a CPU host with many cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "examples" / "news_demo"


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("news_demo_build", DEMO / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Answer styles: how the demo's assistant turn is written from (headline, label, topic).
STYLES = {
    "copy": "<think>\n这条标题“{headline}”讲的是{topic}方面的内容，所以属于{label}类。\n</think>\n\n{label}",
    "topic": "<think>\n这条标题讲的是{topic}方面的内容，所以属于{label}类。\n</think>\n\n{label}",
    "short": "<think>\n{topic}，属于{label}类。\n</think>\n\n{label}",
    "topiconly": "<think>\n{topic}。\n</think>\n\n{label}",
    "empty": "<think>\n\n</think>\n\n{label}",
    "plain": "{label}",
}


@dataclass(frozen=True)
class Variant:
    """One recipe. Its field defaults are round 1's baseline (the plan before label weighting);
    ``product=True`` takes the product's own ``PretrainPlan()`` and demo data instead."""

    name: str
    style: str = "copy"
    steps: int = 200
    lr: float = 3e-3
    line_format: str = "{headline}。类别：{label}"
    label_weight: float = 1.0
    dims: dict = field(default_factory=dict)
    settings: str = "lr=5e-3 epochs=10 lora_rank=16"
    product: bool = False
    seed: int = 0


VARIANTS = {
    v.name: v
    for v in [
        Variant("product", style="demo", product=True),
        Variant("now"),
        Variant("topic", style="topic"),
        Variant("short", style="short"),
        Variant("empty", style="empty"),
        Variant("plain", style="plain"),
        Variant("topic-400", style="topic", steps=400),
        Variant("short-400", style="short", steps=400),
        Variant("topic-lr1e-2", style="topic", settings="lr=1e-2 epochs=10 lora_rank=16"),
        Variant("topic-fmt", style="topic", line_format="标题：{headline}\n类别：{label}"),
        Variant(
            "topic-wide",
            style="topic",
            dims={"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4},
        ),
        Variant("topic-deep", style="topic", dims={"num_hidden_layers": 4}),
        Variant("short-lr6e-3", style="short", lr=6e-3),
        Variant("topic-ep20", style="topic", settings="lr=5e-3 epochs=20 lora_rank=16"),
        Variant("topic-r64", style="topic", settings="lr=5e-3 epochs=10 lora_rank=64"),
        Variant("lw10-short", style="short", label_weight=10),
        Variant("lw10-topic", style="topic", label_weight=10),
        Variant("lw10-plain", style="plain", label_weight=10),
        Variant("lw10-empty", style="empty", label_weight=10),
        Variant("lw10-copy", label_weight=10),
        Variant("lw10-short-400", style="short", label_weight=10, steps=400),
        Variant("lw30-short", style="short", label_weight=30),
        Variant("lw100-short", style="short", label_weight=100),
        Variant(
            "lw10-short-lr1e-2",
            style="short",
            label_weight=10,
            settings="lr=1e-2 epochs=10 lora_rank=16",
        ),
        Variant(
            "lw10-short-lr2e-3",
            style="short",
            label_weight=10,
            settings="lr=2e-3 epochs=10 lora_rank=16",
        ),
        Variant(
            "lw10-short-fmt",
            style="short",
            label_weight=10,
            line_format="标题：{headline}\n类别：{label}",
        ),
        Variant("lw10-short-plr6e-3", style="short", label_weight=10, lr=6e-3),
        Variant("lw30-short-400", style="short", label_weight=30, steps=400),
        Variant("r3-plain", style="plain", label_weight=10, steps=400),
        Variant("r3-empty", style="empty", label_weight=10, steps=400),
        Variant("r3-topic", style="topic", label_weight=10, steps=400),
        Variant("r3-topiconly", style="topiconly", label_weight=10, steps=400),
        Variant("r3-lw5", style="short", label_weight=5, steps=400),
        Variant("r3-lw20", style="short", label_weight=20, steps=400),
        Variant(
            "r3-ft2e-3",
            style="short",
            label_weight=10,
            steps=400,
            settings="lr=2e-3 epochs=10 lora_rank=16",
        ),
        Variant(
            "r3-ft1e-2",
            style="short",
            label_weight=10,
            steps=400,
            settings="lr=1e-2 epochs=10 lora_rank=16",
        ),
        Variant(
            "r3-ep5",
            style="short",
            label_weight=10,
            steps=400,
            settings="lr=5e-3 epochs=5 lora_rank=16",
        ),
        Variant("r3-300", style="short", label_weight=10, steps=300),
        Variant("r3-plr2e-3", style="short", label_weight=10, steps=400, lr=2e-3),
        Variant("r3-600", style="short", label_weight=10, steps=600),
        Variant("r3-lw5-plain", style="plain", label_weight=5, steps=400),
        Variant(
            "r3-r8",
            style="short",
            label_weight=10,
            steps=400,
            settings="lr=5e-3 epochs=10 lora_rank=8",
        ),
        Variant("r3-lw5-300", style="short", label_weight=5, steps=300),
        *[
            Variant(f"p{steps}-{lr:g}-lw{lw:g}", "demo", steps, lr, label_weight=lw)
            for steps, lr, lw in [
                (400, 2e-3, 10),
                (600, 2e-3, 10),
                (400, 1.5e-3, 10),
                (600, 1.5e-3, 10),
                (400, 2e-3, 5),
                (600, 2e-3, 5),
                (400, 1e-3, 10),
                (600, 1e-3, 10),
                (500, 2e-3, 10),
            ]
        ],
        Variant("p400-2e-3-lw10-seed1", "demo", 400, 2e-3, label_weight=10, seed=1),
        Variant("p400-2e-3-lw10-seed2", "demo", 400, 2e-3, label_weight=10, seed=2),
        Variant("p600-2e-3-lw10-seed1", "demo", 600, 2e-3, label_weight=10, seed=1),
        Variant("smoke", style="topic", steps=5, settings="lr=5e-3 epochs=1 lora_rank=8"),
    ]
}


def _conversations(pairs: list[tuple[str, str]], style: str, build: Any) -> list[list[Any]]:
    from core.protocol import Message

    out = []
    for headline, label in pairs:
        if style == "demo":  # the demo's own data, as examples/news_demo/build.py writes it
            answer = build.sample(headline, label)["conversations"][1]["value"]
        else:
            answer = STYLES[style].format(headline=headline, label=label, topic=build.TOPICS[label])
        out.append([Message("user", build.INSTRUCTION + headline), Message("assistant", answer)])
    return out


def _pairs(build: Any, source: Path) -> dict[str, list[tuple[str, str]]]:
    splits = build.split_headlines(source / "test.txt")
    return {
        name: [(h, label) for label, rows in splits[name].items() for _, h in rows]
        for name in ("train", "eval", "held_out")
    }


def run_variant(variant: Variant, source: Path, work: Path, held_out: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    import runner.tiny_model as tiny
    from core.protocol import render_training_example
    from runner.config import parse_train_args
    from runner.eval.evaluate import evaluate_conversations
    from runner.eval.predict import TransformersPredictor
    from runner.tiny_pretrain import PretrainPlan
    from runner.train.recipe import TrainHooks, TrainSpec, train

    tiny.DIMENSIONS = {**tiny.DIMENSIONS, **variant.dims}
    build = _build_module()
    pairs = _pairs(build, source)
    root = work / variant.name
    times: dict[str, float] = {}
    started = time.monotonic()
    plan = (
        PretrainPlan()
        if variant.product
        else PretrainPlan(
            steps=variant.steps,
            lr=variant.lr,
            line_format=variant.line_format,
            label_weight=variant.label_weight,
            seed=variant.seed,
            threads=1,
        )
    )
    base = tiny.build_tiny_model(root / "base", pretrain=plan)
    times["pretrain_s"] = round(time.monotonic() - started, 1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_set = _conversations(pairs["train"], variant.style, build)
    examples = [render_training_example(tokenizer, c) for c in train_set]

    from contextlib import contextmanager

    @contextmanager
    def checkpoint_dir(step: int, final: bool):  # type: ignore[no-untyped-def]
        directory = root / f"ckpt-{step}"
        directory.mkdir(parents=True)
        yield directory

    started = time.monotonic()
    spec = TrainSpec(
        config=parse_train_args(variant.settings.split()),
        examples=examples,
        base=base,
        device="cpu",
    )
    result = train(spec, TrainHooks(checkpoint_dir=checkpoint_dir))
    times["finetune_s"] = round(time.monotonic() - started, 1)
    adapter = max(root.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    labels = build.LABELS_ZH
    sets = {
        "eval": _conversations(pairs["eval"], variant.style, build),
        "held": _conversations(pairs["held_out"][:: max(1, 500 // held_out)], variant.style, build),
    }
    scores: dict[str, Any] = {
        "final_loss": round(float(result.losses[-1]), 4),
        "native held": native_accuracy(base, pairs["held_out"], labels, plan.line_format),
    }
    for who, adapter_dir in (("base", None), ("lora", adapter)):
        predictor = TransformersPredictor(base, adapter_dir, device="cpu")
        for set_name, conversations in sets.items():
            started = time.monotonic()
            metrics = evaluate_conversations(
                predictor, tokenizer, conversations, labels, max_model_len=512
            ).metrics
            scores[f"{who} {set_name}"] = {
                "acc": metrics["accuracy"],
                "off": metrics.get("accuracy_reasoning_off"),
                "free": metrics["free_accuracy"],
                "invalid": metrics["invalid_rate"],
                "ece": metrics["ece"],
                "s": round(time.monotonic() - started, 1),
            }
    return {"variant": variant.name, "times": times, "scores": scores}


def native_accuracy(
    base: Path, pairs: list[tuple[str, str]], labels: list[str], line_format: str
) -> float:
    """The base's label likelihood in its pre-training layout (``headline。类别：`` then each label
    and the end of line): what it knows, before any chat format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    head = line_format.partition("{label}")[0]
    rows = [
        [*tokenizer(label, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for label in labels
    ]
    correct = 0
    with torch.no_grad():
        for headline, gold in pairs:
            context = [
                tokenizer.bos_token_id,
                *tokenizer(head.format(headline=headline), add_special_tokens=False)["input_ids"],
            ]
            scores = []
            for row in rows:
                ids = torch.tensor([context + row])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                start = len(context) - 1
                scores.append(sum(float(logprobs[start + i, t]) for i, t in enumerate(row)))
            correct += labels[max(range(len(labels)), key=scores.__getitem__)] == gold
    return round(correct / len(pairs), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/thucnews")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    names = args.variants.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                pool.submit(run_variant, VARIANTS[n], args.source, work, args.held_out): n
                for n in names
            }
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as exc:
                    results.append({"variant": futures[future], "error": repr(exc)})
                print(json.dumps(results[-1], ensure_ascii=False), flush=True)
                if args.out:  # as they come: a run cut short keeps what finished
                    args.out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    return 0


def print_table(results: list[dict[str, Any]]) -> None:
    head = "| variant | loss | native held | base eval acc/off | LoRA eval acc/off/free/invalid | LoRA held acc/off | base held acc/off | pretrain s | finetune s |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} |")
            continue
        s, t = r["scores"], r["times"]

        def pct(x: Any) -> str:
            return "–" if x is None else f"{100 * x:.0f}%"

        print(
            f"| {r['variant']} | {s['final_loss']} | {pct(s['native held'])} "
            f"| {pct(s['base eval']['acc'])}/{pct(s['base eval']['off'])} "
            f"| {pct(s['lora eval']['acc'])}/{pct(s['lora eval']['off'])}/"
            f"{pct(s['lora eval']['free'])}/{pct(s['lora eval']['invalid'])} "
            f"| {pct(s['lora held']['acc'])}/{pct(s['lora held']['off'])} "
            f"| {pct(s['base held']['acc'])}/{pct(s['base held']['off'])} "
            f"| {t['pretrain_s']} | {t['finetune_s']} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
