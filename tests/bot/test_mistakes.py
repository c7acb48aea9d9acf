"""Show mistakes on the eval report: anyone in the channel may click it; the misclassified eval
samples, most confident first, arrive a page at a time in the report's thread; another channel's
click is refused and nothing is posted there; an older evaluation says why it has none to list."""

from __future__ import annotations

import json
from typing import Any

from bot.standin import block_action_body
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Checkpoint, Evaluation, Job
from tests.bot.conftest import ingest

THREAD = "5.0"  # the job's root message; the report is a reply in its thread
REPORT_TS = "6.0"


def _evaluation(slack, engine, rows: list[dict[str, Any]] | None, channel: str = "C0CHAN") -> int:
    """A checkpoint of a job of ``channel`` and its evaluation, with ``rows`` as the evaluation's
    generated_predictions.jsonl (None: no file)."""
    dataset = ingest(slack, engine, channel=channel)
    with new_session(engine) as session:
        job = Job(
            base_model="tiny",
            status="succeeded",
            channel_id=channel,
            thread_ts=THREAD,
            dataset_id=dataset.id,
        )
        session.add(job)
        session.flush()
        checkpoint = Checkpoint(
            job_id=job.id, step=8, final=True, path=f"c/{job.id}", base_model="tiny"
        )
        session.add(checkpoint)
        session.flush()
        evaluation = Evaluation(
            checkpoint_id=checkpoint.id,
            dataset_id=dataset.id,
            base_model="tiny",
            metrics={"accuracy": 0.5},
            report_path=f"evals/{checkpoint.id}",
        )
        session.add(evaluation)
        session.commit()
        evaluation_id, report_path = evaluation.id, evaluation.report_path
    if rows is not None:
        directory = ArtifactStore(slack.settings.artifact_dir).path(report_path)
        directory.mkdir(parents=True)
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        (directory / "generated_predictions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    assert evaluation_id is not None
    return evaluation_id


def _rows(n: int) -> list[dict[str, Any]]:
    """``n`` eval samples, every third one wrong, the confidences all different."""
    return [
        {
            "prompt": f"标题：新闻{i}",
            "predict": "<think>…</think>财经",
            "label": "<think>…</think>体育",
            "text": f"新闻{i}",
            "reference": "体育",
            "prediction": "财经" if i % 3 == 0 else "体育",
            "correct": i % 3 != 0,
            "confidence": 0.5 + i / 100,
            "scores": {"体育": 0.5, "财经": 0.5},
            "reasoning": f"第{i}条像是财经新闻。\n第二行不显示。",
            "reasoning_cut": False,
            "prediction_reasoning_off": "体育",
            "confidence_reasoning_off": 0.6,
        }
        for i in range(n)
    ]


def _click(
    slack, value: str, *, channel: str = "C0CHAN", user: str = "U0VIEWER", ts=REPORT_TS, blocks=None
):
    body = block_action_body(
        "show_mistakes",
        value,
        user_id=user,
        channel_id=channel,
        message_ts=ts,
        thread_ts=THREAD,
        blocks=blocks,
    )
    assert slack.post(body).status_code == 200


def _show(evaluation_id: int, offset: int = 0) -> str:
    return json.dumps({"evaluation_id": evaluation_id, "offset": offset})


def _sections(post: dict[str, Any]) -> list[str]:
    return [b["text"]["text"] for b in post["blocks"] if b["type"] == "section"]


def test_anyone_in_the_channel_pages_through_the_mistakes_in_the_reports_thread(
    slack, engine
) -> None:
    evaluation = _evaluation(slack, engine, _rows(36))  # 12 wrong: 33, 30, …, 0
    _click(slack, _show(evaluation))  # not an approver: Show mistakes decides nothing
    [first] = slack.standin.wait_for("chat.postMessage")
    assert first["channel"] == "C0CHAN" and first["thread_ts"] == THREAD
    assert first["text"] == "Mistakes of checkpoint 1, 1–10 of 12"
    sections = _sections(first)
    assert sections[0] == (
        ":mag: *Mistakes of checkpoint 1*, 1–10 of 12 (12 of 36 eval samples wrong), most "
        "confident first"
    )
    assert sections[1] == (
        "• 新闻33\n   *体育* → 财经 at 83% · _第33条像是财经新闻。_ · right without reasoning"
    )
    assert [s.split("\n")[0] for s in sections[1:]] == [f"• 新闻{i}" for i in range(33, 3, -3)]
    [more] = first["blocks"][-1]["elements"]
    assert more["text"]["text"] == "More mistakes"

    _click(slack, more["value"], ts=first["_ts"], blocks=first["blocks"])  # in the thread
    second = slack.standin.wait_for("chat.postMessage", 2)[1]
    [spent] = slack.standin.wait_for("chat.update")  # the first page keeps its list, not its button
    assert spent["ts"] == first["_ts"] and spent["blocks"] == first["blocks"][:-1]
    assert second["thread_ts"] == THREAD
    assert _sections(second)[0].startswith(":mag: *Mistakes of checkpoint 1*, 11–12 of 12")
    assert [s.split("\n")[0] for s in _sections(second)[1:]] == ["• 新闻3", "• 新闻0"]
    assert all(b["type"] != "actions" for b in second["blocks"])  # the last page
    assert slack.standin.calls_to("chat.postEphemeral") == []


def test_a_click_from_another_channel_is_refused_and_nothing_is_posted_there(slack, engine) -> None:
    evaluation = _evaluation(slack, engine, _rows(6))
    _click(slack, _show(evaluation), channel="C0OTHER", user="U0SPY")
    [refusal] = slack.standin.wait_for("chat.postEphemeral")
    assert refusal["channel"] == "C0OTHER" and refusal["user"] == "U0SPY"
    assert refusal["text"] == f":warning: no evaluation {evaluation} in this channel"
    _click(slack, _show(999), channel="C0CHAN")  # a missing one reads the same
    missing = slack.standin.wait_for("chat.postEphemeral", 2)[1]
    assert missing["text"] == ":warning: no evaluation 999 in this channel"
    assert slack.standin.calls_to("chat.postMessage") == []
    texts = str([c.params for c in slack.standin.calls])
    assert "新闻" not in texts  # not one sample left the channel


def test_a_channel_that_re_evaluated_the_checkpoint_sees_that_evaluation(slack, engine) -> None:
    evaluation = _evaluation(slack, engine, _rows(3))
    with new_session(engine) as session:  # an approver's `/finetune evaluate 1 all` in C0OTHER
        session.add(
            Job(
                kind="evaluate",
                base_model="tiny",
                status="succeeded",
                channel_id="C0OTHER",
                config={"checkpoint_id": 1},
            )
        )
        session.commit()
    _click(slack, _show(evaluation), channel="C0OTHER")
    [page] = slack.standin.wait_for("chat.postMessage")
    assert page["channel"] == "C0OTHER"
    assert _sections(page)[0].startswith(":mag: *Mistakes of checkpoint 1*, 1–1 of 1")


def test_an_older_evaluation_or_one_without_mistakes_says_so(slack, engine) -> None:
    old = _evaluation(slack, engine, [{"prompt": "p", "predict": "体育", "label": "体育"}])
    _click(slack, _show(old))
    [told] = slack.standin.wait_for("chat.postEphemeral")
    assert told["text"] == (
        f":warning: evaluation {old} of checkpoint 1 is older than per-sample labels: its "
        "predictions have no reference and predicted label to compare. `/finetune evaluate 1` "
        "scores it again with them"
    )
    gone = _evaluation(slack, engine, None)
    _click(slack, _show(gone))
    told = slack.standin.wait_for("chat.postEphemeral", 2)[1]
    assert told["text"] == (
        f":warning: evaluation {gone} of checkpoint 2 kept no per-sample predictions on disk: "
        "nothing to list"
    )
    assert slack.standin.calls_to("chat.postMessage") == []

    perfect = _evaluation(slack, engine, [r for r in _rows(7) if r["correct"]])
    _click(slack, _show(perfect))
    [page] = slack.standin.wait_for("chat.postMessage")
    assert page["thread_ts"] == THREAD
    assert _sections(page) == [
        ":white_check_mark: checkpoint 3 classified all 4 eval samples correctly."
    ]
    _click(slack, "not json")
    broken = slack.standin.wait_for("chat.postEphemeral", 3)[2]
    assert broken["text"] == ":warning: That button does not name an evaluation; nothing to show."
