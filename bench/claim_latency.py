"""How long a queued job waits before a runner claims it, on PostgreSQL: woken by LISTEN/NOTIFY
(ours) against polling every RUNNER_POLL_SECONDS (the fallback, what SQLite does), in one run.

    python bench/claim_latency.py [--jobs 20] [--poll 2.0] [--url postgresql+psycopg://...]

Each job is queued at a random moment while a runner with one slot serves the queue; its latency
is the time from the moment it could be claimed (queued, and the slot free: the previous job's end)
to its ``claimed`` event (all stamped by the writers' clocks on this one machine). The jobs name a base model that does not exist, so each fails at once and frees the
slot before the next job comes (``--gap``); only the claim is measured.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.settings import Settings
from runner import worker
from runner.worker import Runner
from storage.db import make_engine, new_session
from storage.jobs import create_job, job_events
from storage.migrate import upgrade


def measure(
    url: str, *, listen: bool, jobs: int, poll: float, gap: float, seed: int
) -> list[float]:
    settings = Settings(
        _env_file=None,
        database_url=url,
        artifact_dir=Path(tempfile.mkdtemp()) / "artifacts",
        base_model="/nonexistent/model",
        runner_poll_seconds=poll,
        runner_ingest_slots=0,
    )
    worker.listens = (lambda _url: True) if listen else (lambda _url: False)  # type: ignore[assignment]
    runner = Runner(settings, owner=f"bench-{listen}", devices=[None])
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, kwargs={"stop": stop})
    thread.start()
    engine = make_engine(url)
    rng = random.Random(seed)
    ids = []
    try:
        time.sleep(1.0)
        for _ in range(jobs):
            time.sleep(gap + poll * rng.random())  # the slot is free again by then
            with new_session(engine) as session:
                ids.append(create_job(session, base_model=settings.base_model, config={}).id)
        time.sleep(poll + gap)  # the last claim, and the last (failing) job, end
    finally:
        stop.set()
        thread.join(60)
    latencies = []
    free_since = None  # when the previous job ended and its slot was free again
    with new_session(engine) as session:
        for job_id in ids:
            events = {e.kind: e.created_at for e in job_events(session, job_id=job_id)}
            if "claimed" in events:
                ready = max(events["queued"], free_since or events["queued"])
                latencies.append((events["claimed"] - ready).total_seconds())
            ended = [events[k] for k in ("failed", "succeeded", "cancelled") if k in events]
            free_since = max(ended) if ended else free_since
    engine.dispose()
    return latencies


def fresh_database(server_url: str) -> str:
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"bench_claim_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--poll", type=float, default=2.0)
    parser.add_argument(
        "--gap",
        type=float,
        default=8.0,
        help="seconds between jobs, more than a failing job's process lives (~3 s idle, ~12 s on "
        "a loaded 2-core machine: it imports torch), so every job finds the slot free",
    )
    args = parser.parse_args()
    rows = []
    for listen in (False, True):
        got = measure(
            fresh_database(args.url),
            listen=listen,
            jobs=args.jobs,
            poll=args.poll,
            gap=args.gap,
            seed=1,
        )
        rows.append((listen, got))
    print("| path | jobs claimed | median s | p90 s | max s | × ours (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    ours = statistics.median(rows[1][1])
    for listen, got in rows:
        name = "LISTEN/NOTIFY (ours)" if listen else f"polling every {args.poll:g} s"
        p90 = statistics.quantiles(got, n=10)[-1] if len(got) > 1 else got[0]
        median = statistics.median(got)
        print(
            f"| {name} | {len(got)}/{args.jobs} | {median:.3f} | {p90:.3f} | {max(got):.3f} | "
            f"{median / ours:.1f}× |"
        )


if __name__ == "__main__":
    main()
