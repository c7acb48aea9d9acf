"""GGUF export on the tiny model: F16, Q8_0 and Q4_0 files that read back (GGUF reader, transformers)
with the tokenizer and chat template intact and answer the eval prompts as recorded; the Modelfile
renders the training prompt; refusals name what is refused; a failed export leaves nothing under
its final name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from core.enums import JobKind, JobStatus
from core.errors import ConfigError
from core.protocol import Message, PromptFrame, render_prompt, render_prompt_text
from runner.datasets.ingest import read_split
from runner.eval.predict import TransformersPredictor
from runner.export import export_checkpoint, export_name
from runner.export_gguf import (
    GGUF_FILE,
    GgufRefused,
    prompt_from_modelfile,
    render_modelfile,
    tokenizer_from_gguf,
)
from runner.job import run_job
from runner.models import load_tokenizer
from stack.processes import process_env
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job, create_job, job_events
from storage.models import Checkpoint, Job

# The GGUF path does nothing database-specific (test_export.py runs the export job on both): the
# tests that train a checkpoint run on SQLite only, to keep the suite fast.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
REPO = Path(__file__).resolve().parents[2]
ARCH_KEYS = {
    "qwen2.context_length": "max_position_embeddings",
    "qwen2.embedding_length": "hidden_size",
    "qwen2.block_count": "num_hidden_layers",
    "qwen2.feed_forward_length": "intermediate_size",
    "qwen2.attention.head_count": "num_attention_heads",
    "qwen2.attention.head_count_kv": "num_key_value_heads",
    "qwen2.attention.layer_norm_rms_epsilon": "rms_norm_eps",
}


def _export_job(engine, settings, checkpoint: Checkpoint, quant: str) -> Job:
    with new_session(engine) as session:
        job = create_job(
            session,
            kind=JobKind.export,
            base_model=checkpoint.base_model,
            config={"checkpoint_id": checkpoint.id, "quant": quant},
        )
        token = claim_next_job(session, owner="inline", lease_seconds=60).lease_token
    run_job(job.id, token, settings)
    with new_session(engine) as session:
        return session.get(Job, job.id)


def _fields(path: Path) -> tuple[dict, object]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, reader


def _assert_tokenizer_and_template_intact(path: Path, base: Path, prompts, history) -> None:
    """The file's tokenizer (as llama.cpp reads it) is the training tokenizer: every vocabulary
    entry, the merges, the special ids and the chat template; it renders each eval prompt to the
    training ids."""
    tokenizer = load_tokenizer(base)
    fields, _ = _fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"  # the tiny model's (recorded) tokenizer
    tokens = fields["tokenizer.ggml.tokens"]
    vocab = tokenizer.get_vocab()
    config = json.loads((base / "config.json").read_text())
    assert len(tokens) == config["vocab_size"] > len(vocab)  # padded to the config's size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and fields["tokenizer.ggml.token_type"][-1] == 5
    think = vocab["<think>"]
    assert fields["tokenizer.ggml.token_type"][think] == 4  # user-defined: matched whole, shown
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == 3  # control
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the template writes BOS itself
    merges = json.loads((base / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    for key, name in ARCH_KEYS.items():
        assert fields[key] == pytest.approx(config[name]), key
    assert fields["qwen2.rope.freq_base"] == config["rope_parameters"]["rope_theta"]

    read_back = tokenizer_from_gguf(path)
    assert [render_prompt(read_back, h) for h in history] == prompts
    digits = "3 33 333 新闻<think>\n一</think>\n\n体育"  # digits split one by one, as in training
    assert (
        read_back(digits)["input_ids"] == tokenizer(digits, add_special_tokens=False)["input_ids"]
    )


@SQLITE_ONLY
def test_an_f16_gguf_answers_as_base_plus_adapter_and_its_modelfile_renders_the_training_prompt(
    engine, eval_settings, dataset, checkpoint
) -> None:
    job = _export_job(engine, eval_settings, checkpoint, "f16")
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        events = job_events(session, job_id=job.id)
    exported = next(e.payload for e in events if e.kind == "exported")
    store = ArtifactStore(eval_settings.artifact_dir)
    out = store.path(export_name(checkpoint.id, None, "f16"))
    assert exported["path"] == f"exports/checkpoint-{checkpoint.id}-gguf-f16"
    assert exported["quant"] == "f16" and exported["absolute_path"] == str(out)
    assert {p.name for p in out.iterdir()} == {"Modelfile", "README.md", GGUF_FILE, "meta.json"}
    assert "ollama create" in (out / "README.md").read_text()
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["export"]["format"] == "gguf" and meta["export"]["quant"] == "f16"
    assert meta["export"]["tensor_types"] == {"F16": 16, "F32": 11}  # norms and biases F32
    assert meta["verification"] == exported["verification"]
    verification = meta["verification"]
    assert verification["samples"] == dataset.eval_samples
    assert verification["same_labels_required"] is True
    assert verification["transformers"]["label_agreement"] == 1.0
    assert verification["transformers"]["identical_answers"] == dataset.eval_samples
    assert verification["transformers"]["accuracy"] == verification["adapter_accuracy"]

    base = Path(eval_settings.base_model)
    tokenizer = load_tokenizer(base)
    history = [c[:-1] for c in read_split(store, dataset.eval_sha256)]
    prompts = [render_prompt(tokenizer, h) for h in history]
    _assert_tokenizer_and_template_intact(out / GGUF_FILE, base, prompts, history)

    # Independently of the export's own check: the file read fresh by transformers, greedy.
    gguf = TransformersPredictor(out, None, gguf_file=GGUF_FILE).generate(prompts, 24)
    adapter = TransformersPredictor(base, store.path(checkpoint.path)).generate(prompts, 24)
    assert [g.text for g in gguf] == [g.text for g in adapter]
    assert any(g.text for g in gguf)

    # The Modelfile: the GGUF, temperature 0, EOS as a stop, and the training prompt around the
    # bare text (the dataset's frame), which Ollama tokenizes with the file's tokenizer.
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith(f"FROM ./{GGUF_FILE}\n")
    assert "PARAMETER temperature 0\n" in modelfile
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    frame = PromptFrame.from_dict(dataset.prompt_frame)
    assert meta["prompt_frame"] == frame.to_dict()
    read_back = tokenizer_from_gguf(out / GGUF_FILE)
    for conversation in history:
        text = conversation[-1].content.removeprefix(frame.prefix).removesuffix(frame.suffix)
        sent = read_back(prompt_from_modelfile(modelfile, text))["input_ids"]
        assert sent == render_prompt(tokenizer, frame.conversation(text))


@SQLITE_ONLY
def test_q8_0_and_q4_0_ggufs_read_back_and_report_agreement(
    engine, eval_settings, dataset, checkpoint
) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    store = ArtifactStore(eval_settings.artifact_dir)
    base = Path(eval_settings.base_model)
    history = [c[:-1] for c in read_split(store, dataset.eval_sha256)]
    prompts = [render_prompt(load_tokenizer(base), h) for h in history]
    sizes = {}
    for quant, main_type in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        job = _export_job(engine, eval_settings, checkpoint, quant)
        assert job.status == JobStatus.succeeded, job.error
        out = store.path(export_name(checkpoint.id, None, quant))
        path = out / GGUF_FILE
        sizes[quant] = path.stat().st_size
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        verification = meta["verification"]
        assert verification["same_labels_required"] is False
        for key in ("identical_answers", "label_agreement", "accuracy", "answer_agreement"):
            assert key in verification["transformers"], key
        assert 0 <= verification["transformers"]["label_agreement"] <= 1
        assert meta["export"]["tensor_types"][main_type] >= 14
        _assert_tokenizer_and_template_intact(path, base, prompts, history)

        # The weights dequantize close to the merged model's (Q8_0 within 1%, Q4_0 within 15%).
        _, reader = _fields(path)
        tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        assert tensor.tensor_type == GGMLQuantizationType[main_type]
        merged = _merged_weight(base, store.path(checkpoint.path), "model.layers.0.mlp.up_proj")
        error = np.abs(dequantize(tensor.data, tensor.tensor_type) - merged).max()
        assert error <= (0.01 if quant == "q8_0" else 0.15) * np.abs(merged).max()
    assert sizes["q4_0"] < sizes["q8_0"]


def _merged_weight(base: Path, adapter: Path, module: str) -> np.ndarray:
    from runner.export import _merged_in_memory

    model = _merged_in_memory(base, adapter)
    return model.get_submodule(module).weight.detach().numpy()


def test_the_modelfile_renders_a_system_prompt_and_a_frame_as_training_does(tokenizer) -> None:
    frame = PromptFrame(system="你是新闻分类器。", prefix="标题：{{ 不是模板 }}", suffix="\n类别？")
    modelfile = render_modelfile(tokenizer, frame, add_bos=False, max_new_tokens=64, num_ctx=512)
    assert 'TEMPLATE """' in modelfile and "{{ .Prompt }}" in modelfile
    text = "股市大涨"
    expected = render_prompt_text(tokenizer, frame.conversation(text))
    assert prompt_from_modelfile(modelfile, text) == expected
    # With add_bos the runtime adds BOS itself: the template leaves it out.
    with_bos = render_modelfile(tokenizer, frame, add_bos=True, max_new_tokens=64, num_ctx=512)
    assert prompt_from_modelfile(with_bos, text) == expected.removeprefix(tokenizer.bos_token)
    assert render_prompt(tokenizer, [Message("user", text)])[0] == tokenizer.bos_token_id


