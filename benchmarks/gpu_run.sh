#!/usr/bin/env bash
# One device call: install the carried wheels, then run the peer and our benchmark in the background (setsid,
# so it outlives the call), logging under $HOME/bench. Usage: [NOPEER=1] bash benchmarks/gpu_run.sh "<bench args>" ["<more bench args>" ...]
set -u
mkdir -p "$HOME/bench"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/peer" .carry/diffusers-*.whl
export PYTHONPATH=/tmp/site:$PWD
setsid nohup bash -c "
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  [ -n \"${NOPEER:-}\" ] || PYTHONPATH=\$HOME/peer:/tmp/site python3 .carry/peer_diffusers.py --compile
  i=0; for args in ${*@Q}; do i=\$((i+1)); eval python3 benchmarks/bench_speed.py \$args --json \$HOME/bench/ours\$i.json; done
  echo BENCH-DONE
" > "$HOME/bench/log" 2>&1 < /dev/null &
