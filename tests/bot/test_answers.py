"""What Slack shows of a model's answers and scores, pure Block Kit from serving's and the
runner's payloads: `/classify` (a label with its confidence and alternatives, uncertain below the
threshold, free text never as a label), the eval report (the scores that matter first, then the
per-class table) and a page of mistakes, each within Slack's limits."""

from __future__ import annotations

import json
from typing import Any

from bot.answer_blocks import (
    FEEDBACK_BLOCK,
    classify_blocks,
    classify_text,
    mistakes,
    mistakes_blocks,
)
from bot.blocks import decided_blocks, eval_report_blocks
from bot.commands import CLASSIFY_USAGE, parse_classify
from bot.console import blocks_text
from bot.standin import MAX_BLOCKS, MAX_SECTION_CHARS

LABELLED = {
    "kind": "label",
    "answer": "体育",
    "label": "体育",
    "confidence": 0.934,
    "uncertain": False,
    "scores": {"体育": 0.934, "娱乐": 0.041, "社会": 0.015, "财经": 0.01},
    "reasoning": "标题说球队夺冠。\n所以是体育。",
    "reasoning_mode": "on",
    "reasoning_cut": False,
    "model": {"adapter": "checkpoint-7", "checkpoint_id": 7},
    "latency_ms": 182.4,
}


def _fits_slack(blocks: list[dict[str, Any]]) -> None:
    assert len(blocks) <= MAX_BLOCKS
    for block in blocks:
        texts = [block.get("text", {}).get("text", "")]
        texts += [
            e.get("text", "") for e in block.get("elements", []) if block["type"] == "context"
        ]
        assert all(len(t) <= MAX_SECTION_CHARS for t in texts), block


def _texts(blocks: list[dict[str, Any]]) -> list[str]:
    return [blocks_text([b]) for b in blocks]


def test_a_label_shows_its_confidence_the_alternatives_and_folds_the_reasoning() -> None:
    blocks = classify_blocks("球队夺冠", LABELLED)
    head, context, _, reasoning = _texts(blocks)
    assert head == "*体育* · 93%  ←  球队夺冠"
    assert context.strip() == (
        "then 娱乐 4% · 社会 2% · 财经 1% · answered by checkpoint 7 in 182 ms"
    )
    select, thumbs = blocks[2]["elements"]  # the feedback control, above the reasoning
    assert select["placeholder"]["text"] == "Wrong label?"
    assert [o["value"] for o in select["options"]] == ["娱乐", "社会", "财经"]
    assert json.loads(thumbs["value"]) == {
        "text": "球队夺冠",
        "label": "体育",
        "confidence": 0.934,
        "checkpoint_id": 7,
    }
    assert blocks[3]["type"] == "section" and blocks[3]["expand"] is False  # "Show more"
    assert reasoning == ":thought_balloon: _reasoning:_ 标题说球队夺冠。\n所以是体育。"
    assert classify_text(LABELLED) == "体育 · 93%"


def test_an_answer_below_the_threshold_says_it_is_uncertain_and_never_bolds_the_guess() -> None:
    answer = {
        **LABELLED,
        "answer": "uncertain",
        "confidence": 0.41,
        "uncertain": True,
        "scores": {"体育": 0.41, "娱乐": 0.39, "社会": 0.2},
    }
    head = _texts(classify_blocks("球队夺冠", answer, threshold=0.6))[0]
    assert head == (
        ":grey_question: uncertain: best guess 体育 at 41%, below the 60% threshold  ←  球队夺冠"
    )
    assert "*" not in head
    unknown = _texts(classify_blocks("球队夺冠", answer))[0]
    assert "best guess 体育 at 41%, below the threshold" in unknown
    assert classify_text(answer) == "uncertain (best guess 体育 · 41%)"


def test_free_text_of_the_base_model_is_quoted_and_never_shown_as_a_label() -> None:
    answer = {
        "kind": "free_text",
        "answer": "这是一条关于 *足球* 的新闻\n<!channel> 快看",
        "label": None,
        "confidence": None,
        "scores": None,
        "reasoning": None,
        "truncated": True,
        "raw": "…",
        "model": {"adapter": None, "checkpoint_id": None},
        "latency_ms": 950.0,
    }
    blocks = classify_blocks("球队夺冠", answer)
    assert len(blocks) == 2  # no reasoning
    head, context = _texts(blocks)
    assert head == "“球队夺冠” →\n>这是一条关于 *足球* 的新闻\n>&lt;!channel&gt; 快看"
    assert not head.startswith("*")
    assert "free text from the base model: it has no label set, so this is no label" in context
    assert "answered by the base model in 950 ms" in context
    assert "cut at the length limit" in context
    assert classify_text(answer) == "free text: 这是一条关于 *足球* 的新闻\n<!channel> 快看"


def test_reasoning_off_and_a_cut_reasoning_are_said() -> None:
    off = {**LABELLED, "reasoning": None, "reasoning_mode": "off"}
    blocks = classify_blocks("球队夺冠", off)
    assert len(blocks) == 3 and blocks[1]["elements"][0]["text"].endswith("without reasoning")
    cut = {**LABELLED, "reasoning_cut": True}
    assert "its reasoning was cut at the length limit" in _texts(classify_blocks("x", cut))[1]


