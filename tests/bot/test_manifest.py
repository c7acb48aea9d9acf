"""The app manifest's slash commands: each has a usage hint, and the hints name only what the
bot takes (the subcommands of `/finetune`, settings `start` parses, `/classify`'s options)."""

from __future__ import annotations

from pathlib import Path

import yaml

from bot.commands import SUBCOMMANDS, parse_classify
from bot.distill_commands import parse_distill_args
from runner.config import parse_train_args

MANIFEST = Path(__file__).resolve().parents[2] / "manifest.yml"


def _commands() -> dict[str, dict]:
    manifest = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    return {c["command"]: c for c in manifest["features"]["slash_commands"]}


def test_every_command_has_a_usage_hint_within_slacks_limits() -> None:
    commands = _commands()
    assert set(commands) == {"/finetune", "/classify"}
    for command in commands.values():
        assert command["usage_hint"].strip() and len(command["usage_hint"]) <= 1000
        assert command["description"].strip() and len(command["description"]) <= 2000


def test_the_finetune_hint_shows_the_main_subcommands_as_the_bot_takes_them() -> None:
    hint = _commands()["/finetune"]["usage_hint"]
    shapes = [part.strip() for part in hint.split(" | ")]
    named = [shape.split()[0] for shape in shapes]
    assert set(named) <= set(SUBCOMMANDS), set(named) - set(SUBCOMMANDS)
    assert {"start", "sweep", "status", "promote", "help"} <= set(named)
    start = next(s for s in shapes if s.startswith("start "))
    settings = [w.strip("[]") for w in start.split()[1:] if "=" in w and "<" not in w]
    assert settings and parse_train_args(settings)  # the example settings parse as shown
    distill = next(s for s in shapes if s.startswith("distill "))
    filled = [w.replace("<url>", "http://h/v1").replace("<name>", "x") for w in distill.split()]
    assert parse_distill_args(filled[1:])["teacher"] == "http://h/v1"  # the shape it parses


def test_the_classify_hint_shows_options_the_command_parses() -> None:
    hint = _commands()["/classify"]["usage_hint"]
    assert "--model" in hint and "reasoning=off" in hint
    request, problem = parse_classify("--model base reasoning=off 球队夺冠")
    assert problem is None and request == {"text": "球队夺冠", "model": "base", "reasoning": "off"}
