#!/usr/bin/env bash
# Issue 26's GPU measurement in one call of under 9 minutes: the GPU-marked tests, then benchmarks/inference.py
# with docs/deployment.md's rows (SAM2.1-B+ at 1024 px, random init: speed, memory and fidelity to the source
# model), its JSON and each row's profile heads. Logs and results go to $OUT.
#
#   bash jobs/deploy_call.sh dry    # CPU, toy size: SAM2.1-tiny at 64 px, 2 frames, a float and an Avg-4 row
#   bash jobs/deploy_call.sh gpu    # the device call; carry [".whl"] (../shared/device/stage-wheels.sh)
set -uo pipefail
mode=${1:?usage: deploy_call.sh dry|gpu}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

case $mode in
dry)
    "$PY" -m pytest -q -m gpu tests 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"  # all skip on a CPU
    "$PY" benchmarks/inference.py --size t --image-size 64 --frames 2 --repeats 1 --warmup 1 --batch 1 \
        --variants bf16 avg4 --calib-frames 2 --calib-images 1 --json "$OUT/inference.json" \
        --profile-dir "$OUT/profiles" --data-root "$OUT/bench-data" 2>&1 | tee "$OUT/inference.log"
    exit "${PIPESTATUS[0]}"
    ;;
gpu)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
    "$PY" -c "import torch, torchao, sam2; print('torch', torch.__version__, 'torchao', torchao.__version__)" \
        | tee -a "$OUT/device.txt"
    timeout -k 10 150 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
    timeout -k 10 360 "$PY" benchmarks/inference.py --size b+ --image-size 1024 --frames 100 --batch 1 8 \
        --json "$OUT/inference.json" --profile-dir "$OUT/profiles" --data-root /tmp/bench-data 2>&1 \
        | tee "$OUT/inference.log"
    ;;
*)
    echo "unknown mode $mode: use dry or gpu" >&2
    exit 2
    ;;
esac
