"""From queued to the evaluation report: the reference job through the runner's real path, every
phase timed from the job's own events, for a cold first job and a second one right after it.

    python bench/job_latency.py --model 7b --work DIR      # on the GPU (a 7B-shaped random model)
    python bench/job_latency.py --model tiny --work DIR    # a dry run on CPU

The base model is written to ``DIR`` once (random weights of the given shape, the tiny model's
tokenizer), and so is the dataset: 300 train samples of ~260 tokens (normal, sd 60, clipped to
96-512; a third prompt) and 100 eval samples with ~150-token answers, as ShareGPT records with the
demo's prompt and ``<think>…</think>`` answers whose text the tokenizer encodes to those lengths.
Each job is the reference job (LoRA rank 8 on all linear layers, LoRA+ 16, lr 5e-6, batch 2 ×
grad accum 2, 3 epochs), queued with ``storage.jobs.create_job`` when the one before it ended, and run by one ``Runner``
serving in a thread: on a GPU the slot's warm worker (``RUNNER_WARM_WORKER``; elsewhere a process
per job), training, the evaluation of base and checkpoint in the job (the base once per eval set),
the report event. Phases, from the events' times:

- claim: ``queued`` → ``claimed``;  start: ``claimed`` → ``started`` (process, model load, kernels,
  graph planning);  train: ``started`` → ``trained``;  evaluate: ``trained`` → ``evaluated``;
  end: ``evaluated`` → ``succeeded``;  total: ``queued`` → ``succeeded``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import SHAPES

LABELS = ["财经", "房产", "股票", "教育", "科技", "社会", "时政", "体育", "游戏", "娱乐"]
PROMPT = (
    "请判断下面这条新闻标题属于哪个类别（" + "、".join(LABELS) + "），先简要思考，再只回答"
    "类别名称。\n标题："
)
JOB = {
    "learning_rate": 5e-6,
    "lora_rank": 8,
    "lora_target": "all",
    "loraplus_lr_ratio": 16,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "logging_steps": 25,
    "save_steps": 1000000,
}
PHASES = (
    ("claim", "queued", "claimed"),
    ("start", "claimed", "started"),
    ("train", "started", "trained"),
    ("evaluate", "trained", "evaluated"),
    ("end", "evaluated", "succeeded"),
    ("total", "queued", "succeeded"),
)


def build_model(shape: str, out: Path) -> Path:
    """A random model of ``shape`` with the tiny model's tokenizer and chat template (cached)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from runner.tiny_model import CORPUS, build_tiny_model, train_tokenizer

    if shape == "tiny":
        return build_tiny_model(out)
    tokenizer = train_tokenizer(CORPUS)
    config = Qwen2Config(
        **{**SHAPES[shape], "vocab_size": SHAPES[shape]["vocab_size"]},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _text_of(tokenizer, rng: random.Random, words: list[str], tokens: int) -> str:
    """Headline words joined until the tokenizer counts about ``tokens`` tokens."""
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += rng.choice(words)
    return text


def build_dataset(tokenizer, out: Path, seed: int = 0) -> Path:
    """The reference lengths as text: ShareGPT train.json (300) and eval.json (100)."""
    from runner.tiny_model import CORPUS

    if (out / "train.json").exists():
        return out
    rng = random.Random(seed)
    words = [w for w in CORPUS.read_text(encoding="utf-8").split() if w]
    out.mkdir(parents=True, exist_ok=True)

    def record(total: int, answer_tokens: int) -> dict:
        label = rng.choice(LABELS)
        headline = _text_of(tokenizer, rng, words, max(total - answer_tokens - 60, 8))
        thought = _text_of(tokenizer, rng, words, max(answer_tokens - 4, 4))
        return {
            "conversations": [
                {"from": "human", "value": PROMPT + headline},
                {"from": "gpt", "value": f"<think>\n{thought}\n</think>\n\n{label}"},
            ]
        }

    lengths = [min(max(int(rng.gauss(260, 60)), 96), 512) for _ in range(300)]
    train = [record(n, n * 2 // 3) for n in lengths]
    evals = [record(300, 150) for _ in range(100)]
    (out / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    (out / "eval.json").write_text(json.dumps(evals, ensure_ascii=False))
    return out


def phase_times(engine, job_id: int) -> dict[str, float | None]:
    from storage.db import new_session
    from storage.jobs import job_events

    with new_session(engine) as session:
        first: dict[str, object] = {}
        for event in job_events(session, job_id=job_id):
            first.setdefault(event.kind, event.created_at)
    times: dict[str, float | None] = {}
    for name, start, end in PHASES:
        a, b = first.get(start), first.get(end)
        times[name] = (b - a).total_seconds() if a is not None and b is not None else None  # type: ignore[operator]
    return times


def eval_timings(engine) -> list[tuple[str, dict]]:
    """Every evaluation's own timings (runner.eval: load, generate, label reads, similarity,
    report), in the order they ran."""
    from sqlmodel import select

    from storage.db import new_session
    from storage.models import Evaluation

    with new_session(engine) as session:
        rows = session.exec(select(Evaluation).order_by(Evaluation.id)).all()
        return [
            (
                "base" if r.checkpoint_id is None else f"checkpoint {r.checkpoint_id}",
                r.metrics.get("timings", {}),
            )
            for r in rows
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "jl")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    from core.settings import Settings
    from runner.datasets.ingest import IngestOptions, ingest_dataset
    from runner.models import load_fast_tokenizer
    from runner.worker import Runner
    from storage.artifacts import ArtifactStore
    from storage.db import make_engine, new_session
    from storage.jobs import create_job
    from storage.migrate import upgrade

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    built = time.perf_counter()
    model = build_model(args.model, work / f"model-{args.model}")
    tokenizer = load_fast_tokenizer(model)
    data = build_dataset(tokenizer, work / "data")
    built = time.perf_counter() - built
    run = work / f"run-{int(time.time())}"
    url = f"sqlite:///{run / 'finetune.db'}"
    settings = Settings(
        _env_file=None,
        database_url=url,
        artifact_dir=run / "artifacts",
        base_model=str(model),
        runner_poll_seconds=0.2,
    )
    upgrade(url)
    engine = make_engine(url)
    with new_session(engine) as session:
        dataset, _ = ingest_dataset(
            session,
            ArtifactStore(settings.artifact_dir),
            data,
            IngestOptions.from_settings(settings),
            name="reference",
            tokenizer=tokenizer,
        )
    rows = []
    # One runner serves all the jobs, as on a host: a job right after another finds the slot's
    # warm worker (RUNNER_WARM_WORKER, auto: on GPUs) with the base model resident.
    import threading

    from storage.models import Job

    stop = threading.Event()
    runner = threading.Thread(target=Runner(settings, owner="bench").run, kwargs={"stop": stop})
    runner.start()
    for index in range(args.jobs):
        with new_session(engine) as session:
            job = create_job(session, base_model=str(model), dataset_id=dataset.id, config=JOB)
        while True:
            with new_session(engine) as session:
                status = session.get(Job, job.id).status
            if status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        rows.append(
            (
                "cold" if index == 0 else f"#{index + 1}, right after",
                status,
                phase_times(engine, job.id),
            )
        )
    stop.set()
    runner.join(120)
    print(f"model and data ready in {built:.1f} s (cached after the first run)")
    print("| job | status | " + " | ".join(f"{name} s" for name, _, _ in PHASES) + " |")
    print("| --- | --- |" + " --- |" * len(PHASES))
    for label, status, times in rows:
        cells = " | ".join("–" if times[n] is None else f"{times[n]:.1f}" for n, _, _ in PHASES)
        print(f"| {label} | {status} | {cells} |")
    keys = ("load_s", "generate_s", "label_reads_s", "similarity_s", "report_s", "total_s")
    print()
    print("| evaluation, in order | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for subject, timing in eval_timings(engine):
        print(f"| {subject} | " + " | ".join(str(timing.get(k, "–")) for k in keys) + " |")


if __name__ == "__main__":
    main()
