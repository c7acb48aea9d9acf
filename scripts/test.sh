#!/usr/bin/env bash
# Install with the dev extra, then lint, type-check and run every test (SQLite and PostgreSQL).
# PostgreSQL: TEST_POSTGRES_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# A skipped test fails the run: a skip must never pass for a pass. Two workers (TEST_WORKERS):
# much of the suite waits on processes, servers and databases, not on the cores; the pre-trained
# tiny base is built once for both (tests/conftest.py, prepared_elsewhere).
FTB_FAIL_ON_SKIP=1 .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --durations=25 "$@"
