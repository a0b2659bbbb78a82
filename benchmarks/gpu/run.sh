#!/usr/bin/env bash
# The GPU measurements of issue 20, in one go (about 15 minutes on one modern GPU; run from the repo root):
#   bash benchmarks/gpu/run.sh
# Needs ../shared/data and runs/real_study/checkpoints (benchmarks/cross_lab/run.py makes them).
set -euo pipefail
PY=${PY:-.venv/bin/python}
REC=${REC:-benchmarks/gpu/record}
mkdir -p "$REC"
$PY benchmarks/gpu/steps.py --device cuda --out "$REC"
$PY benchmarks/batched_runs/run.py --device cuda --sizes 3 9 27 --steps 200 --record "$REC/batched"
start=$(date +%s)
$PY benchmarks/real_study/run.py --set work=runs/real_study_gpu --set record=runs/real_study_gpu/record
echo "whole real study: $(( $(date +%s) - start )) s" | tee "$REC/real_study_wall.txt"
