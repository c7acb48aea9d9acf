"""Small synthetic datasets and checkpoint plumbing for trainer tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from core.protocol import Message, render_training_example
from runner.config import parse_train_args
from runner.train.recipe import TrainHooks, TrainSpec, setup_model

KEYWORDS = {
    "体育": ["球队", "比赛", "冠军", "进球"],
    "股票": ["股价", "涨停", "大盘", "指数"],
    "房产": ["楼盘", "房价", "开盘", "户型"],
    "教育": ["高考", "考研", "学校", "招生"],
}


def synthetic(n_per_label: int, seed: int = 0) -> list[list[Message]]:
    rng = random.Random(seed)
    out = []
    for label, words in KEYWORDS.items():
        for _ in range(n_per_label):
            headline = f"标题：{rng.choice(words)}{rng.choice(['新闻', '消息', '报道', '动态'])}"
            out.append([Message("user", headline), Message("assistant", label)])
    return out


def examples(tokenizer, conversations):
    return [render_training_example(tokenizer, c) for c in conversations]


def dir_hooks(root: Path, **kwargs) -> TrainHooks:
    @contextmanager
    def checkpoint_dir(step: int, final: bool) -> Iterator[Path]:
        directory = root / f"step-{step}"
        directory.mkdir(parents=True)
        yield directory

    return TrainHooks(checkpoint_dir=checkpoint_dir, **kwargs)


def lora_model(
    tiny_model_dir: Path, *args: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The tiny model with rank-8 adapters on every linear layer (fp32, CPU unless asked) and
    non-zero B, so that the adapters take part in the forward."""
    config = parse_train_args(["lora_rank=8", "lora_target=all", *args])
    spec = TrainSpec(config=config, examples=[], base=tiny_model_dir, device=device)
    model = setup_model(spec, torch.device(device), dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def perturb_norms(model: torch.nn.Module) -> None:
    """Norm weights away from their initial ones (and zeros), so a norm left out shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=generator).to(p) * 0.2)


def eager_gradients(model: torch.nn.Module, batches, params) -> list[torch.Tensor]:
    """The step's gradient through the plain transformers forward, without touching ``.grad``."""
    answer_tokens = sum(int(b.targets.numel()) for b in batches)
    loss = sum(
        F.cross_entropy(model(**b.model_inputs()).logits[0].float(), b.targets, reduction="sum")
        for b in batches
    )
    return [g.float() for g in torch.autograd.grad(loss / answer_tokens, params)]
