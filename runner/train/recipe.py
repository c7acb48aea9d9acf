"""The training recipe: small ``setup_*`` builders, then one explicit loop.

What a step does: the samples of one optimizer step (batch_size × grad_accum of them) are packed into
variable-length sequences (``packing.pack_step``); the LM head runs only on answer positions; the
loss is summed over answer tokens and divided by the answer tokens of the whole step, so packing and
micro-batching give exactly the gradient of the unpacked per-token mean. bf16 on GPU with fp32
master copies of the trainable weights (a 5e-6 update vanishes in bf16 rounding), fp32 on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.errors import FinetuneError
from core.protocol import TrainingExample
from runner.config import TrainConfig
from runner.train import attention, families, memory
from runner.train.packing import PackedBatch, Schedule, micro_batch_sizes, pack_step, truncate

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"


class TrainingFailed(FinetuneError):
    code = "training_failed"


@dataclass
class TrainHooks:
    """How the recipe talks to the outside world; every hook is optional."""

    # Called every logging step and at the end; returns False to stop (cancel).
    on_progress: Callable[[dict[str, Any]], bool] = lambda progress: True
    # Polled after every step; True stops the run after saving a checkpoint.
    should_stop: Callable[[], bool] = lambda: False
    # Yields an empty directory to write checkpoint ``step`` into; what it does on exit (rename,
    # register) is the caller's business. None: checkpoints are not written.
    checkpoint_dir: Callable[[int, bool], AbstractContextManager[Path]] | None = None
    # Called after a checkpoint directory was completed.
    on_checkpoint: Callable[[int, bool, Path], None] = lambda step, final, path: None
    # Called once before the first step with the step resumed from (None: from the start).
    on_start: Callable[[int | None], None] = lambda resumed_from_step: None
    # Called before the first step with what the job's thread should be told about how it
    # trains (the architecture keeps it off the fused layers: ``families.training_path_note``).
    on_note: Callable[[str], None] = lambda message: None


@dataclass
class TrainSpec:
    config: TrainConfig
    examples: Sequence[TrainingExample]
    base: Path | Any  # a model directory, or a transformers config for random weights (benchmarks)
    meta: dict[str, Any] = field(default_factory=dict)  # written into each checkpoint's meta.json
    # Checkpoints to resume from, newest first: the first that loads is used (``load_checkpoint``).
    # A single Path (or None) is taken as a one-element (empty) list.
    resume_from: Sequence[Path] | Path | None = ()
    device: str | None = None  # default: cuda when available
    token_budget: int = 16384  # most tokens in one packed micro-batch
    gradient_checkpointing: bool = False
    compile_layers: bool = False  # torch.compile each decoder layer (GPU; fewer launches)
    cuda_graphs: bool = False  # replay decoder layers as CUDA graphs (GPU LoRA; see graphs.py)

    def __post_init__(self) -> None:
        if self.resume_from is None:
            self.resume_from = ()
        elif isinstance(self.resume_from, Path | str):
            self.resume_from = (Path(self.resume_from),)
        else:
            self.resume_from = tuple(Path(p) for p in self.resume_from)

    @property
    def resume_candidates(self) -> tuple[Path, ...]:
        assert isinstance(self.resume_from, tuple)  # normalised by __post_init__
        return self.resume_from


@dataclass
class TrainResult:
    status: str  # completed | stopped
    step: int
    total_steps: int
    losses: list[float]
    tokens: int
    seconds: float
    checkpoint: Path | None
    peak_memory_bytes: int | None = None
    resumed_from_step: int | None = None  # None: this attempt started from step 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def setup_device(spec: TrainSpec) -> tuple[torch.device, torch.dtype]:
    name = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if spec.config.method == "qlora" and device.type != "cuda":
        raise TrainingFailed(
            "method=qlora needs a CUDA GPU with bitsandbytes; use method=lora on this machine"
        )
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def setup_model(spec: TrainSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    impl = attention.register()
    config = spec.config
    torch.manual_seed(config.seed)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": impl}
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        bits = config.effective_quantization_bit
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0}
    if isinstance(spec.base, Path | str) and config.method != "qlora":
        from runner import warm

        model = warm.load(spec.base, dtype=dtype, attn_implementation=impl, device=device)
    elif isinstance(spec.base, Path | str):
        model = AutoModelForCausalLM.from_pretrained(str(spec.base), **kwargs)
    else:  # a config: random weights, built directly on the device
        base_config = (
            spec.base if not isinstance(spec.base, dict) else AutoConfig.for_model(**spec.base)
        )
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                base_config, dtype=dtype, attn_implementation=impl
            )
    if config.method != "qlora":
        model.to(device)  # type: ignore[arg-type]
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(config.seed)  # the adapter's init: the same however the base was loaded
    trainable = apply_method(model, config)
    if spec.compile_layers:
        for layer in decoder_layers(trainable):
            layer.compile(dynamic=True)
    return trainable


def graphs_off_reason(
    spec: TrainSpec, device: torch.device, *, varlen_kernel: bool, model_config: Any = None
) -> str | None:
    """Why this job trains without the CUDA-graphed decoder (None: it uses it). ``varlen_kernel``:
    whether torch's varlen attention kernel is there (``attention.varlen_kernel_available``):
    without it attention reads ``cu_seqlens`` back to the host, which capture forbids.
    ``model_config``: the model's, whose architecture may keep it off graphs
    (``families.graphs_refusal``)."""
    if not spec.cuda_graphs:
        return "CUDA graphs are turned off (RUNNER_CUDA_GRAPHS=false)"
    if device.type != "cuda":
        return f"CUDA graphs need a GPU (training on {device.type})"
    if spec.config.method != "lora":
        return f"CUDA graphs apply to method=lora, not method={spec.config.method}"
    if spec.gradient_checkpointing:
        return "CUDA graphs do not apply with gradient checkpointing"
    if spec.compile_layers:
        return "CUDA graphs do not apply with per-layer torch.compile (RUNNER_COMPILE=true)"
    if not varlen_kernel:
        return attention.varlen_missing_reason()
    if model_config is not None:
        return families.graphs_refusal(model_config)
    return None


def check_architecture(model: torch.nn.Module, config: TrainConfig) -> str | None:
    """Refuse an architecture packed training cannot compute; otherwise the note for the job's
    thread when the architecture keeps it off the fused layers (logged too), else None. Said on
    every device: the path is the architecture's, whichever machine runs the job. An
    architecture outside the support matrix (docs/models.md) is first probed: packed samples
    must compute what each computes alone (``packing_error``)."""
    from runner.models import SUPPORT_MATRIX

    model_config = causal_lm(model).config
    refusal = families.packed_training_refusal(model_config)
    if refusal is None and not set(model_config.architectures or ()) & {
        row.architecture for row in SUPPORT_MATRIX
    }:
        error = packing_error(model)
        if error > PACKING_TOLERANCE:
            refusal = (
                f"{model_config.model_type} is not in the support matrix and its layers do not "
                f"keep packed samples apart (a probe of two packed samples differs from the "
                f"samples alone by {error:.2g}, relative): training would mix samples"
            )
        else:
            log.info("%s passed the packing probe (%.2g)", model_config.model_type, error)
    if refusal is not None:
        raise TrainingFailed(
            f"cannot train this base model: {refusal}. Choose a base model of a family in "
            "docs/models.md"
        )
    note = families.training_path_note(model_config) if config.method == "lora" else None
    if note is not None:
        log.info("%s", note)
    return note


# Above bf16 rounding of logits (~1e-2 relative at worst), far below what attention across
# samples gives (~1).
PACKING_TOLERANCE = 0.05


def packing_error(model: torch.nn.Module) -> float:
    """The relative difference between the logits of two random samples packed into one
    sequence (``packing.pack``: what every training step runs) and of each run alone."""
    from runner.train.packing import pack

    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, lm.config.vocab_size, (n,), generator=generator) for n in (7, 11)]
    batch = pack([TrainingExample(t.tolist(), 1) for t in ids]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = {k: v for k, v in batch.model_inputs().items() if k != "logits_to_keep"}
            packed = model(**inputs).logits[0].float()
            alone = torch.cat([model(input_ids=t[None].to(device)).logits[0] for t in ids]).float()
    finally:
        model.train(was_training)
    return float((packed - alone).norm() / alone.norm().clamp_min(1e-12))


def setup_graphs(spec: TrainSpec, model: torch.nn.Module, device: torch.device) -> Any:
    """The CUDA-graphed decoder (``graphs.GraphedDecoder``: fused layers replayed as CUDA graphs)
    where it applies, else None (eager steps; the reason is logged)."""
    varlen = attention.varlen_kernel_available()
    config = causal_lm(model).config
    reason = graphs_off_reason(spec, device, varlen_kernel=varlen, model_config=config)
    if reason is not None:
        if spec.cuda_graphs:  # asked for and not possible: say why, once per job
            degraded = device.type == "cuda" and not varlen  # a GPU stack without the kernel
            log.log(logging.WARNING if degraded else logging.INFO, "%s: training eagerly", reason)
        return None
    from runner.train.graphs import GraphedDecoder

    return GraphedDecoder(model, spec.config.samples_per_step)


def causal_lm(model: torch.nn.Module) -> Any:
    """The transformers causal LM inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]


