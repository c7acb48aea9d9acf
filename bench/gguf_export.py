"""Size and time of each GGUF export type (runner/export_gguf.py) on a model shape, random weights:
writing the file (F16, Q8_0, Q4_0 with gguf's numpy quantizers) and reading it back with
transformers (what the export's verification does before it answers the eval prompts).

    python bench/gguf_export.py --shape 7b --out /big/disk     # the DeepSeek-R1-Distill-Qwen-7B shape
    python bench/gguf_export.py --shape tiny                   # a CPU smoke run

The tokenizer is the tiny model's (built on the fly): it is padded to the shape's vocabulary as a
real one would be, so the file's size is the weights' plus a few MB. Prints one JSON line a type.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner.export_gguf import GGUF_FILE, QUANTS, write_gguf

# The 7B shape is bench/train_throughput.py's; "tiny" is the tiny model's own config, as built.
SHAPES = ("7b", "tiny")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="a folder with room for the files")
    parser.add_argument("--quants", nargs="*", default=list(QUANTS))
    parser.add_argument("--no-read", action="store_true", help="skip the transformers read-back")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-", dir=args.out))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from runner.models import load_tokenizer
    from runner.tiny_model import build_tiny_model

    tiny = build_tiny_model(work / "tiny")
    tokenizer = load_tokenizer(tiny)
    if args.shape == "tiny":
        config = Qwen2Config.from_pretrained(tiny)
    else:
        from train_throughput import SHAPES as TRAIN_SHAPES

        config = Qwen2Config(
            **TRAIN_SHAPES[args.shape],
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    started = time.perf_counter()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"shape": args.shape, "parameters": parameters, "build_s": _since(started)}))
    for quant in args.quants:
        out = work / quant
        out.mkdir()
        started = time.perf_counter()
        types = write_gguf(model, tokenizer, tiny, out / GGUF_FILE, quant, name="bench")
        row = {
            "quant": quant,
            "bytes": (out / GGUF_FILE).stat().st_size,
            "bytes_per_parameter": round((out / GGUF_FILE).stat().st_size / parameters, 3),
            "write_s": _since(started),
            "tensor_types": types,
        }
        if not args.no_read:
            started = time.perf_counter()
            read = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=GGUF_FILE)
            row["transformers_read_s"] = _since(started)
            del read
        print(json.dumps(row), flush=True)
        (out / GGUF_FILE).unlink()
    return 0


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


if __name__ == "__main__":
    raise SystemExit(main())
