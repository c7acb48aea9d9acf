"""A general-ability check: multiple-choice benchmarks in the C-Eval, CMMLU and MMLU CSV layouts,
scored as those benchmarks are scored — the log-probability of each option letter after a fixed
few-shot prompt, the best letter is the answer — with accuracy per subject and overall.

Layouts (one subject a file; the subject is the file name without ``_dev``/``_val``/``_test``):

- C-Eval: a header ``id,question,A,B,C,D,answer[,explanation]`` (its ``test`` split has no public
  answers: use ``val``);
- CMMLU: a header ``,Question,A,B,C,D,Answer`` (an index column first), ``dev/`` and ``test/``
  folders of ``{subject}.csv``;
- MMLU: no header, ``question,A,B,C,D,answer`` per row, ``{subject}_dev.csv`` /
  ``{subject}_test.csv``.

A subject's ``dev`` questions are its few-shot examples; without a ``dev`` file its first
``SHOTS`` questions are, and are not scored. Chinese layouts get C-Eval's prompt (以下是中国关于…考试
的单项选择题 … 答案：A), MMLU its own ("The following are multiple choice questions (with answers)
about … Answer: A"). The prompt is plain text, no chat template, as the benchmarks' reference
evaluations feed a base model; examples are dropped from the end while the prompt is too long.

>>> ask = Question("math", "1+1=?", ("1", "2", "3", "4"), "B", "test")
>>> print(question_text(ask, "zh"))
1+1=?
A. 1
B. 2
C. 3
D. 4
答案：
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import BenchmarkRejected

LETTERS = ("A", "B", "C", "D")
SHOTS = 5
LAYOUTS = ("ceval", "cmmlu", "mmlu")
_SPLITS = ("dev", "val", "test")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of LETTERS
    split: str  # "dev": a few-shot example; "val"/"test": scored


@dataclass(frozen=True)
class Benchmark:
    layout: str
    questions: list[Question]

    def to_bytes(self) -> bytes:
        rows = [{**asdict(q), "options": list(q.options)} for q in self.questions]
        return json.dumps({"layout": self.layout, "questions": rows}, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Benchmark:
        raw = json.loads(data)
        questions = [
            Question(q["subject"], q["question"], tuple(q["options"]), q["answer"], q["split"])  # type: ignore[arg-type]
            for q in raw["questions"]
        ]
        return cls(raw["layout"], questions)

    def language(self) -> str:
        return "en" if self.layout == "mmlu" else "zh"

    def subjects(self) -> dict[str, dict[str, int]]:
        """Per subject: questions scored and few-shot examples available."""
        out: dict[str, dict[str, int]] = {}
        for q in self.questions:
            row = out.setdefault(q.subject, {"scored": 0, "examples": 0})
            row["examples" if q.split == "dev" else "scored"] += 1
        return out


def load_benchmark(files: dict[str, bytes]) -> Benchmark:
    """Parse ``files`` (relative path → bytes; CSVs only count) into a benchmark; every problem
    raises a ``BenchmarkRejected`` naming the file, the row and the field."""
    csvs = {name: data for name, data in sorted(files.items()) if name.lower().endswith(".csv")}
    if not csvs:
        raise BenchmarkRejected(
            "a benchmark needs CSV files in the C-Eval, CMMLU or MMLU layout "
            "(question, A, B, C, D, answer; one subject a file); none was found"
        )
    layouts: set[str] = set()
    questions: list[Question] = []
    for name, data in csvs.items():
        layout, rows = _read_csv(name, data)
        layouts.add(layout)
        subject, split = _subject_and_split(name)
        for number, row in rows:
            questions.append(_question(name, number, row, subject, split))
    if len(layouts) > 1:
        raise BenchmarkRejected(
            f"the benchmark's files mix layouts ({', '.join(sorted(layouts))}): "
            "upload one benchmark at a time"
        )
    questions = _examples_from_scored(questions)
    if not any(q.split != "dev" for q in questions):
        raise BenchmarkRejected("the benchmark has no questions to score (only dev examples)")
    return Benchmark(layouts.pop(), questions)


def _read_csv(name: str, data: bytes) -> tuple[str, list[tuple[int, list[str]]]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BenchmarkRejected(f"{name}: not UTF-8 text (byte {exc.start})") from exc
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise BenchmarkRejected(f"{name}: the file is empty")
    header = [cell.strip() for cell in rows[0]]
    lower = [cell.lower() for cell in header]
    if lower[:7] == ["id", "question", "a", "b", "c", "d", "answer"]:
        layout, columns = "ceval", (1, 2, 3, 4, 5, 6)
    elif lower[1:7] == ["question", "a", "b", "c", "d", "answer"]:
        layout, columns = "cmmlu", (1, 2, 3, 4, 5, 6)
    elif len(header) == 6 and lower[1:5] != ["a", "b", "c", "d"]:
        layout, columns = "mmlu", (0, 1, 2, 3, 4, 5)
        rows = [[], *rows]  # no header: the first row is a question
    else:
        raise BenchmarkRejected(
            f"{name}: the header {header[:8]} is none of C-Eval's (id,question,A,B,C,D,answer), "
            "CMMLU's (,Question,A,B,C,D,Answer) or MMLU's (no header, six columns)"
        )
    out = []
    for number, row in enumerate(rows[1:], start=2 if layout != "mmlu" else 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns):
            raise BenchmarkRejected(
                f"{name} row {number}: {len(row)} columns, the {layout} layout needs "
                f"{max(columns) + 1}"
            )
        out.append((number, [row[c] for c in columns]))
    return layout, out


def _subject_and_split(name: str) -> tuple[str, str]:
    path = Path(name)
    stem = path.stem
    for split in _SPLITS:
        if stem.endswith("_" + split):
            return stem[: -len(split) - 1], split
    parent = path.parent.name.lower()
    return stem, parent if parent in _SPLITS else "test"


def _question(name: str, number: int, row: list[str], subject: str, split: str) -> Question:
    question, a, b, c, d, answer = (cell.strip() for cell in row)
    where = f"{name} row {number}"
    if not question:
        raise BenchmarkRejected(f"{where}: the question is empty")
    for letter, option in zip(LETTERS, (a, b, c, d), strict=True):
        if not option:
            raise BenchmarkRejected(f"{where}: option {letter} is empty")
    if answer.upper() not in LETTERS:
        hint = (
            " (C-Eval's test split has no public answers: use its val split)" if not answer else ""
        )
        raise BenchmarkRejected(f"{where}: the answer {answer!r} is not one of A, B, C, D{hint}")
    return Question(subject, question, (a, b, c, d), answer.upper(), split)


def _examples_from_scored(questions: list[Question]) -> list[Question]:
    """A subject without dev examples lends its first SHOTS questions as examples."""
    with_dev = {q.subject for q in questions if q.split == "dev"}
    taken: dict[str, int] = {}
    out = []
    for q in questions:
        if q.subject not in with_dev and taken.get(q.subject, 0) < SHOTS:
            taken[q.subject] = taken.get(q.subject, 0) + 1
            q = Question(q.subject, q.question, q.options, q.answer, "dev")
        out.append(q)
    return out


def header(subject: str, language: str) -> str:
    name = subject.replace("_", " ")
    if language == "en":
        return f"The following are multiple choice questions (with answers) about {name}.\n\n"
    return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"


def question_text(q: Question, language: str, answer: str | None = None) -> str:
    options = "".join(
        f"{letter}. {option}\n" for letter, option in zip(LETTERS, q.options, strict=True)
    )
    cue = "Answer:" if language == "en" else "答案："
    shown = "" if answer is None else (f" {answer}" if language == "en" else answer) + "\n\n"
    return f"{q.question}\n{options}{cue}{shown}"


def letter_ids(tokenizer: Any, language: str) -> list[int]:
    """The token of each letter as it follows the cue (" A" after "Answer:", "A" after "答案：");
    a tokenizer that splits one of them is refused."""
    ids = []
    for letter in LETTERS:
        piece = f" {letter}" if language == "en" else letter
        tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise BenchmarkRejected(
                f"this tokenizer encodes the option {piece!r} as {len(tokens)} tokens; "
                "the benchmark scores one token an option"
            )
        ids.append(int(tokens[0]))
    return ids


def score_benchmark(
    benchmark: Benchmark,
    tokenizer: Any,
    read: Callable[[Sequence[tuple[list[int], list[int]]]], list[dict[int, float]]],
    *,
    max_prompt_tokens: int,
) -> dict[str, Any]:
    """Accuracy per subject and overall (``accuracy``: over all scored questions;
    ``subject_mean``: the mean of the subjects' accuracies, as C-Eval reports), with
    ``read(requests)`` returning the next-token log-probabilities at each prompt's end."""
    language = benchmark.language()
    candidates = letter_ids(tokenizer, language)
    examples: dict[str, list[Question]] = {}
    for q in benchmark.questions:
        if q.split == "dev":
            examples.setdefault(q.subject, []).append(q)
    scored = [q for q in benchmark.questions if q.split != "dev"]
    requests, shots_used = [], []
    for q in scored:
        shots = examples.get(q.subject, [])[:SHOTS]
        while True:
            text = (
                header(q.subject, language)
                + "".join(question_text(s, language, s.answer) for s in shots)
                + question_text(q, language)
            )
            ids = list(tokenizer(text)["input_ids"])
            if len(ids) <= max_prompt_tokens or not shots:
                break
            shots = shots[:-1]
        requests.append((ids[-max_prompt_tokens:], candidates))
        shots_used.append(len(shots))
    answers = read(requests)
    subjects: dict[str, dict[str, Any]] = {}
    correct_all = 0
    for q, logprobs in zip(scored, answers, strict=True):
        chosen = LETTERS[max(range(len(LETTERS)), key=lambda i: logprobs[candidates[i]])]
        row = subjects.setdefault(q.subject, {"questions": 0, "correct": 0})
        row["questions"] += 1
        row["correct"] += chosen == q.answer
        correct_all += chosen == q.answer
    for row in subjects.values():
        row["accuracy"] = round(row["correct"] / row["questions"], 4)
    accuracies = [row["accuracy"] for row in subjects.values()]
    return {
        "accuracy": round(correct_all / len(scored), 4),
        "subject_mean": round(math.fsum(accuracies) / len(accuracies), 4),
        "questions": len(scored),
        "subjects": subjects,
        "shots": min(shots_used),
        "layout": benchmark.layout,
    }


def general_summary(
    name: str,
    checkpoint: dict[str, Any],
    base: dict[str, Any] | None,
    *,
    max_drop_pt: float | None,
) -> dict[str, Any]:
    """The report's "general ability" entry: the checkpoint's accuracy on the general benchmark,
    the base's and the change in points, and a ``warning`` when it dropped by more than
    ``max_drop_pt`` points.

    >>> general_summary("cmmlu-mini", {"accuracy": 0.5}, {"accuracy": 0.55}, max_drop_pt=2.0)
    ... # doctest: +NORMALIZE_WHITESPACE
    {'benchmark': 'cmmlu-mini', 'accuracy': 0.5, 'base_accuracy': 0.55, 'delta_pt': -5.0,
     'warning': 'general ability dropped 5.0 points on cmmlu-mini (more than EVAL_MAX_GENERAL_DROP,
     2.0)'}
    """
    accuracy = checkpoint["accuracy"]
    base_accuracy = base["accuracy"] if base else None
    delta = None if base_accuracy is None else round((accuracy - base_accuracy) * 100, 2)
    out: dict[str, Any] = {
        "benchmark": name,
        "accuracy": accuracy,
        "base_accuracy": base_accuracy,
        "delta_pt": delta,
    }
    if delta is not None and max_drop_pt is not None and -delta > max_drop_pt:
        out["warning"] = (
            f"general ability dropped {-delta:.1f} points on {name} "
            f"(more than EVAL_MAX_GENERAL_DROP, {max_drop_pt:.1f})"
        )
    return out


def ingest_benchmark(
    session: Any,
    store: Any,
    path: Path,
    limits: Any,
    *,
    name: str,
    channel_id: str | None = None,
    uploaded_by: str | None = None,
) -> Any:
    """Validate the benchmark at ``path`` (a CSV, a folder or a .zip of CSVs), store its
    questions and a ``kind="benchmark"`` dataset row together, or nothing."""
    from runner.datasets.ingest import check_dataset_name
    from runner.datasets.sources import read_upload
    from storage.datasets import create_dataset

    check_dataset_name(name)
    benchmark = load_benchmark(read_upload(path, limits))
    blob = store.put_bytes(benchmark.to_bytes())
    subjects = benchmark.subjects()
    try:
        dataset = create_dataset(
            session,
            name=name,
            source_name=path.name,
            format=benchmark.layout,
            kind="benchmark",
            train_sha256=blob.sha256,
            train_samples=sum(s["scored"] for s in subjects.values()),
            labels=list(LETTERS),
            report={
                "kind": "benchmark",
                "layout": benchmark.layout,
                "subjects": subjects,
                "questions": sum(s["scored"] for s in subjects.values()),
                "examples": sum(s["examples"] for s in subjects.values()),
            },
            channel_id=channel_id,
            uploaded_by=uploaded_by,
        )
        session.commit()
    except BaseException:
        session.rollback()
        if blob.created:
            store.delete_blob(blob.sha256)
        raise
    return dataset


def read_benchmark(store: Any, dataset: Any) -> Benchmark:
    if dataset.kind != "benchmark":
        raise BenchmarkRejected(
            f"dataset {dataset.name} v{dataset.version} is not a benchmark (it is {dataset.kind} "
            "data): ingest one with `python -m runner ingest PATH --name NAME --benchmark`"
        )
    return Benchmark.from_bytes(store.read_bytes(dataset.train_sha256))
