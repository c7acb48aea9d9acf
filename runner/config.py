"""Everything a user may set for a training job: one validated model, parsed from
``/finetune start lr=5e-6 grad_accum=2 …``, stored as JSON on the job row, and rendering the help
text. Defaults are LLaMA-Factory WebUI's. Setups vLLM cannot serve are refused here, at start, not at
promotion. Imports nothing heavy: the bot renders help and the start modal from it.

>>> parse_train_args(["lr=5e-6", "grad_accum=2", "loraplus=16"]).learning_rate
5e-06
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Keys users know from LLaMA-Factory/PEFT whose adapters vLLM cannot serve, with the reason.
REFUSED_KEYS = {
    "use_dora": "vLLM cannot serve DoRA adapters",
    "modules_to_save": "vLLM cannot serve adapters with modules_to_save (lm_head, embed_tokens)",
    "additional_target": "vLLM cannot serve adapters with extra trained modules",
    "lora_bias": "vLLM cannot serve adapters that train biases",
    "bias": "vLLM cannot serve adapters that train biases",
    "new_special_tokens": "training must not add tokens: vLLM serves the base model's vocabulary",
    "add_tokens": "training must not add tokens: vLLM serves the base model's vocabulary",
    "resize_vocab": "training must not resize the vocabulary: vLLM serves the base model's",
    "pissa_init": "vLLM cannot serve PiSSA-initialised adapters",
    "init_lora_weights": "vLLM serves only the default LoRA initialisation",
}


class TrainConfig(BaseModel):
    """A training job's hyperparameters. Field descriptions are the help text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["lora", "qlora", "freeze", "full"] = Field(
        "lora",
        description="lora; qlora (LoRA on a 4/8-bit base, GPU only); freeze (train the "
        "last N layers); full",
    )
    learning_rate: float = Field(5e-5, gt=0, le=1e-2, description="peak learning rate")
    num_train_epochs: float = Field(3.0, gt=0, le=100, description="passes over the train split")
    per_device_train_batch_size: int = Field(2, ge=1, le=256, description="samples per micro-batch")
    gradient_accumulation_steps: int = Field(
        8,
        ge=1,
        le=1024,
        description="micro-batches per optimizer step (samples per step = batch_size × grad_accum)",
    )
    cutoff_len: int = Field(
        2048,
        ge=16,
        le=32768,
        description="longest training sequence in tokens; longer samples are cut",
    )
    lora_rank: int = Field(
        8, description="LoRA rank: one of " + ", ".join(map(str, VLLM_LORA_RANKS))
    )
    lora_alpha: int | None = Field(None, ge=1, le=4096, description="LoRA alpha (default 2 × rank)")
    lora_dropout: float = Field(0.0, ge=0, le=0.5, description="dropout on the LoRA input")
    lora_target: str = Field(
        "all",
        description="'all' (every linear layer but the LM head) or a "
        "comma list of " + ", ".join(LORA_MODULES),
    )
    use_rslora: bool = Field(False, description="rank-stabilised LoRA scaling (alpha/√rank)")
    loraplus_lr_ratio: float = Field(
        0.0, ge=0, le=64, description="LoRA+: lora_B learns at lr × ratio (0 = off)"
    )
    quantization_bit: int | None = Field(
        None, description="4 or 8: base weights for qlora (default 4)"
    )
    freeze_trainable_layers: int = Field(
        2, ge=1, le=1000, description="freeze: how many last layers train"
    )
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule"
    )
    warmup_steps: int = Field(0, ge=0, le=100_000, description="linear warm-up steps")
    max_grad_norm: float = Field(1.0, ge=0, le=100, description="gradient clipping (0 = off)")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="seed for data order and init")
    max_samples: int = Field(
        100_000, ge=1, le=10_000_000, description="use at most this many train samples"
    )
    max_steps: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="stop after this many optimizer steps (0 = run all epochs)",
    )
    mix: str | None = Field(
        None,
        max_length=120,
        description="DATASET:SHARE: add SHARE x the train samples from another dataset's train "
        "split (general data against forgetting), e.g. mix=general-zh:0.2",
    )
    stage: Literal["sft", "pt"] = Field(
        "sft",
        description="sft: supervised fine-tuning on conversations (loss on the answer); pt: "
        "continued pre-training on a raw-text dataset (loss on every token)",
    )
    base: str | None = Field(
        None,
        max_length=40,
        description="checkpoint-N: start from a stage=pt checkpoint (its LoRA merged into the "
        "base weights) instead of the deployment's base model; stage=sft only",
    )
    long_docs: Literal["split", "truncate"] = Field(
        "split",
        description="stage=pt: a document longer than cutoff_len is split into cutoff_len "
        "chunks (split) or cut at cutoff_len (truncate)",
    )
    save_steps: int = Field(100, ge=1, le=1_000_000, description="checkpoint every N steps")
    logging_steps: int = Field(5, ge=1, le=1_000_000, description="progress event every N steps")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"lora_rank={self.lora_rank} is not a rank vLLM serves: use one of "
                + ", ".join(map(str, VLLM_LORA_RANKS))
            )
        self.lora_modules()  # validates lora_target
        if self.quantization_bit not in (None, 4, 8):
            raise ValueError(f"quantization_bit={self.quantization_bit} is not allowed: use 4 or 8")
        if self.quantization_bit is not None and self.method != "qlora":
            raise ValueError("quantization_bit is for method=qlora only")
        _ = self.mix_spec  # validates mix
        _ = self.base_checkpoint_id  # validates base
        if self.base is not None and self.stage != "sft":
            raise ValueError(
                f"base={self.base} is for stage=sft (an SFT job on a stage=pt checkpoint); a "
                "stage=pt job starts from the deployment's base model"
            )
        if self.stage == "pt" and self.mix is not None:
            raise ValueError("mix= mixes SFT data into stage=sft jobs; stage=pt cannot take it")
        return self

    @property
    def base_checkpoint_id(self) -> int | None:
        """``base=checkpoint-N`` as N."""
        if self.base is None:
            return None
        match = re.fullmatch(r"checkpoint-(\d+)", self.base.strip())
        if match is None:
            raise ValueError(
                f"base={self.base} is not checkpoint-N (a stage=pt checkpoint's id, as "
                "`/finetune checkpoints` lists it), for example base=checkpoint-7"
            )
        return int(match.group(1))

    @property
    def mix_spec(self) -> tuple[str, float] | None:
        """``mix`` as (dataset name, share of the train samples to add)."""
        if self.mix is None:
            return None
        name, sep, raw = self.mix.rpartition(":")
        try:
            share = float(raw)
        except ValueError:
            share = math.nan
        if not sep or not name.strip() or not 0 < share <= 1:
            raise ValueError(
                f"mix={self.mix} is not DATASET:SHARE with SHARE above 0 and at most 1 "
                "(for example mix=general-zh:0.2 adds a fifth as many samples from general-zh)"
            )
        return name.strip(), share

    @property
    def samples_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def effective_quantization_bit(self) -> int | None:
        return (self.quantization_bit or 4) if self.method == "qlora" else None

    def lora_modules(self) -> list[str]:
        if self.lora_target.strip() == "all":
            return list(LORA_MODULES)
        modules = [m.strip() for m in self.lora_target.split(",") if m.strip()]
        refused = [m for m in modules if m in ("lm_head", "embed_tokens")]
        if refused:
            raise ValueError(
                f"lora_target={self.lora_target}: vLLM cannot serve LoRA on "
                f"{', '.join(refused)}; use the linear layers (" + ", ".join(LORA_MODULES) + ")"
            )
        unknown = [m for m in modules if m not in LORA_MODULES]
        if unknown or not modules:
            raise ValueError(
                f"lora_target={self.lora_target}: unknown module "
                f"{', '.join(unknown) or '(none)'}; use 'all' or a comma list of "
                + ", ".join(LORA_MODULES)
            )
        return modules


