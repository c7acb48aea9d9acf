"""How a model's answers look in Slack: ``/classify``'s answer (a label with its confidence, the
next alternatives, the reasoning folded; free text shown as text, never as a label) and the pages
of an evaluation's mistakes. Pure functions of serving's and evaluation's payloads.

Whatever a model wrote (free text, reasoning, even a label) is escaped before it goes into mrkdwn:
a model that writes ``<!channel>`` must not ping a channel.
"""

from __future__ import annotations

import json
from typing import Any

from bot.blocks import cut, escape, pct, served_name, show_mistakes_button

FEEDBACK_BLOCK = "feedback"
CORRECT_LABEL = "correct_label"  # the "Wrong label?" select under a /classify answer
CONFIRM_LABEL = "confirm_label"  # its 👍
BUTTON_VALUE_MAX = 2000  # Slack's limits: a button's value, a select's options and their values
SELECT_OPTIONS_MAX = 100
FEEDBACK_LABEL_MAX = 150
MISTAKES_PAGE = 10  # mistakes per thread reply: one section each, well under Slack's 50 blocks


def alternatives(scores: dict[str, float] | None, label: str | None, n: int = 2) -> str:
    """The next most probable labels after ``label`` (serving sorts ``scores``, highest first).

    >>> alternatives({"体育": 0.93, "娱乐": 0.04, "社会": 0.02, "财经": 0.01}, "体育")
    'then 娱乐 4% · 社会 2%'
    >>> alternatives({"体育": 1.0}, "体育"), alternatives(None, None)
    ('', '')
    """
    ranked = sorted((scores or {}).items(), key=lambda item: -item[1])
    rest = [(k, v) for k, v in ranked if k != label][:n]
    return ("then " + " · ".join(f"{escape(k)} {pct(v)}" for k, v in rest)) if rest else ""


def classify_blocks(
    text: str, answer: dict[str, Any], *, threshold: float | None = None
) -> list[dict[str, Any]]:
    """``/classify``'s answer (``answer`` is serving's ``POST /v1/classify``).

    A label of the checkpoint's set: ``*体育* · 93%  ←  headline``, the next alternatives and who
    answered in a context line. Below the confidence threshold (``threshold``, serving's
    ``SERVING_MIN_CONFIDENCE``, when the bot knows it) it says it is uncertain and shows its best
    guess as a guess, never in bold. Under a checkpoint's label, the "Wrong label?" select and a
    👍 (:func:`feedback_control`). Free text (a base model without a label set, or a checkpoint
    trained on free-form answers): the text quoted, said to be free text. The reasoning comes
    last, in a section Slack folds behind "Show more". An answer of the older shape (a label, no
    confidence) is shown as before.

    >>> blocks = classify_blocks("球队夺冠", {"kind": "label", "label": "体育", "confidence": 0.93,
    ...     "uncertain": False, "scores": {"体育": 0.93, "娱乐": 0.05, "社会": 0.02},
    ...     "model": {"checkpoint_id": 7}, "latency_ms": 41.2})
    >>> blocks[0]["text"]["text"]
    '*体育* · 93%  ←  球队夺冠'
    >>> blocks[1]["elements"][0]["text"]
    'then 娱乐 5% · 社会 2% · answered by checkpoint 7 in 41 ms'
    >>> blocks[2]["block_id"]
    'feedback'
    """
    kind = answer.get("kind") or ("label" if answer.get("label") else "free_text")
    who = served_name(answer.get("model"))
    context = [f"answered by {who}" + _latency(answer.get("latency_ms"))]
    asked = escape(cut(text, 300))
    if kind == "label":
        label, confidence = escape(str(answer.get("label"))), answer.get("confidence")
        if answer.get("uncertain"):
            below = f"below the {pct(threshold)} threshold" if threshold else "below the threshold"
            head = (
                f":grey_question: uncertain: best guess {label} at {pct(confidence)}, {below}"
                f"  ←  {asked}"
            )
        elif confidence is None:  # serving before confidences
            head = f"*{label}*  ←  {asked}"
        else:
            head = f"*{label}* · {pct(confidence)}  ←  {asked}"
        others = alternatives(answer.get("scores"), answer.get("label"), n=3)
        if others:
            context.insert(0, others)
        if answer.get("reasoning_mode") == "off":
            context.append("without reasoning")
        if answer.get("reasoning_cut"):
            context.append("its reasoning was cut at the length limit")
        if answer.get("valid_label") is False:  # serving before constrained labels
            context.append("not one of the trained labels")
    else:
        said = escape((answer.get("answer") or "").strip() or "(nothing)")
        quoted = cut(said, 2000).replace("\n", "\n>")
        head = f"“{asked}” →\n>{quoted}"
        context.append(f"free text from {who}: it has no label set, so this is no label")
        if answer.get("truncated"):
            context.append("cut at the length limit")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": cut(head)}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": cut(" · ".join(context))}]},
    ]
    control = feedback_control(text, answer) if kind == "label" else None
    if control is not None:  # above the reasoning: seen without unfolding it
        blocks.append(control)
    if answer.get("reasoning"):
        blocks.append(
            {
                "type": "section",
                "expand": False,  # Slack shows the first lines and "Show more"
                "text": {
                    "type": "mrkdwn",
                    "text": cut(f":thought_balloon: _reasoning:_ {escape(answer['reasoning'])}"),
                },
            }
        )
    return blocks


