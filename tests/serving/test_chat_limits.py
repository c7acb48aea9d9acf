"""What ``/v1/chat/completions`` and ``/v1/classify`` accept, over real HTTP against the serving app
(transformers backend): the body size (413), messages, characters, roles and the context (422,
each naming its limit); and tokenization runs off the event loop, so a long prompt being tokenized
does not stall other requests."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import ANSWERS, classify, local_settings, promote, serve_in_thread


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # the bounds do not depend on the database
    return f"sqlite:///{tmp_path / 'test.db'}"


def _chat(client: httpx.Client, messages: list[dict], **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": messages, **extra})


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_chat_and_classify_refuse_what_is_too_big_naming_the_limit(
    db_url, store, tiny_model_dir, adapters
) -> None:
    settings = local_settings(
        db_url,
        store.root,
        tiny_model_dir,
        serving_max_body_bytes=4096,
        serving_max_messages=4,
        serving_max_chat_chars=600,
        serving_max_model_len=128,
    )
    with serve_in_thread(settings) as serving, serving.client() as client:
        assert promote(client, adapters["A"]).status_code == 200
        good = _chat(client, [_user("标题：球队夺冠")], max_tokens=8)
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "体育"

        big = json.dumps({"messages": [_user("长" * 5000)]}).encode()
        too_large = client.post(
            "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}
        )
        assert too_large.status_code == 413
        assert too_large.json()["error"]["message"] == (
            f"the request body is {len(big)} bytes; at most 4096 bytes are accepted "
            "(SERVING_MAX_BODY_BYTES)"
        )

        def chunks():  # no Content-Length: the body is counted as it streams in
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        streamed = client.post(
            "/v1/classify", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413
        assert "larger than that; at most 4096 bytes" in streamed.json()["error"]["message"]

        many = _chat(client, [_user("标题：球队夺冠")] * 5)
        assert many.status_code == 422 and many.json()["detail"] == (
            "messages: 5 messages; at most 4 are accepted (SERVING_MAX_MESSAGES)"
        )
        long = _chat(client, [_user("长" * 400), _user("长" * 201)])
        assert long.status_code == 422 and long.json()["detail"] == (
            "messages: 601 characters in all; at most 600 are accepted (SERVING_MAX_CHAT_CHARS)"
        )
        role = _chat(client, [{"role": "tool", "content": "x"}])
        assert role.status_code == 422
        assert role.json()["detail"] == (
            "messages[0].role is 'tool': use one of system, user, assistant"
        )
        context = _chat(client, [_user("球队夺冠股市大涨" * 70)])
        assert context.status_code == 422
        assert (
            "leaves no room for an answer in the model's 128 (SERVING_MAX_MODEL_LEN)"
            in (context.json()["detail"])
        )

        # What fits is still answered, streamed too (the body replayed past the limit check).
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": [_user("标题：球队夺冠")], "stream": True, "max_tokens": 8},
        ) as stream:
            assert stream.status_code == 200
            events = [line for line in stream.iter_lines() if line.startswith("data: {")]
        assert (
            "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events)
            == ANSWERS["A"]
        )
        assert classify(client)["label"] == ANSWERS["A"]
        metrics = client.get("/metrics").text
        assert 'endpoint="unmatched",status="413"' in metrics  # refused before any route ran


def test_a_long_prompt_is_tokenized_off_the_event_loop(
    db_url, store, tiny_model_dir, adapters
) -> None:
    settings = local_settings(
        db_url,
        store.root,
        tiny_model_dir,
        serving_max_body_bytes=64 << 20,
        serving_max_chat_chars=2_000_000,
    )
    rng = random.Random(0)
    text = "".join(
        rng.choice("球队夺冠股市大涨科技新闻消息报道动态，。 ") for _ in range(1_000_000)
    )
    with serve_in_thread(settings) as serving, serving.client() as client:
        answer: dict = {}

        def long_chat() -> None:
            answer["response"] = _chat(client, [_user(text)])

        worker = threading.Thread(target=long_chat)
        started = time.perf_counter()
        worker.start()
        latencies = []
        while worker.is_alive():
            before = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - before)
            time.sleep(0.05)
        worker.join()
        took = time.perf_counter() - started
    response = answer["response"]
    assert response.status_code == 422 and "SERVING_MAX_MODEL_LEN" in response.json()["detail"]
    # Tokenizing a million characters takes seconds here; health checks kept being answered.
    assert took > 1.5 and len(latencies) >= 10, (took, len(latencies))
    assert max(latencies) < 1.0, max(latencies)
