"""Pre-training for the tiny model, so that the embedded default can learn a LoRA task in a demo's
seconds: LoRA on frozen random features barely moves.

The tiny Qwen2 is trained as a causal language model on THUCNews headlines written as
``headline。类别：label`` (a stand-in for what a real base model knows about news topics). The
headlines are ``runner/assets/pretrain_headlines.tsv``, cut by ``examples/news_demo/build.py`` from
the source so that none is a demo train/eval headline or one of the held-out headlines the benchmark
scores on. Deterministic: a fixed seed, deterministic algorithms and a fixed CPU thread count (the
same machine and torch version give the same weights). ``provenance()`` says what went in; the
builder writes it into the model directory as ``provenance.json``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRETRAIN_HEADLINES = Path(__file__).with_name("assets") / "pretrain_headlines.tsv"
SOURCE = "THUCNews title subset, test.txt (649453932/Chinese-Text-Classification-Pytorch)"
LINE_FORMAT = "{headline}。类别：{label}"


@dataclass(frozen=True)
class PretrainPlan:
    """How long and how the tiny model is pre-trained. The defaults (bench/tiny_recipes.py,
    docs/benchmarks.md): 3.9 epochs of the headlines with the label's tokens weighted 10×, which
    gives the base 77% label accuracy in its own layout on held-out headlines (200 steps unweighted:
    25%, too little for a demo's LoRA to draw on); about 55 s on an idle 2-core box."""

    steps: int = 600
    batch_size: int = 16  # packed sequences per step
    seq_len: int = 128  # tokens per packed sequence
    lr: float = 1.5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    line_format: str = LINE_FORMAT
    # Loss weight of the label's tokens (and the end of line after them) against 1 for the rest:
    # the label is 2 of a line's ~20 tokens, so plain language modelling spends little on it.
    label_weight: float = 10.0
    # Torch CPU threads, fixed so that the weights do not depend on the machine's core count (a
    # different count changes the float sums' order). Two: the build runs before serving and the
    # runner start, so on a 2-core box nothing else waits for the cores (1.6× one thread's speed).
    threads: int = 2


def read_headlines(path: Path = PRETRAIN_HEADLINES) -> list[tuple[int, str, str]]:
    """``(source line, headline, label)`` rows of the pre-training corpus."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        number, headline, label = line.split("\t")
        rows.append((int(number), headline, label))
    return rows


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _line_ranges(numbers: list[int]) -> list[str]:
    ranges: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], -1]:
        if n != prev + 1:
            ranges.append(f"{start}-{prev}" if prev != start else str(start))
            start = n
        prev = n
    return ranges


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    import torch

    before_threads = torch.get_num_threads()
    before_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before_det)
        torch.set_num_threads(before_threads)


def _token_stream(
    tokenizer: Any,
    rows: list[tuple[int, str, str]],
    rng: random.Random,
    line_format: str,
    label_weight: float = 1.0,
) -> tuple[list[int], list[float]]:
    """One epoch of lines in a new order, as a token stream and each token's loss weight (the
    label's tokens and the end of line: ``label_weight``; the rest 1). The text before ``{label}``
    and the label are encoded apart, so the label's tokens are the ones it has on its own."""
    order = rows[:]
    rng.shuffle(order)
    head, _, tail = line_format.partition("{label}")
    heads = tokenizer([head.format(headline=h) for _, h, _ in order], add_special_tokens=False)
    tails = tokenizer(
        [label + tail.format(headline=h) for _, h, label in order], add_special_tokens=False
    )
    stream: list[int] = []
    weights: list[float] = []
    for before, after in zip(heads["input_ids"], tails["input_ids"], strict=True):
        stream += [tokenizer.bos_token_id, *before, *after, tokenizer.eos_token_id]
        weights += [1.0] * (1 + len(before)) + [label_weight] * (len(after) + 1)
    return stream, weights


def _batches(tokenizer: Any, rows: list[tuple[int, str, str]], plan: PretrainPlan) -> Iterator[Any]:
    """Packed ``[batch_size, seq_len]`` token blocks and their loss weights: every epoch a new order
    of the lines."""
    import torch

    rng = random.Random(plan.seed)
    block = plan.batch_size * plan.seq_len
    pending: list[int] = []
    pending_w: list[float] = []
    while True:
        ids, weights = _token_stream(tokenizer, rows, rng, plan.line_format, plan.label_weight)
        pending += ids
        pending_w += weights
        while len(pending) >= block:
            chunk, pending = pending[:block], pending[block:]
            chunk_w, pending_w = pending_w[:block], pending_w[block:]
            yield (
                torch.tensor(chunk, dtype=torch.long).view(plan.batch_size, plan.seq_len),
                torch.tensor(chunk_w).view(plan.batch_size, plan.seq_len),
            )


def _loss(model: Any, ids: Any, weights: Any) -> Any:
    """Next-token cross-entropy, each target token weighted (all weights 1: the mean, as
    ``labels=ids`` computes it)."""
    import torch

    logits = model(input_ids=ids).logits[:, :-1].float()
    targets, w = ids[:, 1:], weights[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return (losses * w.reshape(-1)).sum() / w.sum()


def pretrain(
    model: Any, tokenizer: Any, plan: PretrainPlan, corpus: Path = PRETRAIN_HEADLINES
) -> dict:
    """Train ``model`` in place; returns the provenance of what it learned from."""
    import torch

    rows = read_headlines(corpus)
    started = time.monotonic()
    losses: list[float] = []
    with _deterministic(plan.threads):
        torch.manual_seed(plan.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": plan.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=plan.lr,
            betas=(0.9, 0.95),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / max(1, plan.warmup_steps)) * _cosine(s, plan.steps),
        )
        model.train()
        batches = _batches(tokenizer, rows, plan)
        for _ in range(plan.steps):
            ids, weights = next(batches)
            loss = _loss(model, ids, weights)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
    seconds = time.monotonic() - started
    log.info(
        "pre-trained the tiny model: %d steps in %.1f s, loss %.3f → %.3f",
        plan.steps,
        seconds,
        losses[0],
        losses[-1],
    )
    epoch_tokens = len(
        _token_stream(tokenizer, rows, random.Random(plan.seed), plan.line_format)[0]
    )
    return provenance(rows, plan, losses, seconds, corpus, epoch_tokens)


def _cosine(step: int, total: int) -> float:
    import math

    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def provenance(
    rows: list[tuple[int, str, str]],
    plan: PretrainPlan,
    losses: list[float],
    seconds: float,
    corpus: Path,
    epoch_tokens: int,
) -> dict:
    import torch

    numbers = sorted(n for n, _, _ in rows)
    every = max(1, len(losses) // 10)
    tokens = plan.steps * plan.batch_size * plan.seq_len
    return {
        "source": SOURCE,
        "source_file": "test.txt (../shared/data/thucnews in the development checkout)",
        "corpus_file": f"runner/assets/{corpus.name}",
        "corpus_sha256": sha256_of(corpus),
        "selection": "examples/news_demo/build.py: every distinct headline of the source but the "
        "demo's train/eval ones and the 500 held out for bench/tiny_recipes.py",
        "headlines": len(rows),
        "labels": sorted({label for _, _, label in rows}),
        "source_lines": _line_ranges(numbers),
        "plan": asdict(plan),
        "tokens_seen": tokens,
        "epochs": round(tokens / epoch_tokens, 2),
        "loss": {
            "first": round(losses[0], 4),
            "last": round(losses[-1], 4),
            f"every_{every}_steps": [round(x, 4) for x in losses[::every]],
        },
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