ALIASES = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "epoch": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "bs": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "ga": "gradient_accumulation_steps",
    "cutoff": "cutoff_len",
    "rank": "lora_rank",
    "r": "lora_rank",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target": "lora_target",
    "loraplus": "loraplus_lr_ratio",
    "bits": "quantization_bit",
    "finetuning_type": "method",
    "trainable_layers": "freeze_trainable_layers",
    "scheduler": "lr_scheduler_type",
    "warmup": "warmup_steps",
    "grad_norm": "max_grad_norm",
    "steps": "max_steps",
}


def _canonical(key: str) -> str:
    key = key.strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def _bounds(name: str) -> str:
    field = TrainConfig.model_fields[name]
    parts = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    if get_origin(field.annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(field.annotation)))
    return " and ".join(parts)


def allowed_keys_text() -> str:
    by_field: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        by_field.setdefault(name, []).append(alias)
    return ", ".join(
        name + (f" ({'/'.join(by_field[name])})" if name in by_field else "")
        for name in TrainConfig.model_fields
    )


def help_lines() -> list[str]:
    """One line per setting: name, short aliases, default, allowed range, description."""
    by_field: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        by_field.setdefault(name, []).append(alias)
    lines = []
    for name, field in TrainConfig.model_fields.items():
        aliases = f" ({', '.join(by_field[name])})" if name in by_field else ""
        bounds = _bounds(name)
        default = "unset" if field.default is None else field.default
        lines.append(
            f"{name}{aliases} = {default}"
            + (f" [{bounds}]" if bounds else "")
            + f": {field.description}"
        )
    return lines


