#!/usr/bin/env bash
# Issue 26's GPU measurement (docs/deployment.md, "The GPU path"): SAM2.1-B+ at 1024 px, random init, batch 1
# and 8, a 100-frame clip, in two device calls (one H100, a 10-minute limit each), each from a fresh machine to
# its results under $OUT within BUDGET seconds (540: 9 minutes). Every step's timeout is cut to what is left of
# the budget, benchmarks/inference.py rewrites its JSON after each row, and when it is cut off its finished rows'
# table is printed from that JSON; the rows run most wanted first.
#
#   bash jobs/deploy_call.sh dry    # CPU, toy size: SAM2.1-tiny at 64 px, 2 frames, a float and an Avg-4 row
#   bash jobs/deploy_call.sh gpu    # call 1: bf16+vos, the new deployment (avg4+vos, avg6+vos, w8a8+vos)
#   bash jobs/deploy_call.sh gpu2   # call 2: the GPU tests, bf16+compile, the old deployment (avg4 avg6 w8a8), bf16
#
# Device calls carry [".whl"] (bash ../shared/device/stage-wheels.sh). $OUT gets device.txt, inference.log (the
# table), inference.json, and gpu_tests.log (gpu2, dry) or profiles.tgz (gpu, dry): a call brings back at most 8
# files. Exit 3: the benchmark was cut off at the budget (its finished rows are in the JSON and the log).
set -uo pipefail
mode=${1:?usage: deploy_call.sh dry|gpu|gpu2}
OUT=${OUT:-$PWD/out}
BUDGET=${BUDGET:-540}
KEEP=20  # seconds kept after the benchmark: its table from the JSON (at most 15) and the tar
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

# within CAP CMD...: CMD under a timeout of CAP seconds, cut so that KEEP and timeout's 5 s kill grace remain
within() {
    local cap=$1 left=$((BUDGET - SECONDS - KEEP - 5))
    shift
    ((left < cap)) && cap=$left
    if ((cap <= 0)); then
        echo "out of budget at $SECONDS s: $*" >&2
        return 124
    fi
    timeout -k 5 "$cap" "$@"
}

setup() {  # the wheels the GPU image lacks, and what the call runs on
    within 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl || exit 1
    within 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
    within 60 "$PY" -c "import torch, torchao, sam2; print('torch', torch.__version__, 'torchao', torchao.__version__)" \
        | tee -a "$OUT/device.txt"
}

bench() {  # benchmarks/inference.py with what is left of the budget; returns 3 when it was cut off
    within 600 "$PY" benchmarks/inference.py --json "$OUT/inference.json" "$@" 2>&1 | tee "$OUT/inference.log"
    local rc=${PIPESTATUS[0]}
    if ((rc == 0)); then return 0; fi
    echo "benchmark ended with exit $rc at $SECONDS s; the table of its finished rows:" | tee -a "$OUT/inference.log"
    if [ -s "$OUT/inference.json" ]; then
        timeout 15 "$PY" benchmarks/inference.py --report "$OUT/inference.json" 2>&1 | tee -a "$OUT/inference.log"
    fi
    if ((rc == 124 || rc == 137)); then return 3; fi
    return "$rc"
}

pack() {  # the profiles as one file
    tar czf "$OUT/profiles.tgz" -C "$OUT" profiles && rm -rf "$OUT/profiles"
}

B_PLUS=(--size b+ --image-size 1024 --frames 100 --batch 1 8 --data-root /tmp/bench-data)
case $mode in
dry)
    within 120 "$PY" -m pytest -q -m gpu tests 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"  # all skip on a CPU
    bench --size t --image-size 64 --frames 2 --repeats 1 --warmup 1 --batch 1 --variants bf16 avg4 \
        --calib-frames 2 --calib-images 1 --profile-dir "$OUT/profiles" --data-root "$OUT/bench-data"
    rc=$?
    pack
    ;;
gpu)
    setup
    bench "${B_PLUS[@]}" --variants bf16+vos avg4+vos avg6+vos w8a8+vos \
        --profile-dir "$OUT/profiles" --profile bf16+vos avg4+vos
    rc=$?
    pack
    ;;
gpu2)
    setup
    within 120 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
    bench "${B_PLUS[@]}" --variants bf16+compile avg4 avg6 w8a8 bf16
    rc=$?
    ;;
*)
    echo "unknown mode $mode: use dry, gpu or gpu2" >&2
    exit 2
    ;;
esac
echo "$mode: $SECONDS s of $BUDGET" | tee -a "$OUT/inference.log"
exit "$rc"
