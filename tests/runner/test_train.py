"""The trainer on CPU with the tiny model (fp32)."""

from __future__ import annotations

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


def test_interrupted_and_resumed_equals_uninterrupted(tiny_model_dir, tokenizer, tmp_path) -> None:
    batch = examples(tokenizer, synthetic(6))
    args = [
        "lr=3e-3",
        "epochs=3",
        "bs=2",
        "grad_accum=2",
        "save_steps=4",
        "dropout=0.1",
        "loraplus=4",
    ]
    config = parse_train_args(args)
    whole = train(
        TrainSpec(config=config, examples=batch, base=tiny_model_dir), dir_hooks(tmp_path / "whole")
    )
    assert whole.step == 18

    calls = iter(range(100))
    stopped = train(
        TrainSpec(config=config, examples=batch, base=tiny_model_dir),
        dir_hooks(tmp_path / "part", should_stop=lambda: next(calls) == 6),
    )
    assert stopped.status == "stopped" and stopped.step == 7
    resumed = train(
        TrainSpec(
            config=config, examples=batch, base=tiny_model_dir, resume_from=stopped.checkpoint
        ),
        dir_hooks(tmp_path / "rest"),
    )
    assert resumed.status == "completed" and resumed.step == 18
    assert resumed.losses == whole.losses
    a = load_file(whole.checkpoint / "adapter_model.safetensors")
    b = load_file(resumed.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


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