def feedback_control(text: str, answer: dict[str, Any]) -> dict[str, Any] | None:
    """The "Wrong label?" select (the checkpoint's other labels) and a 👍 under a label answer
    of a checkpoint; bot/feedback.py records the choice. The 👍's value carries the answer (the
    headline, the label, its confidence, the checkpoint) for both: a select option's value holds
    only the label. None where it cannot be offered: the base model, a label or headline too long
    for Slack's limits, fewer than two labels.

    >>> control = feedback_control("球队夺冠", {"label": "体育", "confidence": 0.93,
    ...     "scores": {"体育": 0.93, "娱乐": 0.05}, "model": {"checkpoint_id": 7}})
    >>> [o["value"] for o in control["elements"][0]["options"]]
    ['娱乐']
    >>> json.loads(control["elements"][1]["value"])
    {'text': '球队夺冠', 'label': '体育', 'confidence': 0.93, 'checkpoint_id': 7}
    """
    checkpoint_id = (answer.get("model") or {}).get("checkpoint_id")
    label, labels = answer.get("label"), list(answer.get("scores") or {})
    others = [other for other in labels if other != label]
    if not isinstance(checkpoint_id, int) or not isinstance(label, str) or not others:
        return None
    if any(len(item) > FEEDBACK_LABEL_MAX for item in labels) or len(others) > SELECT_OPTIONS_MAX:
        return None
    confidence = answer.get("confidence")
    value = json.dumps(
        {
            "text": text,
            "label": label,
            "confidence": round(confidence, 4) if isinstance(confidence, int | float) else None,
            "checkpoint_id": checkpoint_id,
        },
        ensure_ascii=False,
    )
    if len(value) > BUTTON_VALUE_MAX:
        return None
    options = [
        {"text": {"type": "plain_text", "text": cut(other, 75)}, "value": other}
        for other in sorted(others)
    ]
    return {
        "type": "actions",
        "block_id": FEEDBACK_BLOCK,
        "elements": [
            {
                "type": "static_select",
                "action_id": CORRECT_LABEL,
                "placeholder": {"type": "plain_text", "text": "Wrong label?"},
                "options": options,
            },
            {
                "type": "button",
                "action_id": CONFIRM_LABEL,
                "text": {"type": "plain_text", "text": ":+1:", "emoji": True},
                "value": value,
            },
        ],
    }


def _latency(ms: float | None) -> str:
    return f" in {ms:.0f} ms" if isinstance(ms, int | float) else ""


def classify_text(answer: dict[str, Any]) -> str:
    """The notification text of ``/classify``'s answer (what a phone shows).

    >>> classify_text({"kind": "label", "label": "体育", "confidence": 0.93})
    '体育 · 93%'
    >>> classify_text({"kind": "label", "label": "体育", "confidence": 0.4, "uncertain": True})
    'uncertain (best guess 体育 · 40%)'
    >>> classify_text({"kind": "free_text", "answer": "一段话", "label": None})
    'free text: 一段话'
    """
    kind = answer.get("kind") or ("label" if answer.get("label") else "free_text")
    if kind == "label":
        shown = str(answer.get("label"))
        if answer.get("confidence") is not None:
            shown += f" · {pct(answer['confidence'])}"
        return f"uncertain (best guess {shown})" if answer.get("uncertain") else shown
    return "free text: " + cut(str(answer.get("answer") or "(nothing)").strip(), 300)


# An evaluation's mistakes --------------------------------------------------------------------


def has_labels(rows: list[dict[str, Any]]) -> bool:
    """Whether an evaluation's rows carry labelled predictions (older evaluations wrote only the
    free generation: prompt, predict, label).

    >>> has_labels([{"prompt": "p", "predict": "x", "label": "y"}])
    False
    >>> has_labels([{"reference": "体育", "prediction": "财经"}])
    True
    """
    return any("reference" in row and "prediction" in row for row in rows)


