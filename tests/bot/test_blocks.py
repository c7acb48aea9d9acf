"""What the bot writes for an export: where it is, how big, how it was verified."""

from __future__ import annotations

from bot.blocks import milestone_text


def test_an_export_is_announced_with_its_path_size_and_verification() -> None:
    text = milestone_text(
        "exported",
        {
            "checkpoint_id": 7,
            "bits": 4,
            "bytes": 4_500_000_000,
            "absolute_path": "/srv/artifacts/exports/checkpoint-7-int4",
            "verification": {
                "samples": 100,
                "transformers": {"identical_answers": 61, "label_agreement": 0.97},
            },
        },
    )
    assert text is not None
    assert text.startswith(":package: Checkpoint 7 exported (4-bit (bitsandbytes), 4.50 GB)")
    assert "`/srv/artifacts/exports/checkpoint-7-int4`" in text
    assert "transformers: 61/100 answers identical to base + adapter" in text
    assert "label agreement 97.0%" in text and "vllm" not in text


def test_a_gguf_export_is_announced_with_its_type_accuracy_and_the_ollama_step() -> None:
    text = milestone_text(
        "exported",
        {
            "checkpoint_id": 7,
            "bits": None,
            "quant": "q4_0",
            "bytes": 4_700_000_000,
            "absolute_path": "/srv/artifacts/exports/checkpoint-7-gguf-q4_0",
            "verification": {
                "samples": 100,
                "adapter_accuracy": 0.9,
                "transformers": {
                    "identical_answers": 80,
                    "label_agreement": 0.96,
                    "accuracy": 0.88,
                },
            },
        },
    )
    assert text is not None
    assert text.startswith(":package: Checkpoint 7 exported (GGUF Q4_0, 4.70 GB)")
    assert "transformers: 80/100 answers identical to base + adapter" in text
    assert "label agreement 96.0%, accuracy 88.0% (adapter 90.0%)" in text
    assert "`ollama create <name> -f Modelfile`" in text


def _header_text(job, dataset=None) -> str:
    from bot.blocks import job_header_blocks

    return job_header_blocks(job, dataset)[0]["text"]["text"]


def test_a_long_error_is_cut_to_the_section_limit_and_keeps_the_header() -> None:
    from bot.blocks import job_header_blocks
    from bot.standin import MAX_SECTION_CHARS  # what Slack (and the stand-in) refuses above
    from storage.models import Job

    job = Job(
        id=4,
        kind="train",
        status="failed",
        base_model="tiny",
        error="CUDA out of memory. " * 400,  # 8,000 characters
        config={"lora_target": "q_proj," * 600},
        requested_by="U1",
    )
    blocks = job_header_blocks(job, None)
    section = blocks[0]["text"]["text"]
    assert len(section) <= MAX_SECTION_CHARS and section.endswith("…")
    assert section.startswith(":x: *Fine-tuning job 4* · failed")
    assert ":warning: CUDA out of memory." in section
    context = blocks[1]["elements"][0]["text"]
    assert len(context) <= MAX_SECTION_CHARS and context.startswith("requested by <@U1>")


def test_every_kind_of_job_is_named_for_what_it_is() -> None:
    from bot.blocks import job_line
    from storage.models import Job

    named = {
        kind: _header_text(Job(id=3, kind=kind, status="queued", base_model="tiny"))
        for kind in ("train", "export", "evaluate", "ingest")
    }
    assert "*Fine-tuning job 3* · queued" in named["train"]
    assert "*Export job 3* · queued" in named["export"]
    assert "*Evaluation job 3* · queued" in named["evaluate"]
    assert "*Dataset check 3* · queued" in named["ingest"]
    assert "Export job 5 · running" in job_line(Job(id=5, kind="export", status="running"))


def test_the_base_model_is_shown_by_its_name_never_by_a_server_path() -> None:
    from storage.models import Dataset, Job

    dataset = Dataset(name="news", version=2, train_samples=300, eval_samples=100)

    def shown(base_model: str) -> str:
        return _header_text(Job(id=1, status="queued", base_model=base_model), dataset)

    local = shown("/srv/models/DeepSeek-R1-Distill-Qwen-7B")
    assert "on `DeepSeek-R1-Distill-Qwen-7B`" in local and "/srv" not in local
    hub = shown("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    assert "on `deepseek-ai/DeepSeek-R1-Distill-Qwen-7B`" in hub
    assert "on `tiny (built-in demo model)`" in shown("tiny")
    no_dataset = _header_text(Job(id=2, status="queued", base_model="/opt/m/qwen2-1.5b/"))
    assert "`qwen2-1.5b`" in no_dataset and "/opt" not in no_dataset
