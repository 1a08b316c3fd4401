#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (its default time limits come to about
# 10 minutes; not yet run on a GPU):
#   bash benchmarks/gpu_session.sh OUTDIR
# 1. the GPU tests (pytest -m gpu): official DiT output on CUDA, bf16/compile, a CellDiT on CUDA;
# 2. benchmarks/gpu_check.py: DiT-XL/2 training speed and MFU, cell training rates, 1M counterfactual cells;
# 3. the README demo (it trains on the GPU when there is one: bf16-mixed), timed.
# Each step has its own time limit so that one stuck step does not cost the others.
set -u
out=${1:?usage: gpu_session.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia_smi.txt"
timeout "${PYTEST_S:-150}" "$py" -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log"
timeout "${CHECK_S:-330}" "$py" benchmarks/gpu_check.py --out "$out/gpu_check.json" --work /tmp/celldit_gpu_check \
    2> "$out/gpu_check.log" >/dev/null
tail -c 2000 "$out/gpu_check.log"
start=$SECONDS
timeout "${DEMO_S:-150}" "$py" -m celldit.cli demo --out /tmp/celldit_gpu_demo --threads 0 --no-progress-bar \
    > "$out/demo.log" 2>&1
echo "demo rc $? in $((SECONDS - start)) s"
tail -c 2500 "$out/demo.log"
