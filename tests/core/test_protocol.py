"""Golden tests pinning the prompt/label protocol."""

from __future__ import annotations

import pytest

from core.protocol import (
    Message,
    ParsedAnswer,
    PromptFrame,
    match_label,
    parse_answer,
    render_prompt,
    render_training_example,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\n球赛。\n</think>\n\n体育", ParsedAnswer("球赛。", "体育", False)),
        ("体育", ParsedAnswer(None, "体育", False)),
        ("  \n 体育 \n", ParsedAnswer(None, "体育", False)),
        ("<think>想</think>   财经  ", ParsedAnswer("想", "财经", False)),
        (
            "球赛。\n</think>\n\n体育",
            ParsedAnswer("球赛。", "体育", False),
        ),  # <think> in the prompt
        ("<think>\n还没想完", ParsedAnswer("还没想完", None, True)),
        ("<think>\n想完了\n</think>\n\n", ParsedAnswer("想完了", None, False)),
        ("", ParsedAnswer(None, None, False)),
    ],
)
def test_parse_answer(text: str, expected: ParsedAnswer) -> None:
    assert parse_answer(text) == expected


def test_match_label_tolerates_punctuation_but_not_other_labels() -> None:
    labels = ["体育", "财经"]
    assert match_label("体育", labels) == "体育"
    assert match_label("体育。", labels) == "体育"
    assert match_label("【财经】", labels) == "财经"
    assert match_label("财经\n因为……", labels) == "财经"
    assert match_label("政治", labels) is None
    assert match_label(None, labels) is None


def _conv(user: str, answer: str = "x", system: str | None = None) -> list[Message]:
    head = [Message("system", system)] if system else []
    return [*head, Message("user", user), Message("assistant", answer)]


def test_prompt_frame_infers_constant_text_around_the_variable_part() -> None:
    conversations = [
        _conv("请分类：\n标题：股市大涨", system="你是编辑"),
        _conv("请分类：\n标题：股价下跌", system="你是编辑"),  # shares 股 after the frame
        _conv("请分类：\n标题：球队夺冠", system="你是编辑"),
    ]
    frame = PromptFrame.infer(conversations)
    assert frame == PromptFrame(system="你是编辑", prefix="请分类：\n标题：", suffix="")
    assert frame.conversation("新闻") == [
        Message("system", "你是编辑"),
        Message("user", "请分类：\n标题：新闻"),
    ]


def test_prompt_frame_does_not_swallow_a_shared_first_character() -> None:
    frame = PromptFrame.infer([_conv("股市大涨"), _conv("股价下跌")])
    assert frame.prefix == ""
    assert (
        PromptFrame.infer([_conv("标题：A。请回答"), _conv("标题：B。请回答")]).suffix == "。请回答"
    )


def test_prompt_frame_round_trips_through_dict() -> None:
    frame = PromptFrame(system="s", prefix="p：", suffix="。")
    assert PromptFrame.from_dict(frame.to_dict()) == frame


def test_served_prompt_is_a_token_prefix_of_the_training_sequence(tokenizer) -> None:
    conversation = _conv("标题：北部在售1居小户型推荐", "<think>\n讲楼市。\n</think>\n\n房产")
    example = render_training_example(tokenizer, conversation)
    prompt = render_prompt(tokenizer, conversation[:-1])
    assert example.input_ids[: len(prompt)] == prompt
    assert example.prompt_len == len(prompt)


def test_only_the_answer_and_eos_are_trained_on(tokenizer) -> None:
    answer = "<think>\n讲楼市。\n</think>\n\n房产"
    example = render_training_example(tokenizer, _conv("标题：北部在售", answer))
    trained = example.input_ids[example.prompt_len :]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]) == answer
    assert tokenizer.decode(example.input_ids[: example.prompt_len]).endswith("<｜Assistant｜>")


@pytest.mark.parametrize("label", ["体育", "财经", "房产", "science", "A/B 类"])
def test_every_label_round_trips_through_render_and_parse(tokenizer, label: str) -> None:
    example = render_training_example(
        tokenizer, _conv("标题：x", f"<think>\n想\n</think>\n\n{label}")
    )
    decoded = tokenizer.decode(example.input_ids[example.prompt_len :], skip_special_tokens=True)
    assert parse_answer(decoded).label == label


class _R1StyleTokenizer:
    """A template that ends the generation prompt with <think>, as newer DeepSeek-R1 ones do."""

    eos_token_id = 0

    def apply_chat_template(self, conversation, **kwargs):
        return (
            "".join(f"[{m['role']}]{m['content']}" for m in conversation) + "[assistant]<think>\n"
        )

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) for c in text]}


def test_think_already_in_the_generation_prompt_is_not_trained_twice() -> None:
    example = render_training_example(_R1StyleTokenizer(), _conv("q", "<think>\n想\n</think>\n\nA"))
    assert example.answer == "想\n</think>\n\nA"
    assert parse_answer(example.answer).label == "A"


def test_a_conversation_must_end_with_the_answer(tokenizer) -> None:
    with pytest.raises(ValueError, match="assistant"):
        render_training_example(tokenizer, [Message("user", "q")])
