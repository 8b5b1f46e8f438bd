#!/usr/bin/env bash
# Issue 24's AOTInductor lever against `ddpm sample` as it is, in one device call (~9 minutes on an H100):
#   [DYNAMIC=0] [SAMPLE=0] [WEIGHTS=0] [WEIGHTLESS=0] [PLAIN=1] bash benchmarks/aoti_run.sh [N]   # N images
# (default 10000), with the carried wheels in .whl. Trains a checkpoint of examples/cifar10-fast.yaml's network in
# a few eager steps (with an autoguidance guide, as the shipped recipe keeps), then times, each a fresh process
# from its start to its exit: `ddpm sample -n N` with empty compile caches (cold) and again (warm); bench_aoti.py's
# builds (a package's cold compile) and its samples: packages with the weights inside, one for the model and one
# for its guide (torch 2.11's load of a weightless package crashed on the device, 2026-12-06); one weightless
# package for both, twice; the same for one package of any batch size (--dynamic); then compares the images of the
# warm `ddpm sample` and the packages'. Each variable =0 skips its part; PLAIN=1 builds the weightless package
# with inductor's default options, without the sampler's programmatic dependent launch (a second suspect for the
# crash). A failed command's last lines go into the log (with Python's stacks on a crash: PYTHONFAULTHANDLER).
# Output: $OUT/aoti.log (BENCH lines and wall times).
set -u
n=${1:-10000}
out=${OUT:-$HOME/aoti}; mkdir -p "$out"; log=$out/aoti.log
work=$HOME/aoti-work; rm -rf "$work"; mkdir -p "$work"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TORCHINDUCTOR_CACHE_DIR=$work/inductor \
  DDPM_COMPILE_CACHE_DIR=$work/compile
ddpm() { python3 -m ddpm_cli "$@"; }
timed() {  # timed LABEL CMD...: the command's wall time, start to exit
  local t0; t0=$(date +%s%N)
  "${@:2}" >> "$work/$1.out" 2>&1; local rc=$?
  echo "WALL $1 $(( ($(date +%s%N) - t0) / 1000000 )) ms (exit $rc)" | tee -a "$log"
  [ $rc = 0 ] || tail -40 "$work/$1.out" | sed "s/^/$1: /" >> "$log"  # why it failed
  return $rc
}
nvidia-smi --query-gpu=name --format=csv,noheader >> "$log"
ddpm train -c examples/cifar10-fast.yaml --set train.compile=off --set train.steps=20 --set train.guide_step=10 \
  --set train.max_time=null --set data.dataset=shapes --set logging.run_dir="$work/runs" \
  --set logging.run_name=net --set logging.fid_every=0 > "$work/train.out" 2>&1 || { tail -5 "$work/train.out"; exit 1; }
run=$work/runs/net
[ "${SAMPLE:-1}" = 0 ] || timed sample-cold ddpm sample "$run" -n "$n" --format npz --out "$work/cold.npz"
[ "${SAMPLE:-1}" = 0 ] || timed sample-warm ddpm sample "$run" -n "$n" --format npz --out "$work/warm.npz"
# packages with the weights inside, one for the model and one for its guide (WEIGHTS=0: not)
if [ "${WEIGHTS:-1}" != 0 ]; then
  timed aoti-build-model python3 benchmarks/bench_aoti.py build "$run" -n "$n" --out "$work/model.pt2" --weights
  timed aoti-build-guide python3 benchmarks/bench_aoti.py build "$run" -n "$n" --out "$work/guide.pt2" --weights \
    --guide
  timed aoti-sample-weights python3 benchmarks/bench_aoti.py sample "$run" -n "$n" --package "$work/model.pt2" \
    --guide-package "$work/guide.pt2" --save "$work/weights.npz"
fi
# one package without weights for the model and its guide (WEIGHTLESS=0: not)
if [ "${WEIGHTLESS:-1}" != 0 ]; then
  plain=(); [ "${PLAIN:-0}" = 1 ] && plain=(--plain)  # PLAIN=1: inductor's default options (no PDL)
  timed aoti-build python3 benchmarks/bench_aoti.py build "$run" -n "$n" --out "$work/net.pt2" "${plain[@]}" \
    || { tail -3 "$work/aoti-build.out" >> "$log"
         timed aoti-build-plain python3 benchmarks/bench_aoti.py build "$run" -n "$n" --out "$work/net.pt2" --plain; }
  timed aoti-sample-1 python3 benchmarks/bench_aoti.py sample "$run" -n "$n" --package "$work/net.pt2" \
    --save "$work/aoti.npz"
  timed aoti-sample-2 python3 benchmarks/bench_aoti.py sample "$run" -n "$n" --package "$work/net.pt2"
fi
# one package for every batch size: its build, and its speed against the static one's (DYNAMIC=0: not, ~2 minutes
# less)
if [ "${DYNAMIC:-1}" != 0 ]; then
  timed aoti-build-dynamic python3 benchmarks/bench_aoti.py build "$run" -n "$n" --out "$work/any.pt2" --dynamic
  timed aoti-sample-dynamic python3 benchmarks/bench_aoti.py sample "$run" -n "$n" --package "$work/any.pt2" \
    --save "$work/any.npz"
fi
grep -h "^BENCH" "$work"/aoti-*.out >> "$log"
grep -h "images in" "$work"/sample-*.out >> "$log"
python3 -c "
import numpy as np
import os
if not os.path.exists('$work/warm.npz'):
    raise SystemExit('no warm ddpm sample to compare with (SAMPLE=0)')
a = np.load('$work/warm.npz')['arr_0'].astype(int)
for f in ('weights.npz', 'aoti.npz', 'any.npz'):
    if not os.path.exists('$work/' + f):
        continue
    d = np.abs(a - np.load('$work/' + f)['arr_0'].astype(int))
    print('IMAGES warm ddpm sample vs', f, ': mean |diff|', round(float(d.mean()), 3), 'max', int(d.max()),
          'share of pixels off by more than 8', round(float((d > 8).mean()), 4))" >> "$log" 2>&1
cat "$log"
