"""Small synthetic datasets and checkpoint plumbing for trainer tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

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


def lora_model(tiny_model_dir: Path, *args: str) -> torch.nn.Module:
    """The tiny model with rank-8 adapters on every linear layer (fp32, CPU) and non-zero B, so
    that the adapters take part in the forward."""
    config = parse_train_args(["lora_rank=8", "lora_target=all", *args])
    spec = TrainSpec(config=config, examples=[], base=tiny_model_dir, device="cpu")
    model = setup_model(spec, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model