def decoder_layers(model: torch.nn.Module) -> Any:
    """The decoder layer list of a (possibly PEFT-wrapped) causal LM."""
    return causal_lm(model).model.layers


def apply_method(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """LoRA/QLoRA adapters, the last N layers (freeze) or everything (full) made trainable."""
    if config.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.effective_lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_modules(),
            use_rslora=config.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        # Keep adapter weights in the model's dtype: PEFT's fp32 upcast costs ~1.5× on GPU, and
        # the optimizer keeps fp32 master copies anyway.
        return get_peft_model(model, lora, autocast_adapter_dtype=False)
    for param in model.parameters():
        param.requires_grad_(config.method == "full")
    if config.method == "freeze":
        for layer in decoder_layers(model)[-config.freeze_trainable_layers :]:
            for param in layer.parameters():
                param.requires_grad_(True)
    return model


class MasterWeights:
    """fp32 copies of trainable low-precision parameters: the optimizer steps the copies, the
    model's bf16 weights are refreshed from them. Identity for fp32 parameters. Copies go through
    ``torch._foreach_copy_``: one launch per direction instead of one per tensor (a 7B LoRA has
    392 adapter tensors).

    ``keep_grads``: the model's gradient tensors are allocated once and zeroed in place between
    steps, never set to None. CUDA graphs need it (``setup_masters``): a graphed backward returns
    the graph's own static gradient buffers, and autograd *adopts* such a tensor as ``param.grad``
    when that is None, so the next replay (the step's next micro-batch in the same bucket)
    overwrites the gradient before autograd adds its own into it: 2 × the last micro-batch instead
    of the sum (pytorch/pytorch#181723). Costs a gradient per trainable weight between steps
    (memory.py counts one): nothing for LoRA; full fine-tuning is never graphed."""

    def __init__(self, params: list[torch.nn.Parameter], *, keep_grads: bool = False) -> None:
        self.params = params
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
            for p in params
        ]
        pairs = [(m, p) for m, p in zip(self.masters, params, strict=True) if m is not p]
        self._low = [p for _, p in pairs]
        self._high = [m for m, _ in pairs]
        self.mixed = bool(pairs)
        self.keep_grads = keep_grads
        if keep_grads:
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)

    def grads_to_masters(self) -> None:
        """The step's gradients into the masters' ``.grad``; the model's are cleared for the next
        step (zeroed in place with ``keep_grads``, else set to None)."""
        if not self.mixed:
            return
        grads = [p.grad for p in self._low]
        if any(g is None for g in grads):  # a parameter the step did not reach
            for master, param in zip(self._high, self._low, strict=True):
                master.grad = None if param.grad is None else param.grad.float()
        else:
            if any(m.grad is None for m in self._high):
                for master in self._high:
                    master.grad = torch.zeros_like(master)
            torch._foreach_copy_([m.grad for m in self._high], grads)  # type: ignore[misc, arg-type]
        if self.keep_grads:
            torch._foreach_zero_(grads)  # type: ignore[arg-type]  # allocated since __init__
        else:
            for param in self._low:
                param.grad = None

    def zero_grad(self) -> None:
        """After the optimizer step: the masters' gradients cleared for the next step. Mixed:
        zeroed in place (the fp32 buffers are reused every step); fp32 parameters (the masters are
        the parameters): zeroed in place with ``keep_grads``, else set to None."""
        in_place = self.mixed or self.keep_grads
        grads = [m.grad for m in self.masters if m.grad is not None]
        if in_place:
            torch._foreach_zero_(grads)  # type: ignore[arg-type]
        else:
            for master in self.masters:
                master.grad = None

    def masters_to_params(self) -> None:
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self._low, self._high)  # type: ignore[arg-type]


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def setup_masters(named: list[tuple[str, torch.nn.Parameter]], graphed: Any) -> MasterWeights:
    """The master weights; under CUDA graphs (``graphed`` not None) the model's gradients stay
    allocated and are zeroed in place (``MasterWeights``: a graphed backward must never find
    ``param.grad`` None)."""
    return MasterWeights([p for _, p in named], keep_grads=graphed is not None)


