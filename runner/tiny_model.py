"""A tiny Qwen2 model for tests and the demo: small dimensions, a byte-level BPE tokenizer trained
on the fly on real headlines (so Chinese text tokenizes sensibly) and a chat template in the
DeepSeek-R1-Distill style. Loadable by AutoModelForCausalLM/AutoTokenizer and vLLM.

Random weights by default (tests: fast); ``--pretrain`` (what ``BASE_MODEL=tiny`` builds on first
use) then pre-trains it for about a minute and a half on news headlines (``runner.tiny_pretrain``) so that a
LoRA job on the demo dataset learns, and writes what it learned from into ``provenance.json``.

    python -m runner.tiny_model OUT_DIR [--pretrain [--steps N]] [--corpus FILE] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.tiny_pretrain import PretrainPlan

log = logging.getLogger(__name__)

CORPUS = Path(__file__).with_name("assets") / "tokenizer_corpus.txt"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# As in DeepSeek-R1-Distill: <think> and </think> are added tokens but not special, so decoding
# with skip_special_tokens keeps them.
THINK_TOKENS = ("<think>", "</think>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}"
    "{{ eos_token }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

DIMENSIONS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 64: a size vLLM's CPU attention supports
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
}
VOCAB_SIZE = 4096


def train_tokenizer(corpus: Path, vocab_size: int = VOCAB_SIZE):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    lines = corpus.read_text(encoding="utf-8").splitlines()
    backend.train_from_iterator(lines, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=DIMENSIONS["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: Path,
    *,
    corpus: Path = CORPUS,
    seed: int = 0,
    pretrain: PretrainPlan | None = None,
) -> Path:
    """Write the model and tokenizer to ``out_dir`` (built in a temporary folder, then renamed):
    random weights, pre-trained by ``pretrain`` when given."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} already holds a model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus)
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = Qwen2Config(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="float32",
        **DIMENSIONS,  # type: ignore[arg-type]
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.do_sample = False
    provenance = None
    if pretrain is not None:
        from runner.tiny_pretrain import pretrain as run_pretraining

        provenance = run_pretraining(model, tokenizer, pretrain)
        provenance["rebuild"] = (
            f"python -m runner.tiny_model OUT_DIR --pretrain --steps {pretrain.steps} --seed {seed}"
        )
    kind = "tiny-random" if provenance is None else "tiny-pretrained"
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune_bot.json").write_text(
            json.dumps({"kind": kind, "seed": seed, "corpus": corpus.name}) + "\n"
        )
        if provenance is not None:
            (tmp / "provenance.json").write_text(
                json.dumps(provenance, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
            )
        if out_dir.exists():
            out_dir.rmdir()  # only an empty leftover folder; a model raises above
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("tiny model (%s) written to %s (vocab %d)", kind, out_dir, vocab)
    return out_dir


# --- Other model families (tests of the support matrix, docs/models.md) ---------------------------
#
# Each is the tiny tokenizer above (the same BPE, trained on the same corpus) with the family's own
# chat-template markers added as special tokens and the family's template as its chat template,
# and a random model of that architecture built from its transformers config class. ``qwen2`` is
# the tiny model above, unchanged (DeepSeek-R1-Distill's template on a Qwen2 model).

CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral's and Gemma's templates have no system role: a system message is put before the first
# user turn, as their own templates do.
MISTRAL = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' "
    "else '' %}"
    "{%- for message in messages if message['role'] != 'system' %}"
    "{%- if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{ message['content'] + eos_token }}{% endif %}"
    "{%- endfor %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' "
    "else '' %}"
    "{%- for message in messages if message['role'] != 'system' %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyFamily:
    """A model family's tiny build: its transformers config class and extra settings, its chat
    template and the special tokens that template uses (bos/eos/pad among them)."""

    config_class: str
    config: dict[str, Any]
    chat_template: str
    bos: str | None
    eos: str
    pad: str
    markers: tuple[str, ...] = ()  # other special tokens of the template


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}
TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen3": TinyFamily(
        "Qwen3Config",
        {"head_dim": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        CHATML,
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ("<|im_start|>",),
    ),
    "llama3": TinyFamily(
        "LlamaConfig",
        {"head_dim": 64, "rope_parameters": _LLAMA3_ROPE},
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        ("<|start_header_id|>", "<|end_header_id|>"),
    ),
    "mistral": TinyFamily(
        "MistralConfig",
        {
            "head_dim": 64,
            "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        MISTRAL,
        "<s>",
        "</s>",
        "<pad>",
        ("[INST]", "[/INST]"),
    ),
    "gemma3": TinyFamily(
        "Gemma3TextConfig",
        # Layer 0 attends within a sliding window shorter than the test samples, layer 1 fully
        # (Gemma 3's pattern is five sliding layers to one full one).
        {
            "head_dim": 64,
            "query_pre_attn_scalar": 64,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        GEMMA,
        "<bos>",
        "<end_of_turn>",
        "<pad>",
        ("<start_of_turn>",),
    ),
}
FAMILY_NAMES = ("qwen2", *TINY_FAMILIES)


def family_tokenizer(family: str, corpus: Path = CORPUS) -> Any:
    """The tiny tokenizer with ``family``'s template markers as special tokens and its chat
    template."""
    spec = TINY_FAMILIES[family]
    tokenizer = train_tokenizer(corpus)
    named = {"eos_token": spec.eos, "pad_token": spec.pad}
    if spec.bos is not None:
        named["bos_token"] = spec.bos
    tokenizer.add_special_tokens(named | {"additional_special_tokens": list(spec.markers)})
    if spec.bos is None:
        tokenizer.bos_token = None
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def build_tiny_family_model(out_dir: Path, family: str, *, seed: int = 0) -> Path:
    """A tiny random model of ``family`` (one of ``FAMILY_NAMES``) in ``out_dir``: the dimensions
    of the tiny Qwen2 model, the family's architecture and chat template. ``qwen2`` is
    ``build_tiny_model`` itself."""
    if family == "qwen2":
        return build_tiny_model(out_dir, seed=seed)
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown model family {family!r}: one of {', '.join(FAMILY_NAMES)}")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} already holds a model")
    spec = TINY_FAMILIES[family]
    tokenizer = family_tokenizer(family)
    config = getattr(transformers, spec.config_class)(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
        **{**DIMENSIONS, **spec.config},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "finetune_bot.json").write_text(
        json.dumps({"kind": "tiny-random", "family": family, "seed": seed}) + "\n"
    )
    log.info("tiny %s model written to %s", family, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.tiny_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain", action="store_true", help="pre-train on news headlines (the demo's base)"
    )
    parser.add_argument(
        "--steps", type=int, default=PretrainPlan.steps, help="pre-training steps (--pretrain)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = PretrainPlan(steps=args.steps, seed=args.seed) if args.pretrain else None
    build_tiny_model(args.out_dir, corpus=args.corpus, seed=args.seed, pretrain=plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
