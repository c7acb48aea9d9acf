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