def _hand_made_checkpoint(engine, base_dir: Path) -> int:
    with new_session(engine) as session:
        job = create_job(session, base_model=str(base_dir), config={})
        checkpoint = Checkpoint(
            job_id=job.id, step=1, final=True, path="c/1", base_model=str(base_dir)
        )
        session.add(checkpoint)
        session.commit()
        return checkpoint.id


@SQLITE_ONLY
def test_what_cannot_be_written_as_gguf_is_refused_naming_it(
    engine, eval_settings, tiny_model_dir, tmp_path
) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)

    def export(base_dir: Path, quant: str = "q8_0", bits: int | None = None) -> None:
        checkpoint_id = _hand_made_checkpoint(engine, base_dir)
        with new_session(engine) as session:
            export_checkpoint(
                session, store, eval_settings, checkpoint_id=checkpoint_id, quant=quant, bits=bits
            )

    with pytest.raises(ConfigError, match="quant=q4_k_m is not offered: use f16, q8_0 or q4_0"):
        export(tiny_model_dir, quant="q4_k_m")
    with pytest.raises(ConfigError, match="a GGUF export takes quant=f16"):
        export(tiny_model_dir, bits=4)

    llama = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        GgufRefused,
        match="GGUF export supports Qwen2ForCausalLM and this model is LlamaForCausalLM",
    ):
        export(llama)
    # The same through the command line (F16 when --format gguf names no type).
    checkpoint_id = str(_hand_made_checkpoint(engine, llama))
    result = subprocess.run(
        [sys.executable, "-m", "runner", "export", checkpoint_id, "--format", "gguf"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**process_env(eval_settings), "EVAL_BACKEND": "transformers"},
        timeout=300,
    )
    assert result.returncode != 0
    assert "GGUF export supports Qwen2ForCausalLM and this model is LlamaForCausalLM" in (
        result.stderr
    )

    # A tokenizer llama.cpp's hashes do not know, and not our recorded tiny one: refused.
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_model_dir, unknown)
    (unknown / "finetune_bot.json").unlink()
    with pytest.raises(
        GgufRefused, match=r"is not one GGUF export can identify .* deepseek-r1-qwen"
    ):
        export(unknown)
    assert not store.path("exports").exists()