def setup_optimizer(
    named: list[tuple[str, torch.nn.Parameter]],
    masters: MasterWeights,
    config: TrainConfig,
    device: torch.device,
) -> torch.optim.Optimizer:
    """AdamW; with LoRA+ the lora_B matrices form their own group at lr × ratio."""
    ratio = config.loraplus_lr_ratio
    groups: list[dict[str, Any]] = [{"params": [], "lr": config.learning_rate, "name": "default"}]
    if ratio > 0:
        groups.append({"params": [], "lr": config.learning_rate * ratio, "name": "lora_B"})
    for (name, _), master in zip(named, masters.masters, strict=True):
        groups[1 if ratio > 0 and "lora_B" in name else 0]["params"].append(master)
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.0, fused=fused)


def setup_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
    )


def step_loss(
    model: torch.nn.Module,
    batches: Sequence[PackedBatch],
    logits_of: Callable[[PackedBatch], torch.Tensor] | None = None,
    *,
    loss_chunk: int = 0,
) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step; returns the step's
    mean per-answer-token loss and its answer-token count. ``logits_of`` gives a micro-batch's
    logits at its answer positions (default: the model's own forward). ``loss_chunk`` > 0 computes
    the LM head and loss over that many answer positions at a time (``chunked_cross_entropy``)."""
    total, answer_tokens = _step_loss(model, batches, logits_of, loss_chunk=loss_chunk)
    return float(total), answer_tokens


def _step_loss(
    model: torch.nn.Module,
    batches: Sequence[PackedBatch],
    logits_of: Callable[[PackedBatch], torch.Tensor] | None,
    *,
    loss_chunk: int = 0,
) -> tuple[torch.Tensor, int]:
    """``step_loss`` with the loss left on the device: reading it back waits for the GPU, so the
    loop reads a window of losses at once instead of once per step."""
    answer_tokens = sum(int(b.targets.numel()) for b in batches)
    total = torch.zeros((), device=batches[0].input_ids.device)
    if answer_tokens == 0:
        return total, 0
    for batch in batches:
        if loss_chunk > 0 and logits_of is None:
            summed = chunked_cross_entropy(
                answer_hidden(model, batch), causal_lm(model).lm_head, batch.targets, loss_chunk
            )
        else:
            logits = logits_of(batch) if logits_of else model(**batch.model_inputs()).logits[0]
            summed = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
        loss = summed / answer_tokens
        loss.backward()
        total += loss.detach()
    return total, answer_tokens


def accumulate_step(
    model: torch.nn.Module,
    batches: Sequence[PackedBatch],
    logits_of: Callable[[PackedBatch], torch.Tensor] | None,
    masters: MasterWeights,
    *,
    loss_chunk: int = 0,
) -> tuple[torch.Tensor, int]:
    """One optimizer step's forward and backward (``_step_loss``), its gradient left in the
    masters' ``.grad`` for ``optimizer_step``; returns the loss (on the device) and the answer
    tokens."""
    loss, answer_tokens = _step_loss(model, batches, logits_of, loss_chunk=loss_chunk)
    masters.grads_to_masters()
    return loss, answer_tokens


def optimizer_step(
    masters: MasterWeights,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> None:
    """Clip, step the masters, clear their gradients, refresh the model's weights, advance the
    learning rate."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(masters.masters, max_grad_norm)
    optimizer.step()
    masters.zero_grad()
    masters.masters_to_params()
    scheduler.step()


def chunked_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, ``chunk`` rows at a time,
    each chunk's logits recomputed in the backward instead of kept: a 7B's float32 logits over
    ~700 answer tokens are ~1.3 GB with their gradients, a 256-row chunk's ~0.2 GB. Costs one
    more LM-head GEMM per step; used with gradient checkpointing (QLoRA), which makes the same
    trade."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = checkpoint(
            _cross_entropy_sum,
            hidden[start : start + chunk],
            head,
            targets[start : start + chunk],
            use_reentrant=False,
        )
        total = total + part
    return total


