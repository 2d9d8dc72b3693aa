#!/usr/bin/env bash
# The accelerator measurements the issues ask for, in groups sized for one device call each (< 10 min).
# Run from the repository root on the accelerator machine; results go to $OUT (default benchmarks/out).
#
#   bash benchmarks/run_device.sh network          # forward pass: DDPM++ fp32 / bf16 / true fp32, ADM bf16
#   bash benchmarks/run_device.sh sample           # sampler: DDPM++ NFE 35 fp32 / bf16, ADM NFE 79 bf16
#   bash benchmarks/run_device.sh train            # train step with the input pipeline on the CIFAR-10 zip
#   bash benchmarks/run_device.sh curve DTYPE KIMG [FLAGS]  # one loss-curve run (main.py --mode=train) on
#                                                   that zip; FLAGS go to main.py (e.g. smaller nets)
#
# `train` and `curve` read the zip from .carry/ (copy ../shared/data/cifar10-jpeg-train.zip there and
# name .carry in the call's carry list); `curve` needs ml-collections (carry its wheel, see
# benchmarks/README.md). Each benchmark prints JSON lines, collected in $OUT/<group>.jsonl. A curve run
# trains in /tmp/curve_DTYPE (checkpoints are many files) and copies metrics.jsonl, log.txt and the last
# sample grid to $OUT/curve_DTYPE/; compare two of them with benchmarks/compare_runs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
ZIP=.carry/cifar10-jpeg-train.zip
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

need_zip() {
  [ -f "$ZIP" ] || { echo "$ZIP is missing: copy ../shared/data/cifar10-jpeg-train.zip to .carry/ and carry it"; exit 2; }
}

group=${1:?"usage: run_device.sh network|sample|train|curve DTYPE KIMG"}
log="$OUT/$group.jsonl"
case "$group" in
  network)
    $PY benchmarks/bench_network.py --arch=ddpmpp --batch=512 --dtypes=float32,bfloat16 | tee -a "$log"
    $PY benchmarks/bench_network.py --arch=ddpmpp --batch=512 --dtypes=float32 --precision=highest | tee -a "$log"
    $PY benchmarks/bench_network.py --arch=adm --batch=64 --dtypes=bfloat16 | tee -a "$log"
    ;;
  sample)
    $PY benchmarks/bench_sample.py --arch=ddpmpp --batch=512 --steps=18 --dtypes=float32,bfloat16 | tee -a "$log"
    $PY benchmarks/bench_sample.py --arch=adm --batch=64 --steps=40 --dtypes=bfloat16 | tee -a "$log"
    ;;
  train)
    need_zip
    $PY benchmarks/bench_train.py --arch=ddpmpp --batch=512 --dtypes=float32,bfloat16 --data="$ZIP" | tee -a "$log"
    ;;
  curve)
    dtype=${2:?"curve needs DTYPE (float32|bfloat16) and KIMG"}
    kimg=${3:?"curve needs KIMG (1024 = 2000 steps of 512)"}
    need_zip
    work=/tmp/curve_$dtype
    # Ticks of 50 steps (25.6 kimg); one snapshot, at the end (its grid shows what 1 Mimg of training gives).
    $PY main.py --config=configs/cifar10_edm.py --mode=train --workdir="$work" \
      --config.data.path="$ZIP" --config.model.dtype="$dtype" --config.train.total_kimg="$kimg" \
      --config.train.tick_kimg=25.6 --config.train.snapshot_ticks=100000 --config.train.state_dump_ticks=0 "${@:4}"
    mkdir -p "$OUT/curve_$dtype"
    cp "$work/metrics.jsonl" "$work/log.txt" "$OUT/curve_$dtype/"
    cp "$(ls "$work"/samples/*.png | tail -n 1)" "$OUT/curve_$dtype/samples.png"
    ;;
  *)
    echo "unknown group $group: network|sample|train|curve"; exit 2 ;;
esac