def mistakes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The misclassified rows of an evaluation's ``generated_predictions.jsonl``, the most
    confident mistakes first (what a team should look at first in its data); the file's order
    among equally confident ones.

    >>> rows = [{"text": "a", "reference": "体育", "prediction": "体育", "confidence": 0.9},
    ...         {"text": "b", "reference": "体育", "prediction": "娱乐", "confidence": 0.6},
    ...         {"text": "c", "reference": "财经", "prediction": "股票", "confidence": 0.8},
    ...         {"text": "d", "reference": "财经", "prediction": "财经", "correct": False}]
    >>> [r["text"] for r in mistakes(rows)]
    ['c', 'b', 'd']
    """
    wrong = [r for r in rows if "reference" in r and not _correct(r)]
    return sorted(wrong, key=lambda r: -(r.get("confidence") or 0.0))


def _correct(row: dict[str, Any]) -> bool:
    if row.get("correct") is not None:
        return bool(row["correct"])
    return row.get("prediction") == row.get("reference")


def first_line(text: str | None) -> str:
    """The first line of a reasoning that says something.

    >>> first_line("\\n  讲的是球赛。\\n所以是体育。"), first_line(None)
    ('讲的是球赛。', '')
    """
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def mistake_text(row: dict[str, Any]) -> str:
    """One mistake: the headline, reference → prediction with its confidence, the reasoning's
    first line, and whether the answer without reasoning was right.

    >>> mistake_text({"text": "球队夺冠", "reference": "体育", "prediction": "娱乐",
    ...               "confidence": 0.81, "reasoning": "像是明星新闻。\\n……"})
    '• 球队夺冠\\n   *体育* → 娱乐 at 81% · _像是明星新闻。_'
    """
    headline = escape(cut(str(row.get("text") or row.get("prompt") or "(no text)"), 300))
    predicted = row.get("prediction")
    shown = escape(str(predicted)) if predicted is not None else "no label"
    line = f"• {headline}\n   *{escape(str(row.get('reference')))}* → {shown}"
    if row.get("confidence") is not None:
        line += f" at {pct(row['confidence'])}"
    reason = first_line(row.get("reasoning"))
    if reason:
        line += f" · _{escape(cut(reason, 300))}_"
    if row.get("prediction_reasoning_off") == row.get("reference"):
        line += " · right without reasoning"  # the reasoning led it astray
    return line


def mistakes_blocks(
    wrong: list[dict[str, Any]], *, evaluation_id: int, subject: str, offset: int, total: int
) -> list[dict[str, Any]]:
    """One page of mistakes as a thread reply (``wrong`` from :func:`mistakes`, ``total`` the
    evaluated samples): a line of where this page is, one section per mistake, and a More
    mistakes button while more remain.

    >>> rows = [{"text": f"t{i}", "reference": "a", "prediction": "b", "confidence": 0.5}
    ...         for i in range(12)]
    >>> page = mistakes_blocks(rows, evaluation_id=3, subject="checkpoint 7", offset=10,
    ...                        total=40)
    >>> page[0]["text"]["text"]
    ':mag: *Mistakes of checkpoint 7*, 11–12 of 12 (12 of 40 eval samples wrong), most confident first'
    >>> len(page), page[-1]["type"]
    (3, 'section')
    """
    if not wrong:
        text = f":white_check_mark: {subject} classified all {total} eval samples correctly."
        return [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if offset >= len(wrong):
        text = f"No more mistakes: {subject} made {len(wrong)}, all shown above."
        return [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    shown = wrong[offset : offset + MISTAKES_PAGE]
    head = (
        f":mag: *Mistakes of {subject}*, {offset + 1}–{offset + len(shown)} of {len(wrong)} "
        f"({len(wrong)} of {total} eval samples wrong), most confident first"
    )
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": head}}]
    blocks += [
        {"type": "section", "text": {"type": "mrkdwn", "text": cut(mistake_text(row))}}
        for row in shown
    ]
    following = offset + len(shown)
    if following < len(wrong):
        blocks.append(
            {
                "type": "actions",
                "block_id": f"mistakes-{evaluation_id}-{following}",
                "elements": [show_mistakes_button(evaluation_id, offset=following)],
            }
        )
    return blocks


def mistakes_text(wrong: list[dict[str, Any]], *, subject: str, offset: int) -> str:
    """The notification text of a page of mistakes."""
    if not wrong:
        return f"{subject} made no mistakes"
    end = min(offset + MISTAKES_PAGE, len(wrong))
    return f"Mistakes of {subject}, {offset + 1}–{end} of {len(wrong)}"