def _cross_entropy_sum(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def answer_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The final hidden states (after the last norm) at ``batch.logit_positions``, (A, hidden)."""
    inputs = {k: v for k, v in batch.model_inputs().items() if k != "logits_to_keep"}
    return causal_lm(model).model(**inputs).last_hidden_state[0, batch.logit_positions]  # type: ignore[no-any-return]


@dataclass
class CheckpointSnapshot:
    """What a checkpoint holds, copied off the live tensors (on the CPU) so that it can be written
    while training goes on. ``weights``: the adapter's state dict for a LoRA model (None: a whole
    model, written from the model itself, in the loop's thread)."""

    step: int
    final: bool
    weights: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    meta: dict[str, Any]


def snapshot_checkpoint(
    *,
    model: torch.nn.Module,
    step: int,
    final: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    masters: MasterWeights,
    named: list[tuple[str, torch.nn.Parameter]],
    meta: dict[str, Any],
    losses: list[float],
) -> CheckpointSnapshot:
    """Copy everything a checkpoint holds to the CPU now (the loop changes it next step)."""
    adapter = hasattr(model, "peft_config")
    weights = (
        {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if "lora_" in k}
        if adapter
        else None
    )
    state = {
        "step": step,
        "trainable": {
            name: m.detach().float().cpu().clone()
            for (name, _), m in zip(named, masters.masters, strict=True)
        },
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "losses": list(losses),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    return CheckpointSnapshot(step, final, weights, state, {**meta, "step": step, "final": final})


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def write_checkpoint(directory: Path, model: torch.nn.Module, snapshot: CheckpointSnapshot) -> None:
    """Write a snapshot into ``directory``: the adapter in PEFT's format (or the whole model),
    ``training_state.pt``, ``meta.json``. With adapter weights in the snapshot, nothing of the
    live model is read but its configuration: safe beside the training loop."""
    if snapshot.weights is not None:
        model.save_pretrained(str(directory), state_dict=snapshot.weights)  # type: ignore[operator]
    else:
        model.save_pretrained(str(directory))  # type: ignore[operator]
    torch.save(snapshot.state, directory / STATE_FILE)
    (directory / "meta.json").write_text(
        json.dumps(snapshot.meta, ensure_ascii=False, indent=2) + "\n"
    )


class CheckpointWriter:
    """Adapter checkpoints written in a background thread while the next steps train (a 7B's
    LoRA checkpoint is ~250 MB with its optimizer state), at most one in flight; whole models are
    written in the loop's own thread. The hooks' ``checkpoint_dir`` (the artifact store's staged
    directory: fsynced, then renamed) runs in the writer; ``on_checkpoint`` (registration) runs
    in the loop's thread once the files are on disk, at the next ``collect``."""

    def __init__(self, model: torch.nn.Module, hooks: TrainHooks) -> None:
        self.model = model
        self.hooks = hooks
        self._thread: threading.Thread | None = None
        self._done: list[tuple[int, bool, Path]] = []
        self._error: BaseException | None = None
        self.newest: Path | None = None

    def submit(self, snapshot: CheckpointSnapshot) -> None:
        self.wait()
        if snapshot.weights is None:
            self._write(snapshot)
            self.collect()
            return
        self._thread = threading.Thread(
            target=self._write, args=(snapshot,), name=f"checkpoint-{snapshot.step}", daemon=True
        )
        self._thread.start()

    def _write(self, snapshot: CheckpointSnapshot) -> None:
        assert self.hooks.checkpoint_dir is not None
        try:
            with self.hooks.checkpoint_dir(snapshot.step, snapshot.final) as directory:
                write_checkpoint(directory, self.model, snapshot)
            self._done.append((snapshot.step, snapshot.final, directory))
        except BaseException as exc:
            self._error = exc

    def wait(self) -> None:
        """The write in flight is on disk (and registered); re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.collect()

    def collect(self) -> Path | None:
        """Register what finished writing; the newest directory registered now, if any."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        newest = None
        while self._done:
            step, final, directory = self._done.pop(0)
            self.hooks.on_checkpoint(step, final, directory)
            newest = self.newest = directory
        return newest


class CheckpointUnusable(Exception):
    """A checkpoint this job cannot resume from; the message says why."""


STATE_KEYS = ("step", "trainable", "optimizer", "scheduler", "losses", "rng")


def read_checkpoint(
    directory: Path, *, masters: MasterWeights, named: list[tuple[str, torch.nn.Parameter]]
) -> dict[str, Any]:
    """The training state in ``directory``, checked against this job (file there and whole, every
    trainable weight with its shape, the weights files readable) before anything is changed."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointUnusable(f"{STATE_FILE} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or corrupt file fails in many ways inside torch.load
        raise CheckpointUnusable(
            f"{STATE_FILE} does not load ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointUnusable(f"{STATE_FILE} is not a training state (it has {have})")
    saved = state["trainable"]
    names = [name for name, _ in named]
    if set(saved) != set(names):
        missing, unknown = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise CheckpointUnusable(
            f"its trainable weights are not this job's ({len(missing)} missing, e.g. "
            f"{missing[:1]}; {len(unknown)} unknown, e.g. {unknown[:1]})"
        )
    for name, master in zip(names, masters.masters, strict=True):
        if tuple(saved[name].shape) != tuple(master.shape):
            raise CheckpointUnusable(
                f"{name} has shape {tuple(saved[name].shape)} there, {tuple(master.shape)} in "
                "this job"
            )
    _check_weight_files(directory)
    return state


def _check_weight_files(directory: Path) -> None:
    """The model/adapter weights ``save_pretrained`` wrote are there and their headers whole (a
    truncated safetensors file fails here; the tensors are not read)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointUnusable("it has no weights file (*.safetensors)")
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointUnusable(f"{file.name} is unreadable ({exc})") from exc


def load_checkpoint(
    directory: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    masters: MasterWeights,
    named: list[tuple[str, torch.nn.Parameter]],
) -> tuple[int, list[float]]:
    """Resume from ``directory``: the weights, optimizer, scheduler and RNG states it saved;
    returns (step, losses so far). Raises ``CheckpointUnusable`` with everything as it was when
    the checkpoint does not load or does not fit this job."""
    state = read_checkpoint(directory, masters=masters, named=named)
    before = (
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(scheduler.state_dict()),
        torch.get_rng_state(),
        random.getstate(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, losses = int(state["step"]), [float(x) for x in state["losses"]]
    except Exception as exc:  # any part that does not fit: put back what was there
        optimizer.load_state_dict(before[0])
        scheduler.load_state_dict(before[1])
        torch.set_rng_state(before[2])
        random.setstate(before[3])
        if before[4] is not None:
            torch.cuda.set_rng_state_all(before[4])
        raise CheckpointUnusable(
            f"its optimizer, scheduler or RNG state does not fit this job "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    with torch.no_grad():  # last: the shapes were checked, so nothing here fails half-way
        for (name, param), master in zip(named, masters.masters, strict=True):
            master.copy_(state["trainable"][name].to(master.device))
            if master is not param:
                param.copy_(master)
    return step, losses


def resume(
    candidates: Sequence[Path],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    masters: MasterWeights,
    named: list[tuple[str, torch.nn.Parameter]],
) -> tuple[int | None, list[float]]:
    """The first of ``candidates`` (newest first) that loads: (its step, its losses); (None, [])
    when none does (the job starts over). Each one skipped is logged with the reason."""
    for directory in candidates:
        try:
            step, losses = load_checkpoint(
                directory, optimizer=optimizer, scheduler=scheduler, masters=masters, named=named
            )
        except CheckpointUnusable as exc:
            log.warning("not resuming from checkpoint %s: %s", directory, exc)
            continue
        log.info("resumed from %s at step %d", directory, step)
        return step, losses
    if candidates:
        log.warning(
            "none of the %d checkpoints could be resumed from: training from the start",
            len(candidates),
        )
    return None, []


def train(spec: TrainSpec, hooks: TrainHooks | None = None) -> TrainResult:
    hooks = hooks or TrainHooks()
    config = spec.config
    device, dtype = setup_device(spec)
    examples = [truncate(e, config.cutoff_len) for e in spec.examples[: config.max_samples]]
    if not examples:
        raise TrainingFailed("no training samples")
    schedule = Schedule(
        len(examples),
        config.samples_per_step,
        config.num_train_epochs,
        config.seed,
        config.max_steps,
    )
    started = time.perf_counter()
    model = setup_model(spec, device, dtype)
    ready = time.perf_counter()
    note = check_architecture(model, config)
    graphed = setup_graphs(spec, model, device)
    log.info(
        "start: the model and adapter ready in %.2f s, the decoder's fast path in %.2f s",
        ready - started,
        time.perf_counter() - ready,
    )
    loss_chunk = memory.LOSS_CHUNK if spec.gradient_checkpointing else 0
    logits_of = graphed.logits if graphed is not None else None
    named = trainable_parameters(model)
    masters = setup_masters(named, graphed)
    optimizer = setup_optimizer(named, masters, config, device)
    scheduler = setup_scheduler(optimizer, config, schedule.total_steps)
    resumed_from, losses = resume(
        spec.resume_candidates,
        optimizer=optimizer,
        scheduler=scheduler,
        masters=masters,
        named=named,
    )
    step = first_step = resumed_from or 0
    if graphed is not None:  # the schedule knows every step's size: choose the graphs' buckets
        graphed.plan(
            [
                size
                for at in range(step, schedule.total_steps)
                for size in micro_batch_sizes(
                    [len(examples[i].input_ids) for i in schedule.indices(at)], spec.token_budget
                )
            ]
        )
    model.train()

    writer = CheckpointWriter(model, hooks)

    def checkpoint(at: int, final: bool) -> None:
        if hooks.checkpoint_dir is None:
            return
        writer.submit(
            snapshot_checkpoint(
                model=model,
                step=at,
                final=final,
                optimizer=optimizer,
                scheduler=scheduler,
                masters=masters,
                named=named,
                meta={**spec.meta, "config": config.model_dump()},
                losses=losses,
            )
        )

    hooks.on_start(resumed_from)
    if note is not None:
        hooks.on_note(note)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = window_start = time.perf_counter()
    tokens = window_tokens = 0
    window_losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses of steps not read back from the device yet
    last_saved: Path | None = None
    status = "completed"
    total = schedule.total_steps
    while step < total:
        batch_examples = [examples[i] for i in schedule.indices(step)]
        batches = [b.to(device) for b in pack_step(batch_examples, spec.token_budget)]
        try:
            loss, _ = accumulate_step(model, batches, logits_of, masters, loss_chunk=loss_chunk)
        except torch.OutOfMemoryError as exc:
            raise TrainingFailed(
                f"out of GPU memory at step {step + 1} ({sum(b.tokens for b in batches)} tokens "
                "in the step): lower cutoff_len or batch_size/grad_accum, or use method=qlora"
            ) from exc
        pending.append(loss)
        optimizer_step(masters, optimizer, scheduler, config.max_grad_norm)
        last_saved = writer.collect() or last_saved  # checkpoints written meanwhile: register
        step += 1
        step_tokens = sum(b.tokens for b in batches)
        tokens += step_tokens
        window_tokens += step_tokens
        last = step == total
        saving = last or step % config.save_steps == 0
        if step % config.logging_steps == 0 or saving or len(pending) >= 64:
            read = _read_losses(pending, step, config.learning_rate)
            losses.extend(read)
            window_losses.extend(read)
            pending = []
        if step % config.logging_steps == 0 or last:
            now = time.perf_counter()
            progress = _progress(
                step,
                total,
                schedule,
                window_losses,
                optimizer,
                window_tokens / max(now - window_start, 1e-9),
                now - started,
                step - first_step,
            )
            window_start, window_tokens, window_losses = now, 0, []
            if not hooks.on_progress(progress):
                status = "stopped"
        if status == "completed" and not last and hooks.should_stop():
            status = "stopped"
        if status == "stopped" and pending:
            read = _read_losses(pending, step, config.learning_rate)
            losses.extend(read)
            pending = []
        if saving or status == "stopped":
            checkpoint(step, final=last)
        if status == "stopped":
            break
    writer.wait()  # the last checkpoint is on disk and registered before train() returns
    last_saved = writer.newest or last_saved
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return TrainResult(status, step, total, losses, tokens, seconds, last_saved, peak, resumed_from)


def _read_losses(pending: list[torch.Tensor], step: int, lr: float) -> list[float]:
    """The pending steps' losses (the last one is ``step``); a non-finite one fails the job."""
    values = torch.stack(pending).tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingFailed(
                f"the loss became {value} at step {step - len(values) + i + 1}: lower the "
                f"learning rate (lr={lr:g}) or check the data"
            )
    return values


def _progress(
    step: int,
    total: int,
    schedule: Schedule,
    window_losses: list[float],
    optimizer: torch.optim.Optimizer,
    tokens_per_s: float,
    elapsed: float,
    steps_done: int,
) -> dict[str, Any]:
    """The progress record of ``step``; ``elapsed`` and ``steps_done`` count this attempt only
    (a resumed job's earlier steps took no time of this attempt)."""
    lrs = {group.get("name", "default"): group["lr"] for group in optimizer.param_groups}
    return {
        "step": step,
        "total_steps": total,
        "epoch": round(schedule.epoch_of(step), 3),
        "loss": round(sum(window_losses) / len(window_losses), 5),
        "lr": lrs.get("default"),
        "lr_lora_b": lrs.get("lora_B"),
        "tokens_per_s": round(tokens_per_s, 1),
        "elapsed_s": round(elapsed, 2),
        "eta_s": round(eta_seconds(elapsed, steps_done, total - step), 2),
    }


def eta_seconds(elapsed: float, steps_done: int, steps_left: int) -> float:
    """Seconds left at this attempt's pace: ``steps_done`` steps took ``elapsed`` seconds.

    >>> eta_seconds(10.0, 5, 5), eta_seconds(0.0, 0, 3)
    (10.0, 0.0)
    """
    return elapsed / steps_done * steps_left if steps_done else 0.0