@SQLITE_ONLY
def test_a_failed_gguf_export_leaves_nothing_under_its_final_name(
    engine, eval_settings, checkpoint, monkeypatch
) -> None:
    import gguf.quants

    store = ArtifactStore(eval_settings.artifact_dir)
    name = export_name(checkpoint.id, None, "q4_0")

    def export() -> None:
        with new_session(engine) as session:
            export_checkpoint(
                session, store, eval_settings, checkpoint_id=checkpoint.id, quant="q4_0"
            )

    # Not enough disk: refused before anything is written.
    Usage = namedtuple("Usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr("runner.export.shutil.disk_usage", lambda path: Usage(10**9, 10**9, 1000))
        with pytest.raises(Exception, match="not enough disk for the export: it needs about"):
            export()
    assert not store.path(name).exists() and not any(store.tmp.iterdir())

    # The writer fails half-way through the tensors (a full disk, a bad tensor): cleaned up.
    quantize, written = gguf.quants.quantize, []

    def fails_half_way(data, qtype):
        if len(written) == 10:
            raise OSError(28, "No space left on device")
        written.append(qtype)
        return quantize(data, qtype)

    with monkeypatch.context() as patch:
        patch.setattr(gguf.quants, "quantize", fails_half_way)
        with pytest.raises(OSError, match="No space left on device"):
            export()
    assert len(written) == 10
    assert not store.path(name).exists() and not any(store.tmp.iterdir())
