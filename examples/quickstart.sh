#!/usr/bin/env bash
# The quickstart: one tuning round on the packaged SmolLM2-135M-Instruct, on the CPU.
#   bash examples/quickstart.sh [WORKSPACE]        (default: ./demo; ~5 minutes on 2 cores)
# Creates a workspace, generates a support-ticket routing dataset (with 3 invalid rows, to
# show validation), fine-tunes a LoRA adapter, evaluates it against the base model and
# registers it as version N, pending approval.
set -euo pipefail
cd "$(dirname "$0")/.."
WS=${1:-demo}
EVERTUNE=${EVERTUNE:-.venv/bin/evertune}
PYTHON=${PYTHON:-.venv/bin/python}

$EVERTUNE init "$WS"
$PYTHON examples/make_sample_data.py "$WS/bucket/raw-data/tickets.jsonl" --bad-rows 3
$EVERTUNE -w "$WS" data add "$WS/bucket/raw-data/tickets.jsonl"
$EVERTUNE -w "$WS" tune --set train.n_epochs=1
$EVERTUNE -w "$WS" models list
