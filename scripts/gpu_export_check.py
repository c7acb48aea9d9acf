"""The quantized export path where bitsandbytes runs (a CUDA host), without the service stack:
the tiny model, a random LoRA adapter, then runner/export.py's own merge → quantize → verify for
a merged, an 8-bit and a 4-bit export. CI has no GPU; run this on one:

    python3 scripts/gpu_export_check.py --out DIR

Prints one JSON line per export (files, bytes, verification) and exits non-zero if one fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.protocol import Message, render_prompt
from runner.export import _quantize, merge_adapter, quantization_unavailable, save_tokenizer, verify
from runner.models import load_tokenizer
from runner.tiny_model import CORPUS, build_tiny_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if reason := quantization_unavailable():
        print(f"cannot check quantized exports here: {reason}", file=sys.stderr)
        return 2
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp())
    base = build_tiny_model(work / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter = work / "adapter"
    model.save_pretrained(str(adapter))
    del model
    tokenizer = load_tokenizer(base)
    headlines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    prompts = [render_prompt(tokenizer, [Message("user", h)]) for h in headlines if h][:40]
    failed = 0
    for bits in (None, 8, 4):
        out = work / f"export-{bits or 'merged'}"
        merged = out if bits is None else work / f"merged-{bits}"
        exact = merge_adapter(base, adapter, merged, "1MB") and bits is None
        if bits is not None:
            _quantize(merged, out, bits, "1MB")
            shutil.rmtree(merged)
        save_tokenizer(base, out)
        try:
            report = verify(base, adapter, out, prompts, [], 24, exact=exact, with_vllm=False)
        except Exception as exc:
            report = {"error": str(exc)}
            failed += 1
        config = json.loads((out / "config.json").read_text())
        row = {
            "bits": bits,
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "quantization": config.get("quantization_config", {}).get("quant_method"),
            "files": sorted(f.name for f in out.iterdir())[:6],
            "verification": report,
        }
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"export-{bits or 'merged'}.json").write_text(json.dumps(row, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
