#!/usr/bin/env bash
# The quickstart: the whole continuous-tuning loop on the packaged SmolLM2-135M-Instruct, on CPU.
#   bash examples/quickstart.sh [WORKSPACE]        (default: ./demo; ~10 minutes on 2 cores)
#   PORT=8123 KEEP_UP=1 bash examples/quickstart.sh   (another port; leave `evertune up` running)
#
# 1. creates a workspace and starts `evertune up` (pipeline, bucket watcher, console, serving);
# 2. drops a support-ticket routing dataset (with 3 invalid rows, to show validation) into the
#    bucket's raw-data/: the watcher starts a pipeline run (validate + split → LoRA fine-tune →
#    evaluate against the base model → register the version, pending approval);
# 3. waits for the run, approves the version: QA, system tests, PROD;
# 4. asks the PROD endpoint a question with the OpenAI API shape, and shows where things are.
set -euo pipefail
cd "$(dirname "$0")/.."
WS=${1:-demo}
PORT=${PORT:-8000}
EVERTUNE=${EVERTUNE:-.venv/bin/evertune}
PYTHON=${PYTHON:-.venv/bin/python}

$EVERTUNE init "$WS"
# One epoch is enough for this task; `up --set` applies to every run this process starts.
$EVERTUNE -w "$WS" up --port "$PORT" --set train.n_epochs=1 >"$WS/up.log" 2>&1 &
UP_PID=$!
stop_up() { if [ -z "${KEEP_UP:-}" ]; then kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; fi; }
trap stop_up EXIT
$PYTHON examples/wait_ready.py "http://127.0.0.1:$PORT/healthz" --pid "$UP_PID" --log "$WS/up.log"

# Write next to the bucket, then rename into raw-data/: the watcher never sees a half-written file.
$PYTHON examples/make_sample_data.py "$WS/bucket/tickets.jsonl.part" --bad-rows 3
mv "$WS/bucket/tickets.jsonl.part" "$WS/bucket/raw-data/tickets.jsonl"

# Wait for the run of this drop (by key: a bare `runs wait` could pick up an older run).
$EVERTUNE -w "$WS" runs wait --key raw-data/tickets.jsonl --timeout 3600
VERSION=$($EVERTUNE -w "$WS" models list --json | $PYTHON -c 'import json,sys; print(max(v["version"] for v in json.load(sys.stdin)))')
$EVERTUNE -w "$WS" models show "$VERSION"
$EVERTUNE -w "$WS" approve "$VERSION" --comment "quickstart: better than base on the test split"
$EVERTUNE -w "$WS" models list
$PYTHON examples/ask.py "http://127.0.0.1:$PORT/v1" --expect-version "$VERSION" \
  "Route the support ticket to exactly one team: billing, shipping, account, technical or returns. Answer with the team name only.
Ticket: I was charged twice for my order of running shoes (\$49.00). Please refund one charge."
echo "Console: http://127.0.0.1:$PORT/  (log in with the token in $WS/.evertune/token)"
