"""The warm worker's resident base model (``RUNNER_WARM_WORKER``).

A warm worker is a long-lived process per device slot that runs one job after another
(``runner.worker``). Its base model stays resident in host memory between jobs: the first job
loads it from disk as a fresh process would; every later job of the same base gets its own copy on
the device, made straight from the resident tensors (no reload, no parse, no second host copy).
Each job still builds a fresh adapter, optimizer and RNG state on its copy, so back-to-back jobs
train exactly as they would in fresh processes (tests/runner/test_warm_worker.py holds that), and
the device memory is the job's alone: it goes back when the job ends. Kernels compiled by Triton
and torch stay compiled in the process.

On a CUDA host the resident copy is moved to pinned (page-locked) host memory in a background
thread while the first job trains, when it fits in half the memory available: a copy to the GPU
from pinned memory runs at the bus's speed instead of through a staging buffer (a 7B: ~2.7 s
from pageable memory per copy, docs/benchmarks.md). The next ``load`` waits for that thread.

Outside a warm worker (``enable`` not called) nothing is kept: ``load`` is ``from_pretrained``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_enabled = False
_resident: dict[tuple[str, str], Any] = {}  # (path, dtype) → the model in host memory
_pinning: threading.Thread | None = None  # moving the resident model to pinned memory
_pin_tried: set[tuple[str, str]] = set()  # resident models pinned (or found not to fit) once


def enable() -> None:
    global _enabled
    _enabled = True


def forget() -> None:
    _wait_for_pinning()
    _resident.clear()
    _pin_tried.clear()


def _wait_for_pinning() -> None:
    global _pinning
    if _pinning is not None:
        _pinning.join()
        _pinning = None


def load(path: Path | str, *, dtype: Any, attn_implementation: str | None, device: Any) -> Any:
    """The base model at ``path`` on ``device``: from disk, or, in a warm worker, a copy of the
    resident one (loaded from disk the first time; one base model is kept)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not _enabled:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(device)
    key = (str(path), str(dtype))
    _wait_for_pinning()
    resident = _resident.get(key)
    if resident is None:
        if _resident:
            log.info("warm worker: a different base model; dropping the resident one")
            forget()
        started = time.perf_counter()
        resident = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        resident.eval()
        _resident[key] = resident
        log.info(
            "warm worker: %s resident in host memory (read in %.2f s)",
            path,
            time.perf_counter() - started,
        )
    else:
        log.info("warm worker: %s already resident: copied, not reloaded", path)
    started = time.perf_counter()
    model = device_copy(resident, device)
    log.info("warm worker: copied to %s in %.2f s", device, time.perf_counter() - started)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    if key not in _pin_tried:
        _pin_tried.add(key)
        _start_pinning(resident)
    return model


def _start_pinning(model: Any) -> None:
    """Pin ``model``'s tensors in a background thread (CUDA hosts, when it fits)."""
    global _pinning
    import torch

    if not torch.cuda.is_available():
        return
    size = sum(t.numel() * t.element_size() for t in _tensors(model))
    available = _memory_available()
    if available is not None and size > available // 2:
        log.info(
            "warm worker: the base (%.1f GB) is not pinned: %.1f GB of host memory are available",
            size / 1e9,
            available / 1e9,
        )
        return

    def pin() -> None:
        started = time.perf_counter()
        try:
            pin_tensors(model, lambda t: t.pin_memory())
            log.info(
                "warm worker: the resident base (%.1f GB) is in pinned memory (%.1f s)",
                size / 1e9,
                time.perf_counter() - started,
            )
        except RuntimeError as exc:  # page-locking refused: copies stay through pageable memory
            log.warning("warm worker: could not pin the resident base: %s", exc)

    _pinning = threading.Thread(target=pin, name="warm-pin", daemon=True)
    _pinning.start()


def pin_tensors(model: Any, pin: Callable[[Any], Any]) -> None:
    """Replace the storage of every parameter and buffer of ``model`` by ``pin(tensor)`` (shared
    tensors once, so tied weights stay tied)."""
    for tensor in _tensors(model):
        tensor.data = pin(tensor.data)


def _tensors(model: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_copy(model: Any, device: Any) -> Any:
    """A deep copy of ``model`` whose parameters and buffers are copies on ``device`` (made from
    the originals directly: the host copy is never duplicated; tied weights stay tied)."""
    import torch

    memo: dict[int, Any] = {}
    asynchronous = device is not None and torch.device(device).type == "cuda"  # pinned: async
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = torch.nn.Parameter(
                param.detach().to(device, copy=True, non_blocking=asynchronous),
                requires_grad=param.requires_grad,
            )
    for buffer in model.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = buffer.detach().to(device, copy=True, non_blocking=asynchronous)
    if asynchronous:
        torch.cuda.synchronize(device)
    return copy.deepcopy(model, memo)
