"""Greedy batch prediction: vLLM when installed (the adapter through ``LoRARequest``), else batched
transformers ``generate`` with left padding. Both decode greedily, so scores do not move between
runs, and both report whether each answer ended (end of sequence) or hit ``max_new_tokens``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool  # False: cut at max_new_tokens


class Predictor(Protocol):
    backend: str

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[Generation]: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_predictor(
    model_dir: Path, adapter_dir: Path | None, *, backend: str = "auto", max_model_len: int = 2048
) -> Predictor:
    """``backend``: auto (vLLM when installed), vllm or transformers."""
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"unknown prediction backend {backend!r}: use auto, vllm or transformers")
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        return VllmPredictor(model_dir, adapter_dir, max_model_len=max_model_len)
    return TransformersPredictor(model_dir, adapter_dir)


class TransformersPredictor:
    backend = "transformers"

    def __init__(
        self,
        model_dir: Path,
        adapter_dir: Path | None,
        *,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: Any = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        config = model_dir / "config.json"
        quantized = config.exists() and "quantization_config" in json.loads(config.read_text())
        kwargs: dict[str, Any] = {"device_map": {"": self.device.index or 0}} if quantized else {}
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kwargs)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = (model if quantized else model.to(self.device)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.batch_size = batch_size or (128 if self.device.type == "cuda" else 32)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[Generation]:
        outputs = generate_batched(
            self.model,
            prompts,
            max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_id,
            batch_size=self.batch_size,
            device=self.device,
        )
        results = []
        for new, finished in outputs:
            text = str(self.tokenizer.decode(new, skip_special_tokens=True))
            if not finished:  # a character cut in half at the limit: drop it, as vLLM does
                text = text.rstrip("\ufffd")
            results.append(Generation(text, finished))
        return results


def generate_batched(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int,
    device: Any,
    min_new_tokens: int = 0,
) -> list[tuple[list[int], bool]]:
    """Greedy ``generate`` over ``prompts`` in batches of similar length, left-padded so every
    prompt ends at the same column. Returns each answer's token ids (up to, not including, the
    end-of-sequence token) and whether it ended by itself."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    results: dict[int, tuple[list[int], bool]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                use_cache=True,
            )
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            finished = eos_token_id is not None and eos_token_id in new
            if finished:
                new = new[: new.index(eos_token_id)]
            results[i] = (new, finished)
    return [results[i] for i in range(len(prompts))]


class VllmPredictor:
    """vLLM's offline engine in this process. On CPU it runs in-process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) with a small KV cache; only adapter requests or only base
    requests are ever in one batch (mixed batches are wrong on vLLM-CPU)."""

    backend = "vllm"

    def __init__(self, model_dir: Path, adapter_dir: Path | None, *, max_model_len: int) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        # vLLM's own logging setup writes to stdout; let the process's logging (stderr) take it.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": "bfloat16" if on_gpu else "float32",
            "max_model_len": max_model_len,
            "enforce_eager": not on_gpu,
            "seed": 0,
        }
        if on_gpu:
            kwargs["gpu_memory_utilization"] = 0.85
        else:
            kwargs["kv_cache_memory_bytes"] = 256 << 20
        self.lora_request = None
        if adapter_dir is not None:
            import json

            from vllm.lora.request import LoRARequest

            rank = int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=max(rank, 8))
            self.lora_request = LoRARequest("adapter", 1, str(adapter_dir))
        self.llm = LLM(**kwargs)

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True
        )
        requests: Any = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(
            requests, params, lora_request=self.lora_request, use_tqdm=False
        )
        return [
            Generation(o.outputs[0].text, o.outputs[0].finish_reason == "stop") for o in outputs
        ]
