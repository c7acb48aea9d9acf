"""The trainer on CPU with the tiny model (fp32)."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core.enums import Split
from core.protocol import Message, parse_answer, render_prompt, render_training_example
from core.settings import Settings
from runner.config import parse_train_args
from runner.datasets.ingest import IngestOptions, load_dataset
from runner.train.packing import pack, pack_step
from runner.train.recipe import (
    MasterWeights,
    TrainSpec,
    eta_seconds,
    setup_model,
    setup_optimizer,
    step_loss,
    train,
    trainable_parameters,
)
from tests.conftest import DEMO_DATASET
from tests.runner.train_helpers import dir_hooks, examples, synthetic


def _model(tiny_model_dir, *args: str):
    config = parse_train_args(list(args))
    spec = TrainSpec(config=config, examples=[], base=tiny_model_dir, device="cpu")
    return setup_model(spec, torch.device("cpu"), torch.float32), config


def test_packed_step_gives_the_gradient_of_the_unpacked_mean(tiny_model_dir, tokenizer) -> None:
    batch = examples(tokenizer, synthetic(2)[:6])
    # Non-zero LoRA B so every adapter weight gets a gradient.
    model, _ = _model(tiny_model_dir, "lora_rank=8")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    params = [p for _, p in trainable_parameters(model)]

    # Reference: every sample on its own, ordinary forward, full logits, mean over answer tokens.
    total = sum(e.answer_len for e in batch)
    for e in batch:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        targets = ids[0, e.prompt_len :]
        loss = F.cross_entropy(logits[e.prompt_len - 1 : -1], targets, reduction="sum") / total
        loss.backward()
    reference = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    # Ours: packed into two micro-batches (a small token budget), answer-only LM head.
    micro = pack_step(batch, token_budget=3 * max(len(e.input_ids) for e in batch))
    assert len(micro) >= 2
    step_loss(model, micro)
    for ours, ref in zip((p.grad for p in params), reference, strict=True):
        # float32 summation order differs: tolerance scaled to each gradient's magnitude
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_gives_the_same_loss_and_gradients(tiny_model_dir, tokenizer, method) -> None:
    """The LM head and loss over a few answer positions at a time (each chunk recomputed in the
    backward) give what one pass over every position gives; with method=full the LM head's own
    gradient goes through the chunks too."""
    batch = examples(tokenizer, synthetic(2)[:5])
    model, _ = _model(tiny_model_dir, f"method={method}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    named = trainable_parameters(model)
    micro = pack_step(batch, token_budget=4 * max(len(e.input_ids) for e in batch))
    assert len(micro) == 2 and micro[0].targets.numel() > 6

    def run(chunk: int):
        model.zero_grad(set_to_none=True)
        loss, _ = step_loss(model, micro, loss_chunk=chunk)
        return loss, {n: p.grad.clone() for n, p in named}

    want_loss, want = run(0)
    got_loss, got = run(3)  # several chunks per micro-batch, the last one short
    assert abs(got_loss - want_loss) < 1e-5 * abs(want_loss)
    if method == "full":
        assert any("lm_head" in n for n in want)
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_a_sample_sees_nothing_of_the_sample_packed_before_it(tiny_model_dir, tokenizer) -> None:
    model, _ = _model(tiny_model_dir, "method=full")
    model.eval()
    first, second = examples(tokenizer, synthetic(1)[:2])
    with torch.no_grad():
        alone = model(**pack([second]).model_inputs()).logits[0]
        packed_batch = pack([first, second])
        after = model(**packed_batch.model_inputs()).logits[0][-alone.shape[0] :]
    torch.testing.assert_close(after, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, model(**pack([first]).model_inputs()).logits[0][-1:])


def test_loraplus_puts_lora_b_in_its_own_group(tiny_model_dir) -> None:
    model, config = _model(tiny_model_dir, "lr=5e-6", "loraplus=16")
    named = trainable_parameters(model)
    optimizer = setup_optimizer(
        named, MasterWeights([p for _, p in named]), config, torch.device("cpu")
    )
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["default"]["lr"] == 5e-6 and groups["lora_B"]["lr"] == 5e-6 * 16
    b_ids = {id(p) for n, p in named if "lora_B" in n}
    assert {id(p) for p in groups["lora_B"]["params"]} == b_ids
    assert len(groups["default"]["params"]) + len(b_ids) == len(named)
    assert all("lora_" in n for n, _ in named)  # nothing but adapters trains


def test_freeze_trains_only_the_last_layers(tiny_model_dir) -> None:
    model, _ = _model(tiny_model_dir, "method=freeze", "trainable_layers=1")
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all(n.startswith("model.layers.1.") for n in names)


def test_loss_falls_on_the_demo_data(tiny_model_dir, tokenizer, tmp_path) -> None:
    loaded = load_dataset(DEMO_DATASET, IngestOptions.from_settings(Settings(_env_file=None)))
    batch = examples(tokenizer, loaded.splits[Split.train])
    config = parse_train_args(["lr=2e-3", "epochs=1", "bs=4", "grad_accum=2", "rank=16"])
    progress: list[dict] = []
    result = train(
        TrainSpec(config=config, examples=batch, base=tiny_model_dir),
        dir_hooks(tmp_path, on_progress=lambda p: progress.append(p) or True),
    )
    assert result.status == "completed" and result.step == 38 == result.total_steps
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert [p["step"] for p in progress] == [5, 10, 15, 20, 25, 30, 35, 38]
    assert progress[-1]["eta_s"] == 0 and progress[0]["tokens_per_s"] > 0
    assert (result.checkpoint / "adapter_model.safetensors").exists()
    assert (result.checkpoint / "adapter_config.json").exists()


def test_learns_a_headline_to_label_mapping(tiny_model_dir, tokenizer, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = parse_train_args(["lr=3e-3", "epochs=8", "bs=8", "grad_accum=1", "rank=16"])
    result = train(
        TrainSpec(config=config, examples=examples(tokenizer, synthetic(24)), base=tiny_model_dir),
        dir_hooks(tmp_path),
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.checkpoint)
    ).eval()
    held_out = synthetic(5, seed=1)
    correct = 0
    for conversation in held_out:
        ids = render_prompt(tokenizer, conversation[:1])
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        correct += parse_answer(text).label == conversation[-1].content
    assert correct / len(held_out) >= 0.9


RESUME_ARGS = [
    "lr=3e-3",
    "epochs=3",
    "bs=2",
    "grad_accum=2",
    "save_steps=4",
    "dropout=0.1",
    "loraplus=4",
]


@pytest.fixture
def uninterrupted(tiny_model_dir, tokenizer, tmp_path):
    """The 18-step job run whole, with checkpoints every 4 steps: (config, examples, result)."""
    batch = examples(tokenizer, synthetic(6))
    config = parse_train_args(RESUME_ARGS)
    whole = train(
        TrainSpec(config=config, examples=batch, base=tiny_model_dir), dir_hooks(tmp_path / "whole")
    )
    assert whole.step == 18 and whole.resumed_from_step is None
    return config, batch, whole


def _same_adapter(a_dir, b_dir) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_interrupted_and_resumed_equals_uninterrupted(
    tiny_model_dir, tmp_path, uninterrupted
) -> None:
    config, batch, whole = uninterrupted
    calls = iter(range(100))
    stopped = train(
        TrainSpec(config=config, examples=batch, base=tiny_model_dir),
        dir_hooks(tmp_path / "part", should_stop=lambda: next(calls) == 6),
    )
    assert stopped.status == "stopped" and stopped.step == 7
    started: list[int | None] = []
    resumed = train(
        # a single Path, as callers passed before resume_from took a list
        TrainSpec(
            config=config, examples=batch, base=tiny_model_dir, resume_from=stopped.checkpoint
        ),
        dir_hooks(tmp_path / "rest", on_start=started.append),
    )
    assert resumed.status == "completed" and resumed.step == 18
    assert started == [7] and resumed.resumed_from_step == 7
    assert resumed.losses == whole.losses
    _same_adapter(whole.checkpoint, resumed.checkpoint)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_truncated(
    tiny_model_dir, tmp_path, uninterrupted, caplog
) -> None:
    config, batch, whole = uninterrupted
    calls = iter(range(100))
    stopped = train(
        TrainSpec(config=config, examples=batch, base=tiny_model_dir),
        dir_hooks(tmp_path / "part", should_stop=lambda: next(calls) == 8),
    )
    assert stopped.step == 9
    part = tmp_path / "part"
    state = part / "step-9" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # the host died writing it
    started: list[int | None] = []
    with caplog.at_level(logging.INFO, logger="runner.train.recipe"):
        resumed = train(
            TrainSpec(
                config=config,
                examples=batch,
                base=tiny_model_dir,
                resume_from=[part / "step-9", part / "step-8", part / "step-4"],
            ),
            dir_hooks(tmp_path / "rest", on_start=started.append),
        )
    assert started == [8] and resumed.resumed_from_step == 8
    assert f"not resuming from checkpoint {part / 'step-9'}: training_state.pt does not load" in (
        caplog.text
    )
    assert f"resumed from {part / 'step-8'} at step 8" in caplog.text
    assert resumed.status == "completed" and resumed.losses == whole.losses
    _same_adapter(whole.checkpoint, resumed.checkpoint)


def test_resume_starts_over_when_no_checkpoint_fits_leaving_nothing_of_them_behind(
    tiny_model_dir, tmp_path, uninterrupted, caplog
) -> None:
    """Each candidate fails for another reason, one of them only after the optimizer, scheduler
    and torch RNG were loaded; the job then trains from the start exactly as a fresh one."""
    config, batch, whole = uninterrupted
    whole_dir = tmp_path / "whole"
    bad = tmp_path / "bad"
    shutil.copytree(whole_dir / "step-8", bad / "no-state")
    (bad / "no-state" / "training_state.pt").unlink()
    shutil.copytree(whole_dir / "step-8", bad / "adapter")
    adapter = bad / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    shutil.copytree(whole_dir / "step-8", bad / "rng")
    state = torch.load(bad / "rng" / "training_state.pt", weights_only=False)
    state["rng"]["python"] = "not a random state"
    torch.save(state, bad / "rng" / "training_state.pt")
    rank16 = parse_train_args([*RESUME_ARGS, "rank=16", "max_steps=4"])
    other = train(
        TrainSpec(config=rank16, examples=batch, base=tiny_model_dir), dir_hooks(bad / "rank16")
    )
    candidates = [bad / "no-state", bad / "adapter", bad / "rng", other.checkpoint]
    started: list[int | None] = []
    with caplog.at_level(logging.INFO, logger="runner.train.recipe"):
        fresh = train(
            TrainSpec(config=config, examples=batch, base=tiny_model_dir, resume_from=candidates),
            dir_hooks(tmp_path / "fresh", on_start=started.append),
        )
    reasons = [r.getMessage() for r in caplog.records if "not resuming" in r.getMessage()]
    assert len(reasons) == 4
    assert reasons[0].endswith("training_state.pt is missing")
    assert "adapter_model.safetensors is unreadable" in reasons[1]
    assert "optimizer, scheduler or RNG state does not fit this job" in reasons[2]
    assert "has shape (16, " in reasons[3] and "(8, " in reasons[3]
    assert "none of the 4 checkpoints could be resumed from: training from the start" in (
        caplog.text
    )
    assert started == [None] and fresh.resumed_from_step is None
    assert fresh.step == 18 and fresh.losses == whole.losses
    _same_adapter(whole.checkpoint, fresh.checkpoint)


def test_eta_after_a_resume_counts_only_this_attempts_steps(
    tiny_model_dir, tmp_path, uninterrupted
) -> None:
    config, batch, _ = uninterrupted
    progress: list[dict] = []
    # The steps of this attempt take at least 0.1 s each (after the first: the stop poll sleeps),
    # so the 0.01 s rounding of elapsed_s and eta_s is small next to a 4× wrong ETA.
    resumed = train(
        TrainSpec(
            config=config,
            examples=batch,
            base=tiny_model_dir,
            resume_from=[tmp_path / "whole" / "step-8"],
        ),
        dir_hooks(
            tmp_path / "rest",
            on_progress=lambda p: progress.append(p) or True,
            should_stop=lambda: time.sleep(0.1) or False,
        ),
    )
    assert resumed.resumed_from_step == 8
    first = progress[0]
    assert first["step"] == 10  # two steps of this attempt, eight to go
    want = first["elapsed_s"] / 2 * 8  # not elapsed / 10 * 8
    assert first["elapsed_s"] >= 0.1 and abs(first["eta_s"] - want) < 0.03, first
    assert progress[-1]["eta_s"] == 0


def test_eta_is_this_attempts_pace_times_the_steps_left() -> None:
    assert eta_seconds(30.0, 3, 7) == 70.0  # resumed at 90 of 100: 3 steps in 30 s, 7 to go
    assert eta_seconds(0.0, 0, 5) == 0.0


def test_master_weights_keep_updates_bf16_would_round_away() -> None:
    param = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    masters = MasterWeights([param])
    optimizer = torch.optim.SGD(masters.masters, lr=1e-4)
    for _ in range(100):
        param.grad = torch.ones(4, dtype=torch.bfloat16)
        masters.grads_to_masters()
        optimizer.step()
        masters.masters_to_params()
    assert abs(masters.masters[0][0].item() - (1 - 100 * 1e-4)) < 1e-5
    assert param[0].item() != 1.0  # plain bf16 steps of 1e-4 on 1.0 would never move it


def test_max_samples_and_cutoff_len_are_applied(tiny_model_dir, tokenizer) -> None:
    batch = examples(tokenizer, synthetic(10))
    config = parse_train_args(
        ["max_samples=8", "bs=4", "grad_accum=1", "epochs=1", "cutoff_len=16"]
    )
    result = train(TrainSpec(config=config, examples=batch, base=tiny_model_dir))
    assert result.total_steps == 2
    assert result.tokens <= 8 * 16


def test_rendered_examples_train_on_the_answer_only(tokenizer) -> None:
    example = render_training_example(
        tokenizer, [Message("user", "标题：x"), Message("assistant", "体育")]
    )
    batch = pack([example])
    assert tokenizer.decode(batch.targets.tolist()) == "体育<｜end▁of▁sentence｜>"


def test_a_checkpoint_is_written_while_the_next_steps_train(tiny_model_dir, tokenizer, tmp_path):
    """An adapter checkpoint is written in the background: its writer here waits until the loop
    has gone two steps further, which a write inside the loop could never see (it would wait
    for itself, and give up). Registration follows once the files are on disk."""
    import threading
    from contextlib import contextmanager

    from runner.train.recipe import TrainHooks

    moved_on = threading.Event()
    registered: list[tuple[int, int]] = []  # (checkpoint step, the loop's step when registered)
    progress: list[int] = []

    @contextmanager
    def slow_dir(step: int, final: bool):
        directory = tmp_path / f"step-{step}"
        directory.mkdir()
        if not final:
            moved_on.wait(20)
        yield directory

    def on_progress(p: dict) -> bool:
        progress.append(p["step"])
        if p["step"] >= 6:
            moved_on.set()
        return True

    config = parse_train_args(["epochs=2", "bs=2", "ga=1", "save_steps=4", "logging_steps=1"])
    result = train(
        TrainSpec(config=config, examples=examples(tokenizer, synthetic(2)), base=tiny_model_dir),
        TrainHooks(
            checkpoint_dir=slow_dir,
            on_progress=on_progress,
            on_checkpoint=lambda step, final, path: registered.append((step, progress[-1])),
        ),
    )
    assert moved_on.is_set(), "the loop waited for the checkpoint write"
    assert registered[0][0] == 4 and registered[0][1] >= 6  # registered after the write
    assert [step for step, _ in registered] == [4, 8]
    assert result.checkpoint == tmp_path / "step-8"
    assert (tmp_path / "step-4" / "adapter_model.safetensors").exists()