def test_the_feedback_control_only_where_slack_and_the_answer_allow_it() -> None:
    def control(answer: dict[str, Any], text: str = "球队夺冠") -> bool:
        return any(b.get("block_id") == FEEDBACK_BLOCK for b in classify_blocks(text, answer))

    assert control(LABELLED)
    assert control({**LABELLED, "uncertain": True})  # a guess is worth correcting too
    assert not control({**LABELLED, "model": {"adapter": None, "checkpoint_id": None}})
    assert not control({**LABELLED, "scores": {"体育": 1.0}})  # nothing else to choose
    assert not control(LABELLED, text="长" * 2000)  # the 👍's value would pass 2,000 chars
    many = {f"类{i}": 0.001 for i in range(102)}
    assert not control({**LABELLED, "label": "类0", "scores": many})  # over 100 options


def test_an_answer_of_the_older_shape_still_shows_its_label() -> None:
    old = {
        "label": "体育",
        "reasoning": "讲的是球赛。",
        "model": {"adapter": None, "checkpoint_id": 3},
        "latency_ms": 12.0,
    }
    blocks = classify_blocks("球队夺冠", old)
    assert _texts(blocks)[0] == "*体育*  ←  球队夺冠"
    assert "answered by checkpoint 3 in 12 ms" in _texts(blocks)[1]
    assert classify_text(old) == "体育"


def test_a_huge_answer_fits_in_slacks_limits() -> None:
    huge = {**LABELLED, "reasoning": "想" * 10_000}
    _fits_slack(classify_blocks("标题" * 2_000, huge))
    free = {"kind": "free_text", "answer": "字" * 10_000, "model": {}, "latency_ms": 1.0}
    _fits_slack(classify_blocks("标题", free))


def test_classify_takes_a_model_and_a_reasoning_mode_before_the_text() -> None:
    assert parse_classify("球队夺冠") == ({"text": "球队夺冠", "model": None}, None)
    assert parse_classify("reasoning=off --model base 球队 夺冠") == (
        {"text": "球队 夺冠", "model": "base", "reasoning": "off"},
        None,
    )
    assert parse_classify("--model 7") == ({}, CLASSIFY_USAGE)
    assert parse_classify("reasoning=later 球队")[1] == (
        "`reasoning=` takes `on` or `off`, not `later`"
    )
    assert parse_classify("球队 reasoning=off")[0]["text"] == "球队 reasoning=off"  # text


# The eval report ------------------------------------------------------------------------------

OLD_REPORT = {  # an `evaluated` event before confidences (kept in the DB, delivered late)
    "checkpoint_id": 4,
    "report_path": "evals/4",
    "accuracy": 0.5,
    "macro_f1": 0.3333,
    "invalid_rate": 0.5,
    "truncated_rate": 0.25,
    "predict_rouge-1": 40.0,
    "predict_rouge-2": 30.0,
    "predict_rouge-l": 35.0,
    "predict_bleu-4": 20.0,
    "vs_base": {"accuracy": 0.3, "macro_f1": 0.2},
    "vs_promoted": None,
}
REPORT = {
    **OLD_REPORT,
    "evaluation_id": 12,
    "accuracy": 0.91,
    "macro_f1": 0.895,
    "ece": 0.042,
    "accuracy_reasoning_off": 0.88,
    "macro_f1_reasoning_off": 0.86,
    "free_invalid_rate": 0.03,
    "free_truncated_rate": 0.01,
    "reasoning_cut_rate": 0.02,
    "per_class": {
        "体育": {"precision": 0.95, "recall": 0.93, "f1": 0.94, "support": 20},
        "财经": {"precision": 0.7, "recall": 0.8, "f1": 0.747, "support": 10},
        "娱乐": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5},
    },
    "vs_base": {"accuracy": 0.12, "macro_f1": 0.101, "ece": -0.02, "accuracy_reasoning_off": 0.1},
    "vs_promoted": {"accuracy": 0.015, "macro_f1": -0.004, "ece": 0.001},
}


def test_the_report_leads_with_accuracy_f1_calibration_and_the_deltas() -> None:
    blocks = eval_report_blocks(REPORT)
    _fits_slack(blocks)
    lines = blocks[0]["text"]["text"].splitlines()
    assert lines[:7] == [
        ":bar_chart: *Evaluation of checkpoint 4*",
        "*Accuracy* 91.0% · +12.0 pt vs base · +1.5 pt vs serving",
        "*Macro-F1* 89.5% · +10.1 pt vs base · -0.4 pt vs serving",
        "*Calibration* ECE 4.2% · -2.0 pt vs base · +0.1 pt vs serving (lower is better): its "
        "confidence is about 4 points off how often it is right: its percentages can be trusted",
        "*Without reasoning* accuracy 88.0% · +10.0 pt vs base · macro-F1 86.0% (with reasoning "
        "91.0% / 89.5%)",
        "Free generation (no label constraint): 3.0% invalid answers · 1.0% cut at the length "
        "limit · reasoning cut in 2.0%",
        "ROUGE-1/2/L 40.00 / 30.00 / 35.00 · BLEU-4 20.00 (whole answers, for parity)",
    ]
    table = blocks[1]["text"]["text"].splitlines()
    assert table[0] == "*Per class* (weakest F1 first)"
    assert [row.split()[0] for row in table[3:6]] == ["财经", "体育", "娱乐"]
    assert table[3].split()[1:] == ["70%", "80%", "75%", "10"]
    decide, show = blocks[2], blocks[3]
    assert [e["action_id"] for e in decide["elements"]] == [
        "approve_checkpoint",
        "reject_checkpoint",
    ]
    assert show["elements"][0]["action_id"] == "show_mistakes"
    assert show["elements"][0]["text"]["text"] == "Show mistakes"
    assert show["elements"][0]["value"] == '{"evaluation_id": 12, "offset": 0}'


