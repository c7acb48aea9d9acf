"""``/v1/classify`` on the transformers backend: a checkpoint with a label set always answers a
label from it with its distribution; ``SERVING_MIN_CONFIDENCE`` turns a weak answer into
"uncertain"; the base model with nothing promoted answers free text, never a label."""

from __future__ import annotations

from tests.serving.conftest import (
    ANSWERS,
    LABELS,
    classify,
    local_settings,
    promote,
    serve_in_thread,
)


def test_a_checkpoint_answers_a_label_with_its_probability_and_the_threshold_holds(
    db_url, store, tiny_model_dir, adapters
) -> None:
    strict = local_settings(db_url, store.root, tiny_model_dir, serving_min_confidence=1.0)
    with serve_in_thread(strict) as serving, serving.client() as client:
        base = classify(client, "球队夺冠")  # nothing promoted: no label set to answer from
        assert base["kind"] == "free_text" and base["label"] is None and base["scores"] is None
        assert base["answer"] and base["confidence"] is None

        assert promote(client, adapters["A"]).status_code == 200
        answer = classify(client, "球队夺冠")
        assert answer["kind"] == "label" and answer["label"] == ANSWERS["A"]
        assert set(answer["scores"]) == set(LABELS)
        assert abs(sum(answer["scores"].values()) - 1) < 1e-4
        assert answer["confidence"] == answer["scores"][answer["label"]] < 1.0
        assert answer["uncertain"] is True and answer["answer"] == "uncertain"
        assert answer["reasoning_mode"] == "none" and answer["min_confidence"] == 1.0

        on = client.post("/v1/classify", json={"text": "球队夺冠", "reasoning": "on"})
        assert on.status_code == 422 and "without reasoning" in on.text

    lenient = local_settings(db_url, store.root, tiny_model_dir, serving_min_confidence=0.0)
    with serve_in_thread(lenient) as serving, serving.client() as client:
        answer = classify(client, "球队夺冠")  # A still serves (storage says so)
        assert answer["uncertain"] is False and answer["answer"] == ANSWERS["A"]
        batch = client.post("/v1/classify/batch", json={"texts": ["球队夺冠", "股价大涨"]})
        assert batch.status_code == 200
        assert all(r["label"] in LABELS for r in batch.json()["results"])
