"""The prompt/label protocol: how a conversation becomes tokens to train on, how a bare text becomes
the prompt it is served with, and how an answer is parsed into reasoning and label.

Training, evaluation and serving all import this module, so the prompt a model was trained on is
exactly the prompt it is served with: the training sequence is ``render_prompt(...)`` followed by the
answer tokens, so the served prompt is a token prefix of the training sequence by construction.

The base model's own chat template renders the prompt; the answer is tokenized on its own and ends
with the tokenizer's end-of-sequence token. Only the final assistant turn is trained on: earlier
turns are history, rendered by the template as it would render them at inference.

>>> parse_answer("<think>\\n讲的是球赛。\\n</think>\\n\\n体育")
ParsedAnswer(reasoning='讲的是球赛。', label='体育', truncated=False)
>>> parse_answer("<think>\\n还没想完").truncated
True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

PROTOCOL_VERSION = 1
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ROLES = ("system", "user", "assistant")

# Trailing characters dropped when a raw label is not in the label set as it stands.
_LABEL_STRIP = " \t\r\n。.!！,，;；:：\"'“”‘’「」『』【】[]()（）*`"


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Conversation = Sequence[Message]


def answer_of(conversation: Conversation) -> str:
    """The final assistant turn: what the model is trained to produce."""
    return conversation[-1].content


@dataclass(frozen=True)
class ParsedAnswer:
    reasoning: str | None
    label: str | None
    truncated: bool


def parse_answer(text: str) -> ParsedAnswer:
    """Split an answer into its ``<think>`` reasoning and the label after ``</think>``.

    Without a ``<think>`` block the whole answer is the label. A ``<think>`` that never closes is a
    truncated answer: no label. A ``</think>`` without its opening tag is accepted, because a chat
    template may put ``<think>`` into the generation prompt so the model never emits it.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        head = text[:close]
        open_at = head.find(THINK_OPEN)
        reasoning = head[open_at + len(THINK_OPEN) :] if open_at >= 0 else head
        label = text[close + len(THINK_CLOSE) :].strip()
        return ParsedAnswer(reasoning.strip(), label or None, truncated=False)
    if THINK_OPEN in text:
        reasoning = text[text.find(THINK_OPEN) + len(THINK_OPEN) :].strip()
        return ParsedAnswer(reasoning or None, None, truncated=True)
    label = text.strip()
    return ParsedAnswer(None, label or None, truncated=False)


def match_label(raw: str | None, labels: Iterable[str]) -> str | None:
    """The label from the set that ``raw`` names, tolerating surrounding punctuation; else None."""
    if raw is None:
        return None
    label_set = set(labels)
    if raw in label_set:
        return raw
    stripped = raw.strip(_LABEL_STRIP)
    if stripped in label_set:
        return stripped
    first_line = stripped.splitlines()[0].strip(_LABEL_STRIP) if stripped else ""
    return first_line if first_line in label_set else None


@dataclass(frozen=True)
class PromptFrame:
    """How a bare text (a headline typed into ``/classify``) becomes the conversation the model was
    trained on: the dataset's constant system prompt and the constant text around the variable part
    of its user turns. Inferred from the training data at ingestion and stored with the dataset and
    every checkpoint trained on it.

    >>> frame = PromptFrame(system=None, prefix="分类：", suffix="")
    >>> [m.content for m in frame.conversation("股市大涨")]
    ['分类：股市大涨']
    """

    system: str | None = None
    prefix: str = ""
    suffix: str = ""

    def conversation(self, text: str) -> list[Message]:
        messages = [Message("system", self.system)] if self.system else []
        messages.append(Message("user", f"{self.prefix}{text}{self.suffix}"))
        return messages

    def to_dict(self) -> dict[str, str | None]:
        return {"system": self.system, "prefix": self.prefix, "suffix": self.suffix}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFrame:
        return cls(
            system=data.get("system"), prefix=data.get("prefix", ""), suffix=data.get("suffix", "")
        )

    @classmethod
    def infer(cls, conversations: Sequence[Conversation]) -> PromptFrame:
        """The longest constant prefix/suffix of the last user turn, cut back to a delimiter so a
        shared first character of the variable part does not become part of the frame."""
        users = [u for u in (_last_user(c) for c in conversations) if u is not None]
        if len(users) < 2:
            return cls(system=_constant_system(conversations))
        prefix = _cut_prefix(os.path.commonprefix(users))
        rests = [u[len(prefix) :] for u in users]
        suffix = _cut_suffix(os.path.commonprefix([r[::-1] for r in rests])[::-1])
        if any(len(r) <= len(suffix) for r in rests):  # the variable part would be empty
            suffix = ""
        return cls(system=_constant_system(conversations), prefix=prefix, suffix=suffix)


_DELIMITERS = set("\n：:。，,?？!！ 　\t「」“”\"'（）()[]【】")


def _cut_prefix(prefix: str) -> str:
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] in _DELIMITERS:
            return prefix[: i + 1]
    return ""


def _cut_suffix(suffix: str) -> str:
    for i, ch in enumerate(suffix):
        if ch in _DELIMITERS:
            return suffix[i:]
    return ""


def _last_user(conversation: Conversation) -> str | None:
    for message in reversed(conversation[:-1]):
        if message.role == "user":
            return message.content
    return None


def _constant_system(conversations: Sequence[Conversation]) -> str | None:
    systems = {c[0].content if c and c[0].role == "system" else None for c in conversations}
    return systems.pop() if len(systems) == 1 else None


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the protocol uses."""

    eos_token_id: int | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


def render_prompt_text(tokenizer: ChatTokenizer, history: Conversation) -> str:
    """The prompt as text: the chat template over ``history`` with the generation prompt."""
    return str(
        tokenizer.apply_chat_template(
            [m.to_dict() for m in history], tokenize=False, add_generation_prompt=True
        )
    )


def render_prompt(tokenizer: ChatTokenizer, history: Conversation) -> list[int]:
    """Token ids of the prompt for ``history`` (every turn before the answer)."""
    text = render_prompt_text(tokenizer, history)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_text(prompt_text: str, answer: str) -> str:
    """Drop an opening ``<think>`` the generation prompt already contains (DeepSeek-R1 templates
    end the generation prompt with ``<think>\\n``), so it is not trained on twice."""
    if prompt_text.rstrip().endswith(THINK_OPEN) and answer.lstrip().startswith(THINK_OPEN):
        return answer.lstrip()[len(THINK_OPEN) :].lstrip("\n")
    return answer


@dataclass
class TrainingExample:
    """One rendered sample: ``input_ids`` = prompt + answer + eos; ``prompt_len`` tokens of prompt
    are context, the rest is trained on."""

    input_ids: list[int]
    prompt_len: int
    answer: str = field(repr=False, default="")

    @property
    def answer_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def render_training_example(
    tokenizer: ChatTokenizer, conversation: Conversation
) -> TrainingExample:
    if not conversation or conversation[-1].role != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    history = conversation[:-1]
    prompt_text = render_prompt_text(tokenizer, history)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    answer = _answer_text(prompt_text, answer_of(conversation))
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token to end answers with")
    return TrainingExample(
        prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids), answer
    )
