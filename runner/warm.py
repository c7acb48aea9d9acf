"""The warm worker's resident base model (``RUNNER_WARM_WORKER``).

A warm worker is a long-lived process per device slot that runs one job after another
(``runner.worker``). Its base model stays resident in host memory between jobs: the first job
loads it from disk as a fresh process would; every later job of the same base gets its own copy on
the device, made straight from the resident tensors (no reload, no parse, no second host copy).
Each job still builds a fresh adapter, optimizer and RNG state on its copy, so back-to-back jobs
train exactly as they would in fresh processes (tests/runner/test_warm_worker.py holds that), and
the device memory is the job's alone: it goes back when the job ends. Kernels compiled by Triton
and torch stay compiled in the process.

Outside a warm worker (``enable`` not called) nothing is kept: ``load`` is ``from_pretrained``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_enabled = False
_resident: dict[tuple[str, str], Any] = {}  # (path, dtype) → the model in host memory


def enable() -> None:
    global _enabled
    _enabled = True


def forget() -> None:
    _resident.clear()


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
    resident = _resident.get(key)
    if resident is None:
        if _resident:
            log.info("warm worker: a different base model; dropping the resident one")
            forget()
        resident = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        resident.eval()
        _resident[key] = resident
        log.info("warm worker: %s resident in host memory", path)
    else:
        log.info("warm worker: %s already resident: copied, not reloaded", path)
    model = device_copy(resident, device)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def device_copy(model: Any, device: Any) -> Any:
    """A deep copy of ``model`` whose parameters and buffers are copies on ``device`` (made from
    the originals directly: the host copy is never duplicated; tied weights stay tied)."""
    import torch

    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = torch.nn.Parameter(
                param.detach().to(device, copy=True), requires_grad=param.requires_grad
            )
    for buffer in model.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = buffer.detach().to(device, copy=True)
    return copy.deepcopy(model, memo)
