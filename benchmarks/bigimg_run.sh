#!/usr/bin/env bash
# Issue 21's measurements on one GPU, in the background (setsid: the run outlives the device call; follow it with
# polling calls back to back, `sleep 300; grep BENCH $HOME/bench/bigimg.log`, until AFTER-DONE). Needs the
# carried wheels in .whl (pydantic and companions, diffusers). Every figure is one fresh process of
# benchmarks/bench_bigimg.py; the peer's runs are in the same call. Usage:
#   bash benchmarks/bigimg_run.sh [AFTER]     # AFTER: a shell command run when it is done (e.g. another benchmark)
# First every compiled variant runs once, briefly, ours at once and then the peer's, to fill inductor's cache in
# parallel (the compiling is CPU work; logs in $HOME/bench/bigimg-warm*.log); the measured runs then follow one at
# a time. The whole set takes longer than a device call: plan the polling calls (docs/lab-notes.md, 2026-12-03).
set -u
mkdir -p "$HOME/bench"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
src=$HOME/bigimg-src; rm -rf "$src"; mkdir -p "$src"
cp -r ddpm_cli benchmarks examples pyproject.toml "$src/"; cd "$src" || exit 1
export PYTHONPATH=/tmp/site:$src PYTHONUNBUFFERED=1
setsid nohup bash -c '
  B="python3 benchmarks/bench_bigimg.py"
  I64="-c examples/iddpm-64.yaml"; D256="-c examples/ddpm-256.yaml"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  date +"START %T"
  ( $B folder $HOME/img64 --size 64 --count 4000; $B folder $HOME/img256 --size 256 --count 2000 ) \
    > $HOME/bench/bigimg-folders.log 2>&1 &
  # Two waves: all nine at once ran out of memory on an H200: the peer alone takes 58 GiB at 256 px (2026-12-03).
  i=0
  for wave in ours peer; do
    if [ $wave = ours ]; then jobs=("train $I64" "train $D256 --size 128" "train $D256" \
        "train $D256 --set model.checkpointing=true" "sample $D256")
    else jobs=("peer $I64" "peer $D256 --size 128" "peer $D256" "sample $D256 --peer"); fi
    for job in "${jobs[@]}"; do
      i=$((i+1)); TORCHINDUCTOR_COMPILE_THREADS=3 $B $job --steps 4 > $HOME/bench/bigimg-warm$i.log 2>&1 &
    done
    wait; date +"WARM-$wave-DONE %T"
  done
  $B peer $I64; $B train $I64
  $B peer $D256 --size 128; $B train $D256 --size 128
  $B peer $D256; $B train $D256; $B train $D256 --set model.checkpointing=true
  $B train $I64 --data $HOME/img64 --set data.streaming=on
  $B train $D256 --data $HOME/img256 --set data.streaming=on
  $B sample $D256; $B sample $D256 --peer
  $B largest $D256; $B largest $D256 --set model.checkpointing=true
  date +"BIGIMG-DONE %T"
  '"${1:-true}"'
  date +"AFTER-DONE %T"
' > "$HOME/bench/bigimg.log" 2>&1 < /dev/null &
