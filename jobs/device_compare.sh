#!/usr/bin/env bash
# The accuracy grid (configs/compare/sam21t_512.yaml) on a GPU machine whose calls last at most 10 minutes:
# each call runs the grid for a slice of time, then writes the report of every finished row and packs the cells
# into $OUT. Finished cells, the float masks, the importance and half-done reconstructions stay under /tmp/cmp,
# so the next call on the same machine goes on where this one stopped. The trained model is expected at
# /tmp/m/sam21t_512_synth.pt (../shared/device/carry-model.sh) and the device wheels under /tmp/site.
#   bash jobs/device_compare.sh data                 # make the calibration and validation clips (all cores)
#   bash jobs/device_compare.sh 500 [compare args]   # run the grid for 500 s, then report and pack (the
#                                                    # rows' processes take up to a minute to stop)
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="/tmp/site:$PWD/src"
grid=(--config configs/compare/sam21t_512.yaml --model.checkpoint /tmp/m/sam21t_512_synth.pt
      --out_root /tmp/cmp --data.root /tmp/data)
if [ "${1:-}" = data ]; then
    python - <<'PY'
import os
from mqsam2.data.synth import ensure_synth
workers = os.cpu_count() - 2
ensure_synth("/tmp/data", 16, 20, 512, 0, images=32, num_objects=(1, 3), workers=workers)
ensure_synth("/tmp/data", 60, 16, 512, 1, images=24, num_objects=(1, 3), workers=workers)
PY
    exit
fi
seconds=${1:?usage: device_compare.sh data | SECONDS [compare args]}
shift
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee -a "$OUT/compare.log"
timeout -k 15 "$seconds" python -m mqsam2.compare "${grid[@]}" "$@" 2>&1 | tee -a "$OUT/compare.log"
timeout -k 5 40 python -m mqsam2.compare "${grid[@]}" --report_only true 2>&1 | tail -n 60 | tee -a "$OUT/compare.log"
tar czf "$OUT/cells.tgz" -C /tmp/cmp/sam21t_512 --ignore-failed-read cells table.md table.png per_clip.json \
    importance.json config.json
