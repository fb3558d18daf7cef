#!/usr/bin/env bash
# Continued pretraining and DPO on the packaged SmolLM2-135M-Instruct, from the CLI, on CPU.
#   bash examples/methods.sh [WORKSPACE]        (default: ./methods-demo; ~25 minutes on 2 cores)
#
# 1. continued pretraining: a generated railway handbook (.txt, one document per paragraph) is
#    added; `train.method: auto` sees raw text and runs the pretrain recipe (packed blocks).
#    The evaluation compares held-out perplexity of the candidate and the base model.
# 2. alignment: generated preference pairs (compact JSON answers preferred over rambling
#    prose) are added; the round runs DPO and the evaluation reports preference accuracy
#    (log p(chosen) > log p(rejected)) and json_valid on held-out pairs, candidate vs base.
set -euo pipefail
cd "$(dirname "$0")/.."
WS=${1:-methods-demo}
EVERTUNE=${EVERTUNE:-.venv/bin/evertune}
PYTHON=${PYTHON:-.venv/bin/python}

$EVERTUNE init "$WS"

# -- 1. continued pretraining on raw text --------------------------------------------------------
$PYTHON examples/make_domain_corpus.py "$WS/handbook.txt" --paragraphs 400
$EVERTUNE -w "$WS" data add "$WS/handbook.txt"
# A narrow corpus pulls an instruct model away from answering: replay packs a third of the
# round with the base's own conversations and the rate is lower, so the forgetting guard passes.
$EVERTUNE -w "$WS" tune --method auto \
  --set train.n_epochs=1 --set train.pretrain.block_size=256 --set train.batch_size=4 \
  --set train.learning_rate=3e-4 --set data.replay=0.3 \
  --set eval.max_examples=40 --set eval.general_max_examples=8
$EVERTUNE -w "$WS" models show 1

# -- 2. DPO on preference pairs ------------------------------------------------------------------
$PYTHON examples/make_preference_pairs.py "$WS/pairs.jsonl" --pairs 200
$EVERTUNE -w "$WS" data add "$WS/pairs.jsonl"
# These pairs differ only in format, so plain DPO separates them at once and keeps pushing
# both answers down (it then generates badly); rpo_alpha adds the chosen answer's own loss.
$EVERTUNE -w "$WS" tune --method dpo \
  --set train.n_epochs=1 --set train.batch_size=4 --set train.learning_rate=2e-4 \
  --set train.dpo.beta=0.1 --set train.dpo.rpo_alpha=1.0 \
  --set eval.max_examples=24 --set eval.max_new_tokens=48 \
  --set eval.general_max_examples=8 \
  --set 'eval.metrics=[loss,rouge,embedding,exact_match,json_valid]'
$EVERTUNE -w "$WS" models show 2
$EVERTUNE -w "$WS" models list
