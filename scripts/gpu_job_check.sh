#!/usr/bin/env bash
# The runner's own job path on a GPU host, with the tiny model: a training job run by
# `python -m runner --once` (a child process pinned to the GPU, CUDA graphs, evaluation inside the
# job), then an export job. Prints each job's status and events. Usage: scripts/gpu_job_check.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
export DATABASE_URL="sqlite:///$work/finetune.db" ARTIFACT_DIR="$work/artifacts"
export EVAL_BACKEND=${EVAL_BACKEND:-auto} LOG_FORMAT=text
py=${PYTHON:-python3}
$py -m storage migrate
$py -m runner ingest examples/news_demo --name news-demo > "$work/ingest.txt"
$py -m runner submit --dataset news-demo lr=2e-3 epochs=2 logging_steps=5
$py -m runner --once
$py -m runner status 1
checkpoint=$($py - <<'PY'
import os
from sqlmodel import select
from storage.db import make_engine, new_session
from storage.models import Checkpoint
with new_session(make_engine(os.environ["DATABASE_URL"])) as session:
    print(session.exec(select(Checkpoint).where(Checkpoint.final)).one().id)
PY
)
$py -m runner export "$checkpoint" --shard-size 1MB > "$work/export.json"
$py - "$work" <<'PY'
import json, os, sys
from storage.db import make_engine, new_session
from storage.jobs import job_events
with new_session(make_engine(os.environ["DATABASE_URL"])) as session:
    for event in job_events(session, job_id=1):
        keep = {k: v for k, v in event.payload.items() if not k.startswith("_")}
        print(event.kind, json.dumps(keep, ensure_ascii=False)[:300])
report = json.load(open(os.path.join(sys.argv[1], "export.json")))
print("export", json.dumps({k: report[k] for k in ("path", "bytes", "verification")}))
PY
