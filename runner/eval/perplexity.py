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
    model_dir: Path, adapter_dir: Path | None, documents: Sequence[str], *, max_len: int
) -> dict[str, Any]:
    """``{"perplexity", "documents", "tokens"}`` of the model in ``model_dir`` (+ the adapter)."""
    from runner.eval.predict import TransformersPredictor

    predictor = TransformersPredictor(model_dir, adapter_dir, merge_adapter=False)
    try:
        return perplexity(predictor.model, predictor.tokenizer, documents, max_len=max_len)
    finally:
        del predictor


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
