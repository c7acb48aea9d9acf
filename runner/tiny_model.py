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
from pathlib import Path

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
