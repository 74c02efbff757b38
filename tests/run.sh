#!/usr/bin/env bash
# Set up (or reuse) .venv and run the test suite. Exit code is pytest's; a run that collects no test fails.
#   bash tests/run.sh            # whole suite
#   bash tests/run.sh -k engine  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# A bare `pip install torch` would pull a multi-GB CUDA build: pin the local CPU wheel first.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
# the hf extra (transformers) lets tests/test_export_hf.py run instead of skipping; the peers extra (trl: a few
# seconds more on a fresh install) lets tests/test_bench.py measure the peers too
.venv/bin/pip install -q -e '.[dev,hf,peers]'
# TEST_WORKERS pytest-xdist processes of one thread each (default 2, for this project's 2-core machines): on 2 cores
# two one-thread workers ran the suite in 448 s, one two-thread process in ~670 s. TEST_WORKERS=0: in this process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
# pytest exits 5 when it collects nothing; set -e turns that (and any failure) into our exit code.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" "$@"
