"""Held-out perplexity of a model (the base, or base + a stage=pt checkpoint) on raw-text
documents: exp of the mean next-token negative log-likelihood over every token the model
predicts, documents split into ``max_len`` windows. The classification metrics of SFT jobs do not
apply to a pre-training checkpoint; this is its score."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.datasets.raw_text import document_chunks, document_ids


def model_perplexity(
    base_dir: Path,
    checkpoint_dir: Path | None,
    documents: Sequence[str],
    *,
    adapter: bool,
    max_len: int,
) -> dict[str, Any]:
    """``{"perplexity", "documents", "tokens"}`` of the base model (``checkpoint_dir`` None), of
    base + a LoRA checkpoint (``adapter``), or of a whole-model (full/freeze) checkpoint; the
    tokenizer is always the base's (a whole-model checkpoint carries none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner import warm
    from runner.models import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model: Any
    if checkpoint_dir is not None and not adapter:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype).to(device)  # type: ignore[arg-type]
    else:  # in a warm worker: a copy of the resident base, not a reload
        model = warm.load(base_dir, dtype=dtype, attn_implementation=None, device=device)
        if checkpoint_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(checkpoint_dir)).to(device)
    try:
        return perplexity(model.eval(), load_tokenizer(base_dir), documents, max_len=max_len)
    finally:
        del model


def perplexity(
    model: Any, tokenizer: Any, documents: Sequence[str], *, max_len: int
) -> dict[str, Any]:
    import torch

    device = next(model.parameters()).device
    total_nll, tokens = 0.0, 0
    with torch.inference_mode():
        for document in documents:
            for chunk in document_chunks(document_ids(tokenizer, document), max_len, "split"):
                if len(chunk) < 2:
                    continue
                ids = torch.tensor([chunk], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                total_nll += float(
                    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                )
                tokens += len(chunk) - 1
    return {
        "perplexity": math.exp(total_nll / tokens) if tokens else None,
        "documents": len(documents),
        "tokens": tokens,
    }