def test_an_older_report_keeps_its_layout_and_has_nothing_it_cannot_show() -> None:
    blocks = eval_report_blocks(OLD_REPORT)
    assert len(blocks) == 2  # no per-class table, no Show mistakes without an evaluation id
    text = blocks[0]["text"]["text"]
    assert "*Accuracy* 50.0% · +30.0 pt vs base\n*Macro-F1* 33.3% · +20.0 pt vs base" in text
    assert "Invalid answers 50.0% · truncated 25.0%" in text
    assert "Calibration" not in text and "Without reasoning" not in text
    assert "Free generation" not in text
    no_reasoning = {**REPORT, "accuracy_reasoning_off": None, "macro_f1_reasoning_off": None}
    assert "Without reasoning" not in eval_report_blocks(no_reasoning)[0]["text"]["text"]
    odd = {**REPORT, "per_class": {"体育": {"f1": 0.5, "support": None}, "财经": "?"}}
    assert eval_report_blocks(odd)[1]["text"]["text"].splitlines()[3].split() == [
        "体育",
        "–",
        "–",
        "50%",
        "–",
    ]
    free_form = {**REPORT, "accuracy": None, "macro_f1": None, "per_class": None}
    assert all(b.get("block_id") != "mistakes-12" for b in eval_report_blocks(free_form))


def test_a_report_of_many_classes_fits_and_says_how_many_are_left_out() -> None:
    many = {
        f"很长的类别名称{i:03d}": {"precision": 0.5, "recall": 0.5, "f1": i / 1000, "support": 3}
        for i in range(400)
    }
    blocks = eval_report_blocks({**REPORT, "per_class": many, "backend_note": "注" * 5000})
    _fits_slack(blocks)
    table = blocks[1]["text"]["text"]
    assert table.endswith(" more classes\n```")
    assert table.splitlines()[3].startswith("很长的类别名称000")  # the weakest first


def test_a_decision_removes_the_decision_buttons_and_keeps_show_mistakes() -> None:
    decided = decided_blocks(eval_report_blocks(REPORT), "Rejected by <@U1>.")
    actions = [e["action_id"] for b in decided if b["type"] == "actions" for e in b["elements"]]
    assert actions == ["show_mistakes"]
    assert decided[-1]["elements"][0]["text"] == "Rejected by <@U1>."


# A page of mistakes ---------------------------------------------------------------------------


def _rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "text": f"标题{i}",
            "reference": "体育",
            "prediction": "财经" if i % 2 else "体育",
            "correct": i % 2 == 0,
            "confidence": i / 100,
            "reasoning": f"\n第{i}条的理由。\n第二行。",
        }
        for i in range(n)
    ]


def test_a_page_lists_the_most_confident_mistakes_first_with_a_button_for_the_next() -> None:
    wrong = mistakes(_rows(30))  # 15 wrong: 29, 27, …, 1
    assert [r["text"] for r in wrong[:3]] == ["标题29", "标题27", "标题25"]
    page = mistakes_blocks(wrong, evaluation_id=5, subject="checkpoint 7", offset=0, total=30)
    _fits_slack(page)
    texts = _texts(page)
    assert texts[0] == (
        ":mag: *Mistakes of checkpoint 7*, 1–10 of 15 (15 of 30 eval samples wrong), most "
        "confident first"
    )
    assert texts[1] == "• 标题29\n   *体育* → 财经 at 29% · _第29条的理由。_"
    assert len(page) == 12  # the head, 10 mistakes, the button
    button = page[-1]["elements"][0]
    assert button["text"]["text"] == "More mistakes"
    assert button["value"] == '{"evaluation_id": 5, "offset": 10}'
    last = mistakes_blocks(wrong, evaluation_id=5, subject="checkpoint 7", offset=10, total=30)
    assert _texts(last)[0].startswith(":mag: *Mistakes of checkpoint 7*, 11–15 of 15")
    assert len(last) == 6 and all(b["type"] == "section" for b in last)  # no more button
    none = mistakes_blocks([], evaluation_id=5, subject="checkpoint 7", offset=0, total=30)
    assert _texts(none) == [
        ":white_check_mark: checkpoint 7 classified all 30 eval samples correctly."
    ]
