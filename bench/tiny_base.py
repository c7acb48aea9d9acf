"""Does the embedded default learn? Builds the tiny base (random weights, then pre-trained on news
headlines: timed), fine-tunes it with the demo's settings on the demo's 300 train samples, and
scores the random base, the pre-trained base and the fine-tuned adapter by label likelihood.

    python bench/tiny_base.py [--source ../shared/data/thucnews] [--steps N] [--settings "lr=…"]

Label likelihood, teacher-forced: for each sample, the sum of the log-probabilities of a label's
tokens and the end of sequence after the prompt and the reference reasoning up to
``</think>\\n\\n``; the prediction is the argmax over the label set. "chat, no reasoning" scores the
label right after the chat prompt (what a base model never taught the reasoning format answers).
"generated": the model writes its answer greedily and the label is parsed from it, as the job's
evaluation does (transformers here, vLLM there: the same greedy decoding). Scored
on the demo's eval split (100) and on 500 held-out headlines that are in no demo split, not in the
tokenizer's corpus and not in the pre-training corpus (``examples/news_demo/build.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.protocol import (  # noqa: E402
    THINK_CLOSE,
    Message,
    match_label,
    parse_answer,
    render_prompt,
    render_training_example,
)
from runner.config import parse_train_args  # noqa: E402
from runner.tiny_model import build_tiny_model  # noqa: E402
from runner.tiny_pretrain import PretrainPlan  # noqa: E402
from runner.train.recipe import TrainHooks, TrainSpec, train  # noqa: E402
from stack.demo import DEMO_START_SETTINGS  # noqa: E402

DEMO = REPO / "examples" / "news_demo"


def demo_builder() -> Any:
    spec = importlib.util.spec_from_file_location("news_demo_build", DEMO / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_demo_split(name: str) -> list[list[Message]]:
    roles = {"human": "user", "gpt": "assistant"}
    records = json.loads((DEMO / name).read_text(encoding="utf-8"))
    return [[Message(roles[t["from"]], t["value"]) for t in r["conversations"]] for r in records]


def held_out(source: Path) -> list[list[Message]]:
    build = demo_builder()
    splits = build.split_headlines(source / "test.txt")
    out = []
    for label, pairs in splits["held_out"].items():
        for _, headline in pairs:
            turns = build.sample(headline, label)["conversations"]
            out.append(
                [Message("user", turns[0]["value"]), Message("assistant", turns[1]["value"])]
            )
    return out


@torch.no_grad()
def label_accuracy(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[Message]],
    labels: Sequence[str],
    *,
    reasoning: bool,
) -> float:
    """Share of ``conversations`` whose reference label has the highest likelihood. The context is
    run once; the labels continue from its cache as one batch."""
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = tokenizer.eos_token_id
    rows = [[*ids, eos] for ids in label_ids]  # what is scored after the context
    correct = 0
    for conversation in conversations:
        context = render_prompt(tokenizer, conversation[:-1])
        answer = conversation[-1].content
        if reasoning:
            thinking = answer[: answer.rindex(THINK_CLOSE) + len(THINK_CLOSE)] + "\n\n"
            context += tokenizer(thinking, add_special_tokens=False)["input_ids"]
        reference = answer[answer.rindex(THINK_CLOSE) + len(THINK_CLOSE) :].strip()
        first = causal(input_ids=torch.tensor([context]), use_cache=True, logits_to_keep=1)
        after_context = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(rows))
        width = max(map(len, rows))
        batch = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        logprobs = torch.log_softmax(
            causal(input_ids=batch, past_key_values=cache).logits.float(), dim=-1
        )
        scores = [
            float(after_context[row[0]])
            + sum(float(logprobs[i, j - 1, row[j]]) for j in range(1, len(row)))
            for i, row in enumerate(rows)
        ]
        correct += labels[max(range(len(labels)), key=scores.__getitem__)] == reference
    return correct / len(conversations)


@torch.no_grad()
def generated_accuracy(
    model: Any, tokenizer: Any, conversations: Sequence[list[Message]], labels: Sequence[str]
) -> float:
    """Share answered right when the model writes its answer greedily (reasoning, then label),
    parsed as evaluation and serving parse it."""
    correct = 0
    for conversation in conversations:
        prompt = render_prompt(tokenizer, conversation[:-1])
        reference = parse_answer(conversation[-1].content).label
        limit = len(tokenizer(conversation[-1].content, add_special_tokens=False)["input_ids"])
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=limit + 16,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        correct += match_label(parse_answer(text).label, labels) == reference
    return correct / len(conversations)


@contextmanager
def _checkpoints(root: Path) -> Iterator[TrainHooks]:
    @contextmanager
    def checkpoint_dir(step: int, final: bool) -> Iterator[Path]:
        directory = root / f"step-{step}"
        directory.mkdir(parents=True)
        yield directory

    yield TrainHooks(checkpoint_dir=checkpoint_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/thucnews")
    parser.add_argument("--steps", type=int, default=PretrainPlan.steps)
    parser.add_argument("--settings", default=DEMO_START_SETTINGS)
    parser.add_argument(
        "--with-random", action="store_true", help="also fine-tune the random-weight model"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the models here (default: a temporary folder)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="score the models an earlier run left in --work"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for fine-tuning (default: torch's)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.work or Path(tmp))
    return 0


def run(args: argparse.Namespace, root: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_split, eval_split = read_demo_split("train.json"), read_demo_split("eval.json")
    labels = demo_builder().LABELS_ZH
    sets = {"demo eval (100)": eval_split, "held-out (500)": held_out(args.source)}
    timings: dict[str, float] = {}
    random_dir, base_dir = root / "random", root / "base"
    if not args.reuse:
        started = time.monotonic()
        build_tiny_model(random_dir)
        timings["build random"] = time.monotonic() - started
        started = time.monotonic()
        build_tiny_model(base_dir, pretrain=PretrainPlan(steps=args.steps))
        timings["build pre-trained"] = time.monotonic() - started
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = parse_train_args(args.settings.split())
    examples = [render_training_example(tokenizer, c) for c in train_split]
    bases = {"pre-trained": base_dir, **({"random": random_dir} if args.with_random else {})}
    fitted: dict[str, Path] = {}
    for name, directory in bases.items():
        ckpts = root / f"ckpt-{name}"
        if not args.reuse:
            with _checkpoints(ckpts) as hooks:
                spec = TrainSpec(config=config, examples=examples, base=directory, device="cpu")
                result = train(spec, hooks)
            timings[f"fine-tune {name}"] = result.seconds
        fitted[name] = max(ckpts.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    results: dict[str, dict[str, float]] = {}
    torch.set_num_threads(1)  # small ops: a second thread only waits for a shared core
    for name, directory in bases.items():
        models = {
            f"{name} base": AutoModelForCausalLM.from_pretrained(directory),
            f"{name} + LoRA": PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(directory), str(fitted[name])
            ),
        }
        for model_name, model in models.items():
            model.eval()
            for set_name, conversations in sets.items():
                for reasoning in (False, True):
                    key = f"{set_name}, {'reasoning' if reasoning else 'chat, no reasoning'}"
                    started = time.monotonic()
                    results.setdefault(model_name, {})[key] = accuracy = label_accuracy(
                        model, tokenizer, conversations, labels, reasoning=reasoning
                    )
                    logging.info(
                        "%s, %s: %.1f%% (%.0f s)",
                        model_name,
                        key,
                        100 * accuracy,
                        time.monotonic() - started,
                    )
            key = "demo eval (100), generated"
            started = time.monotonic()
            results[model_name][key] = accuracy = generated_accuracy(
                model, tokenizer, eval_split, labels
            )
            logging.info(
                "%s, %s: %.1f%% (%.0f s)",
                model_name,
                key,
                100 * accuracy,
                time.monotonic() - started,
            )
    provenance = json.loads((base_dir / "provenance.json").read_text(encoding="utf-8"))
    print_table(results, timings, args, provenance)
    if args.out:
        args.out.write_text(json.dumps({"results": results, "timings": timings}, indent=2) + "\n")


def print_table(results: dict, timings: dict, args: argparse.Namespace, provenance: dict) -> None:
    columns = list(next(iter(results.values())))
    print(
        f"\nfine-tune settings: {args.settings}; pre-training steps {args.steps}; "
        f"torch threads {torch.get_num_threads()} (scoring 1)"
    )
    print("| model | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1%}" for c in columns) + " |")
    base, tuned = results["pre-trained base"], results["pre-trained + LoRA"]
    print(
        "| Δ fine-tuned − pre-trained base (points) | "
        + " | ".join(f"{100 * (tuned[c] - base[c]):+.1f}" for c in columns)
        + " |"
    )
    print(
        "| ratio fine-tuned / pre-trained base | "
        + " | ".join(f"{tuned[c] / base[c]:.2f}×" if base[c] else "–" for c in columns)
        + " |"
    )
    loss = provenance["loss"]
    print(
        "\n"
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + f"; pre-training {provenance['seconds']} s, loss {loss['first']} → {loss['last']} "
        f"({provenance['epochs']} epochs of {provenance['headlines']} headlines)"
    )


if __name__ == "__main__":
    sys.exit(main())
