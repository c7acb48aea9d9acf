"""The start modal: built from the train config model (defaults and ranges as hints), with a
dataset picker and an optional file input; its submission queues the job like `start k=v` does."""

from __future__ import annotations

import json
from typing import Any

from core.errors import ConfigError
from runner.config import ALIASES, TrainConfig, _bounds, build_train_config
from storage.models import Dataset

CALLBACK_ID = "start_job"
MODAL_FIELDS = (
    "method",
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cutoff_len",
    "lora_rank",
    "loraplus_lr_ratio",
)
EXTRA_BLOCK = "extra_settings"
DATASET_BLOCK = "dataset"
FILE_BLOCK = "dataset_file"
CHANNEL_BLOCK = "channel"  # only in the form the App Home opens: where the job's thread goes


def _field_block(name: str) -> dict[str, Any]:
    field = TrainConfig.model_fields[name]
    aliases = [a for a, n in ALIASES.items() if n == name]
    label = name + (f" ({aliases[0]})" if aliases else "")
    bounds = _bounds(name)
    hint = (field.description or "") + (f" — {bounds}" if bounds else "")
    return {
        "type": "input",
        "block_id": f"cfg_{name}",
        "optional": True,
        "label": {"type": "plain_text", "text": label[:150]},
        "hint": {"type": "plain_text", "text": hint[:150]},
        "element": {
            "type": "plain_text_input",
            "action_id": "value",
            "initial_value": "" if field.default is None else str(field.default),
        },
    }


def dataset_option_text(dataset: Dataset, channel_id: str) -> str:
    """The picker's label: name and version, and whose it is when not the channel's own
    (``news v2 · shared``, ``news-demo v1 · deployment``)."""
    owner = (
        ""
        if dataset.channel_id == channel_id
        else " · deployment"
        if dataset.channel_id is None
        else " · shared"
    )
    return f"{dataset.name} v{dataset.version}{owner}"[:75]


def start_modal(
    datasets: list[Dataset],
    *,
    channel_id: str,
    default_dataset_id: int | None,
    pick_channel: bool = False,
) -> dict[str, Any]:
    """``datasets``: what the channel may use (``storage.datasets.visible_datasets``).
    ``pick_channel``: the form opened from the App Home, which has no channel: it asks where the
    job's thread goes (``channel_id``, when not empty, is the preset)."""
    options = [
        {
            "text": {"type": "plain_text", "text": dataset_option_text(d, channel_id)},
            "value": str(d.id),
        }
        for d in datasets[:100]
    ]
    picker: dict[str, Any] = {
        "type": "static_select",
        "action_id": "value",
        "options": options,
        "placeholder": {"type": "plain_text", "text": "a dataset"},
    }
    chosen = next((o for o in options if o["value"] == str(default_dataset_id)), None)
    if chosen is not None:
        picker["initial_option"] = chosen
    blocks: list[dict[str, Any]] = []
    if pick_channel:
        chooser: dict[str, Any] = {
            "type": "conversations_select",
            "action_id": "value",
            "filter": {"include": ["public", "private"], "exclude_bot_users": True},
        }
        if channel_id:
            chooser["initial_conversation"] = channel_id
        blocks.append(
            {
                "type": "input",
                "block_id": CHANNEL_BLOCK,
                "label": {"type": "plain_text", "text": "Channel (the job's thread goes there)"},
                "hint": {
                    "type": "plain_text",
                    "text": "A channel where you have started a job or shared a dataset before",
                },
                "element": chooser,
            }
        )
    if options:
        blocks.append(
            {
                "type": "input",
                "block_id": DATASET_BLOCK,
                "optional": True,
                "label": {"type": "plain_text", "text": "Dataset"},
                "element": picker,
            }
        )
    blocks.append(
        {
            "type": "input",
            "block_id": FILE_BLOCK,
            "optional": True,
            "label": {"type": "plain_text", "text": "…or upload a dataset file"},
            "element": {
                "type": "file_input",
                "action_id": "value",
                "max_files": 1,
                "filetypes": ["json", "jsonl", "csv", "tsv", "zip"],
            },
        }
    )
    blocks += [_field_block(name) for name in MODAL_FIELDS]
    blocks.append(
        {
            "type": "input",
            "block_id": EXTRA_BLOCK,
            "optional": True,
            "label": {"type": "plain_text", "text": "More settings (key=value, one a line)"},
            "hint": {"type": "plain_text", "text": "`/finetune help` lists them all"},
            "element": {"type": "plain_text_input", "action_id": "value", "multiline": True},
        }
    )
    return {
        "type": "modal",
        "callback_id": CALLBACK_ID,
        "private_metadata": json.dumps({"channel_id": channel_id}),
        "title": {"type": "plain_text", "text": "Start fine-tuning"},
        "submit": {"type": "plain_text", "text": "Start"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }


def picked_channel(values: dict[str, Any]) -> str | None:
    """The channel chosen in the home's form (None: the form had no channel picker)."""
    return ((values.get(CHANNEL_BLOCK) or {}).get("value") or {}).get("selected_conversation")


def parse_submission(values: dict[str, Any]) -> tuple[TrainConfig, int | None, str | None]:
    """(config, dataset id, uploaded file id) from a submission; a ConfigError's ``fields`` maps
    block ids to messages for Slack's per-field errors."""
    settings: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in MODAL_FIELDS:
        raw = ((values.get(f"cfg_{name}") or {}).get("value") or {}).get("value")
        default = TrainConfig.model_fields[name].default
        if raw not in (None, "") and raw != str(default):
            settings[name] = raw.strip()
    extra = ((values.get(EXTRA_BLOCK) or {}).get("value") or {}).get("value") or ""
    for line in filter(None, (x.strip() for x in extra.replace(",", "\n").splitlines())):
        key, sep, value = line.partition("=")
        if not sep:
            errors[EXTRA_BLOCK] = f"`{line}` is not key=value"
            continue
        settings[ALIASES.get(key.strip(), key.strip())] = value.strip()
    config: TrainConfig | None = None
    try:
        config = build_train_config(settings)
    except ConfigError as exc:
        block = next((f"cfg_{n}" for n in MODAL_FIELDS if n in exc.message), EXTRA_BLOCK)
        errors.setdefault(block, exc.message[:2000])
    unknown = [k for k in settings if k not in TrainConfig.model_fields]
    if unknown:
        errors[EXTRA_BLOCK] = f"unknown setting {', '.join(unknown)}; see `/finetune help`"
    if errors or config is None:
        raise ConfigError("; ".join(errors.values()), errors)
    selected = ((values.get(DATASET_BLOCK) or {}).get("value") or {}).get("selected_option")
    files = ((values.get(FILE_BLOCK) or {}).get("value") or {}).get("files") or []
    return (config, int(selected["value"]) if selected else None, files[0]["id"] if files else None)