def parse_train_args(tokens: Iterable[str], base: dict[str, Any] | None = None) -> TrainConfig:
    """``["lr=5e-6", "grad_accum=2"]`` → TrainConfig; a clear ConfigError on any bad token."""
    values: dict[str, Any] = dict(base or {})
    seen: dict[str, str] = {}
    for token in tokens:
        key, sep, raw = token.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"`{token}` is not key=value (for example lr=5e-6)")
        name = _canonical(key)
        if name in REFUSED_KEYS:
            raise ConfigError(f"{key}: {REFUSED_KEYS[name]}")
        if name not in TrainConfig.model_fields:
            raise ConfigError(f"unknown setting `{key}`; allowed: {allowed_keys_text()}")
        if name in seen:
            raise ConfigError(f"`{key}` and `{seen[name]}` set the same setting {name}")
        seen[name] = key
        values[name] = None if raw.strip().lower() in ("", "none", "null") else raw.strip()
    return build_train_config(values, given=seen)


_TYPE_WORDS = {
    "float": "a number",
    "int": "a whole number",
    "bool": "true or false",
    "string": "text",
    "literal": "an allowed value",
}


def build_train_config(values: dict[str, Any], given: dict[str, str] | None = None) -> TrainConfig:
    given = given or {}
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        messages = []
        for error in exc.errors():
            loc = [str(x) for x in error["loc"]]
            if not loc:  # a model-level check: its message already names the setting
                messages.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            name = loc[0]
            shown = given.get(name, name)
            value = values.get(name)
            bounds = _bounds(name) if name in TrainConfig.model_fields else ""
            reason = str(error["msg"]).removeprefix("Value error, ")
            kind = str(error["type"])
            if kind.endswith("_parsing") or kind.endswith("_type"):
                expected = _TYPE_WORDS.get(kind.split("_")[0], "a valid value")
                messages.append(
                    f"{shown}={value} is not {expected}"
                    + (f"; {name} must be {bounds}" if bounds else "")
                )
            elif bounds:
                messages.append(f"{shown}={value} is not allowed: {name} must be {bounds}")
            else:
                messages.append(f"{shown}={value}: {reason}")
        raise ConfigError("; ".join(messages)) from exc
