#!/usr/bin/env bash
# The accuracy grid of configs/compare/sam21t_512_regime.yaml in GPU calls of at most 10 minutes, on clips in
# the trained model's regime (../shared/data/regime_clips.py, DAVIS layout, converted to shards). Logs and
# results go to $OUT (folders as .tgz: a call brings back at most 8 files); the grid's folder stays under $WORK
# so a later call on the same warm machine goes on, and a fresh machine takes the cells committed under
# docs/gpu/<grid>/ and docs/gpu/sam21t_512_regime/ (compare's `reuse`: only cells with this grid's keys).
#
#   bash jobs/grid_call.sh dry GENERATOR [ARGS]   # CPU, toy size, random-init model: the whole path (4 min;
#                                                 # ARGS go to compare, e.g. --rows to run fewer)
#   bash jobs/grid_call.sh data GENERATOR         # GPU call 1: wheels, model half A, the clips and their shards
#   bash jobs/grid_call.sh grid [SECONDS]         # GPU call 2: model half B, the grid for SECONDS (540), report
#   bash jobs/grid_call.sh bench [ARGS]           # GPU call 3: benchmarks/grid.py (old vs new engine, fp32 vs bf16)
#
# Call 1 leaves most of its 10 minutes free, so it may carry the first half of issue 26's deployment table too:
#   bash jobs/grid_call.sh data .carry/tools/regime_clips.py; BUDGET=510 bash jobs/deploy_call.sh gpu
#
# CONFIG picks the grid (default configs/compare/sam21t_512_regime.yaml; sam21t_512_mixed.yaml is issue 24's).
#
# GENERATOR is the path of regime_clips.py (on the device: carried in .carry/tools/). The model halves and the
# wheels come from ../shared/device/carry-model.sh and stage-wheels.sh (carry .carry/model_a + .whl, then
# .carry/model_b).
set -uo pipefail
mode=${1:?usage: grid_call.sh dry|data|grid|bench ...}
shift
OUT=${OUT:-$PWD/out}
WORK=${WORK:-/tmp/grid}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
log="$OUT/grid_call_$mode.log"

clips() {  # GENERATOR VAL_COUNT VAL_FRAMES CALIB_COUNT CALIB_FRAMES SIZE
    local gen=$1 workers
    workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
    "$PY" "$gen" --out "$WORK/regime/val" --first 100000 --count "$2" --frames "$3" --size "$6" --workers "$workers"
    "$PY" "$gen" --out "$WORK/regime/calib" --first 0 --count "$4" --frames "$5" --size "$6" --workers "$workers"
    for split in val calib; do
        "$PY" -m mqsam2.data convert-davis --root "$WORK/regime/$split" --out "$WORK/shards/$split" \
            --workers "$workers" || return 1
    done
}

CONFIG=${CONFIG:-configs/compare/sam21t_512_regime.yaml}
grid_args=(--config "$CONFIG" --out_root "$WORK/cmp"
           --data.video_shards "[$WORK/shards/calib]" --data.val_video_shards "[$WORK/shards/val]")

collect() {  # the grid's results into $OUT/grid: cells, table, grid.json; per row its units and mixed plan
    local dir
    dir="$WORK/cmp/$(basename "$CONFIG" .yaml)"
    mkdir -p "$OUT/grid"
    (cd "$dir" && cp -r cells table.md table.png per_clip.json grid.json calls.json config.json importance.json \
        importance.key "$OUT/grid/" 2>/dev/null)
    for file in units.jsonl plan.json sensitivity.png; do
        find "$dir/rows" -name "$file" -exec sh -c \
            'mkdir -p "$2/rows" && cp "$1" "$2/rows/$(basename "$(dirname "$1")")_$3"' _ {} "$OUT/grid" "$file" \;
    done
}

pack() {  # a folder under $OUT as one archive: a call brings back at most 8 files
    tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"
}

case $mode in
dry)
    gen=${1:?dry needs the path of regime_clips.py}
    clips "$gen" 3 4 2 4 64 2>&1 | tee "$log" || exit 1
    # the grid's rows at toy size: a random-init model at 64 px, 2 iterations per unit, 3 clips
    "$PY" -m mqsam2.compare "${grid_args[@]}" --model.checkpoint null --model.image_size 64 \
        --data.calib_videos 2 --data.calib_frames 4 --data.val_videos 3 --data.val_frames 4 \
        --reconstruction.iters 2 --reconstruction.accelerator cpu --gain_samples '[1, 2, 0]' "${@:2}" 2>&1 \
        | tee -a "$log"
    status=${PIPESTATUS[0]}
    collect
    exit "$status"
    ;;
data)
    gen=${1:?data needs the path of regime_clips.py}
    mkdir -p /tmp/m && cp .carry/model_a/part /tmp/m/a || exit 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
    { time clips "$gen" 60 16 8 20 512; } 2>&1 | tail -n 12 | tee -a "$log"
    du -sh "$WORK/shards"/* | tee -a "$log"
    ;;
grid)
    seconds=${1:-540}
    cat /tmp/m/a .carry/model_b/part > /tmp/m/sam21t_512_synth.pt || exit 1
    echo "0431afffbadc398c19ba5b9b1ad02e7b782db6cbeb344a614742be002fa3f722  /tmp/m/sam21t_512_synth.pt" \
        | sha256sum -c - || exit 1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$log"
    reuse=()  # what earlier sessions finished, committed under docs/gpu/<grid>/ (keys checked)
    for done in "docs/gpu/$(basename "$CONFIG" .yaml)" docs/gpu/sam21t_512_regime; do
        [ -d "$done/cells" ] && reuse+=("$done")
    done
    start=$(date +%s)
    timeout -k 10 "$seconds" "$PY" -m mqsam2.compare "${grid_args[@]}" --reuse "[$(IFS=,; echo "${reuse[*]}")]" \
        --model.checkpoint /tmp/m/sam21t_512_synth.pt 2>&1 | tee -a "$log"
    echo "grid call: $(( $(date +%s) - start )) s" | tee -a "$log"
    timeout -k 5 60 "$PY" -m mqsam2.compare "${grid_args[@]}" --model.checkpoint /tmp/m/sam21t_512_synth.pt \
        --report_only true 2>&1 | tail -n 40 | tee -a "$log"
    collect
    pack grid
    ;;
bench)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
    timeout -k 10 540 "$PY" benchmarks/grid.py --checkpoint /tmp/m/sam21t_512_synth.pt \
        --calib "$WORK/shards/calib" --val "$WORK/shards/val" --out "$OUT/bench" "$@" 2>&1 | tee -a "$log"
    pack bench
    ;;
*)
    echo "unknown mode $mode: use dry, data, grid or bench" >&2
    exit 2
    ;;
esac
