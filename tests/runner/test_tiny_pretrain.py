"""The pre-trained tiny base: the same build gives the same weights, and what it learned from is
written into the model directory and shares no headline with the demo's or the tests' data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.protocol import parse_answer
from runner.tiny_model import build_tiny_model
from runner.tiny_pretrain import PRETRAIN_HEADLINES, PretrainPlan, read_headlines, sha256_of
from stack.demo import HEADLINE as DEMO_CLASSIFY_HEADLINE
from tests.conftest import DEMO_DATASET
from tests.runner.dataset_files import HEADLINES as UPLOAD_TEST_HEADLINES

SHORT = PretrainPlan(steps=3, batch_size=2, seq_len=32)


def _weights_sha256(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def _demo_headlines() -> set[str]:
    """The headline of every demo sample (train and eval), read back from its prompt."""
    headlines = set()
    for name in ("train.json", "eval.json"):
        for record in json.loads((DEMO_DATASET / name).read_text(encoding="utf-8")):
            user = record["conversations"][0]["value"]
            headlines.add(user.rsplit("标题：", 1)[1])
            answer = parse_answer(record["conversations"][1]["value"])
            assert answer.reasoning and answer.label  # a short reasoning, then the label
    return headlines


def test_pretrained_build_is_deterministic_and_says_what_it_learned_from(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", pretrain=SHORT)
    second = build_tiny_model(tmp_path / "b", pretrain=SHORT)
    random_weights = build_tiny_model(tmp_path / "random")

    assert _weights_sha256(first) == _weights_sha256(second)
    assert _weights_sha256(first) != _weights_sha256(random_weights)  # it did train
    provenance = json.loads((first / "provenance.json").read_text(encoding="utf-8"))
    assert provenance == {
        **json.loads((second / "provenance.json").read_text(encoding="utf-8")),
        "seconds": provenance["seconds"],
    }
    assert provenance["corpus_file"] == "runner/assets/pretrain_headlines.tsv"
    assert provenance["corpus_sha256"] == sha256_of(PRETRAIN_HEADLINES)
    assert provenance["headlines"] == len(read_headlines()) > 9000
    assert provenance["plan"]["steps"] == 3
    assert provenance["rebuild"].startswith("python -m runner.tiny_model OUT_DIR --pretrain")
    assert len(provenance["loss"]["every_1_steps"]) == 3
    assert not (random_weights / "provenance.json").exists()


def test_pretraining_headlines_are_in_no_demo_or_test_data() -> None:
    pretraining = {headline for _, headline, _ in read_headlines()}
    demo = _demo_headlines()
    assert len(demo) == 400
    assert not pretraining & demo
    tests_data = {h for h, _ in UPLOAD_TEST_HEADLINES} | {DEMO_CLASSIFY_HEADLINE}
    assert not pretraining & tests_data
    # The demo eval split and the tests' fixtures build on the demo files: nothing else of the
    # source is read by a test, so disjoint from these is disjoint from every test's data.


def test_the_label_tokens_carry_the_label_weight_and_weight_one_is_plain_language_modelling(
    tmp_path: Path,
) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.tiny_pretrain import _loss, _token_stream

    model_dir = build_tiny_model(tmp_path / "random")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [(1, "国足客场击败对手", "体育"), (2, "股市今日大涨", "股票")]
    ids, weights = _token_stream(
        tokenizer, rows, random.Random(0), "{headline}。类别：{label}", 10.0
    )
    assert len(ids) == len(weights)
    lines: list[tuple[list[int], list[float]]] = []
    for token, weight in zip(ids, weights, strict=True):
        if token == tokenizer.bos_token_id:
            lines.append(([], []))
        lines[-1][0].append(token)
        lines[-1][1].append(weight)
    assert len(lines) == 2
    for line, line_weights in lines:
        text = tokenizer.decode(line[1:-1])
        label = text.rsplit("类别：", 1)[1]
        heavy = [t for t, w in zip(line, line_weights, strict=True) if w == 10.0]
        assert tokenizer.decode(heavy[:-1]) == label and heavy[-1] == tokenizer.eos_token_id
        assert set(line_weights) == {1.0, 10.0}

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = torch.tensor([ids])
    with torch.no_grad():
        plain = _loss(model, batch, torch.ones_like(batch, dtype=torch.float32))
        reference = model(input_ids=batch, labels=batch).loss
        weighted = _loss(model, batch, torch.tensor([weights]))
    assert torch.allclose(plain, reference, atol=1e-5)
    assert not torch.allclose(weighted, plain)
