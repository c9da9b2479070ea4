#!/usr/bin/env bash
# GPU check: on a CUDA machine, train the CIFAR-10 old and BCT models with AMP (the shipped
# recipes on all 50,000 training images), print their self/cross-test metrics, then time the
# eval engine (100k x 100k, leave-one-out) and a 21-point backfill curve (10k x 100k) on the
# GPU. Sized to finish in under 8 minutes on one H100-class GPU.
#
#   benchmarks/gpu_check.sh [OUT]            # default OUT=runs/gpu_check; needs CUDA
#   benchmarks/gpu_check.sh --dry-run [OUT]  # CPU, tiny sizes: checks the script end to end
#
# Environment: PYTHON (default python), CIFAR_ROOT (default ../shared/data/cifar10).
set -euo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out=${1:-runs/gpu_check}
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if [[ $dry == 1 ]]; then
  device=cpu
  train=(--set train.device=cpu --set train.amp=false --set data.name=synthetic
         --set data.root=null --set "data.options={num_classes: 40, images_per_class: 8}"
         --set data.image_size=16 --set model.width=0.125 --set train.epochs=1
         --set train.batch_size=32)
  eval_size=(--nq 1000 --ng 1000 --exclude-self --threads 1)
  curve_size=(--nq 200 --ng 1000 --threads 1)
else
  if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device; run with --dry-run for the CPU check" >&2
    exit 2
  fi
  device=cuda
  train=(--set train.device=cuda --set train.amp=true
         --set "data.root=${CIFAR_ROOT:-../shared/data/cifar10}" --set data.train_per_class=null
         --set train.batch_size=256 --set train.embed_batch_size=4096)
  eval_size=(--nq 100000 --ng 100000 --exclude-self --chunk-size 16384 --query-block 8192)
  curve_size=(--nq 10000 --ng 100000 --chunk-size 16384 --query-block 8192)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

mkdir -p "$out"
step() { echo "== $1"; SECONDS=0; }
took() { echo "   ($SECONDS s)"; }

step "train old (configs/cifar10/old.yaml)"
"$py" -m compatkit train configs/cifar10/old.yaml "${train[@]}" --set train.progress=false \
  --out "$out/old" > "$out/old.json"
took
step "train bct against it (configs/cifar10/bct.yaml)"
"$py" -m compatkit train configs/cifar10/bct.yaml "${train[@]}" --set train.progress=false \
  --old-model "$out/old" --out "$out/bct" > "$out/bct.json"
took
step "metrics (leave-one-out on the test set)"
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("old", "bct"):
    m = json.loads((out / name / "metrics.json").read_text())
    hist = json.loads((out / name / "history.json").read_text())
    speed = max(h["images_per_second"] for h in hist)
    parts = "; ".join(f"{k} " + ", ".join(f"{n} {v:.4f}" for n, v in vals.items())
                      for k, vals in m.items())
    print(f"{name}: {parts}; best epoch {speed:.0f} images/s")
PY
took
step "eval engine on $device"
"$py" benchmarks/eval_engine.py --device "$device" "${eval_size[@]}" | tee "$out/eval_engine.md"
took
step "backfill curve on $device"
"$py" benchmarks/backfill_curve.py --device "$device" "${curve_size[@]}" \
  | tee "$out/backfill_curve.md"
took
echo "gpu_check: done ($out)"
