"""Which samples each optimizer step sees, and how they are packed.

Data order is a pure function of (seed, epoch), so a resumed job sees exactly the batches the
uninterrupted one would have. The samples of one optimizer step are packed into as few sequences as
the token budget allows, with ``cu_seqlens`` marking sample boundaries (attention never crosses
them) and only the answer positions selected for the LM head and the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.protocol import TrainingExample


@dataclass(frozen=True)
class Schedule:
    samples: int
    samples_per_step: int
    epochs: float
    seed: int
    max_steps: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples / self.samples_per_step)

    @property
    def total_steps(self) -> int:
        total = math.ceil(self.epochs * self.steps_per_epoch)
        return min(total, self.max_steps) if self.max_steps else total

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps (0-based steps done)."""
        return step / self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        """Sample indices of optimizer step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(
            self.samples, generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        chunk = order[within * self.samples_per_step : (within + 1) * self.samples_per_step]
        return chunk.tolist()


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T), restarting at 0 for each sample
    cu_seqlens: torch.Tensor  # (n + 1,) int32 sample boundaries
    max_len: int
    logit_positions: torch.Tensor  # (A,) positions whose next token is an answer token
    targets: torch.Tensor  # (A,) those answer tokens

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.max_len,
            self.logit_positions.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
        )

    def model_inputs(self) -> dict[str, object]:
        """Keyword arguments for a transformers causal LM forward over this batch."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_len,
            "max_length_k": self.max_len,
            "logits_to_keep": self.logit_positions,
            "use_cache": False,
        }


def truncate(example: TrainingExample, cutoff_len: int) -> TrainingExample:
    """Cut a sequence to ``cutoff_len`` tokens, keeping the prompt and the start of the answer."""
    if len(example.input_ids) <= cutoff_len:
        return example
    return TrainingExample(
        example.input_ids[:cutoff_len], min(example.prompt_len, cutoff_len), example.answer
    )


def pack(examples: Sequence[TrainingExample]) -> PackedBatch:
    """One packed sequence of ``examples``.

    >>> b = pack([TrainingExample([1, 2, 3], 2), TrainingExample([4, 5, 6, 7], 1)])
    >>> b.position_ids.tolist(), b.cu_seqlens.tolist()
    ([[0, 1, 2, 0, 1, 2, 3]], [0, 3, 7])
    >>> b.logit_positions.tolist(), b.targets.tolist()
    ([1, 3, 4, 5], [3, 5, 6, 7])
    """
    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    logit_positions: list[int] = []
    targets: list[int] = []
    for example in examples:
        start = len(ids)
        n = len(example.input_ids)
        ids.extend(example.input_ids)
        positions.extend(range(n))
        bounds.append(start + n)
        for i in range(max(example.prompt_len, 1), n):  # predict token i from position i - 1
            logit_positions.append(start + i - 1)
            targets.append(example.input_ids[i])
    return PackedBatch(
        torch.tensor([ids], dtype=torch.long),
        torch.tensor([positions], dtype=torch.long),
        torch.tensor(bounds, dtype=torch.int32),
        max(len(e.input_ids) for e in examples),
        torch.tensor(logit_positions, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
    )


def pack_step(examples: Sequence[TrainingExample], token_budget: int) -> list[PackedBatch]:
    """The samples of one optimizer step as packed micro-batches of at most ``token_budget``
    tokens each (a sample longer than the budget gets a micro-batch of its own)."""
    groups = _groups([len(e.input_ids) for e in examples], token_budget)
    return [pack([examples[i] for i in group]) for group in groups]


def micro_batch_sizes(lengths: Sequence[int], token_budget: int) -> list[int]:
    """The token counts of the micro-batches ``pack_step`` makes from samples of ``lengths``.

    >>> micro_batch_sizes([300, 300, 300], 700)
    [600, 300]
    """
    return [sum(lengths[i] for i in group) for group in _groups(lengths, token_budget)]


def _groups(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if groups[-1] and used + n > token_budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return [group for group in groups if group]
