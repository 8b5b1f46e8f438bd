#!/usr/bin/env bash
# Which compile options keep activation checkpointing from saving memory in the compiled step (BENCHMARKS.md,
# "Larger images", "Memory at 256 px"), in one device call: five processes side by side, each one steady peak
# (tests/test_gpu_bigimg.py's measure: 64 px, batch 32, train.compile: on, steps 3 to 5; the peak is per process),
# combo kernels on and off, with checkpointing and without, per-channel and per-group statistics; and beside them
# ddpm-256's checkpointed step with combo kernels off (its img/s runs beside the others' compiling: no figure).
# Written 2026-12-07 (as benchmarks/lease_ckmem.sh, its name in the lab notes). Carry .whl:
#   bash benchmarks/ckpt_memory.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1
echo "code $(find ddpm_cli tests -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
t0=$(date +%s)
peak() {  # checkpointing, then key=value overrides
  TORCHINDUCTOR_COMPILE_THREADS=2 timeout 400 python3 -c "
import pathlib, sys, tempfile
from test_gpu_bigimg import steady_peak_gib
kw = dict(a.split('=') for a in sys.argv[2:])
print('PEAK', sys.argv[1:], round(steady_peak_gib(pathlib.Path(tempfile.mkdtemp()), sys.argv[1] == 'on', **kw), 4))
" "$@" 2>&1 | grep -E "^PEAK|Error" | tail -3
}
peak off train__combo_kernels=off train__norm_stats=channel &
peak on train__combo_kernels=off train__norm_stats=channel &
peak on train__combo_kernels=off train__norm_stats=group &
peak on train__combo_kernels=on train__norm_stats=channel &
peak off train__combo_kernels=on train__norm_stats=group &
TORCHINDUCTOR_COMPILE_THREADS=6 timeout 520 python3 benchmarks/bench_bigimg.py train -c examples/ddpm-256.yaml \
  --steps 30 --set train.compile=on --set model.checkpointing=true --set train.combo_kernels=off 2>&1 \
  | grep -E "^BENCH|Error" | tail -3 &
wait
echo "done in $(( $(date +%s) - t0 )) s"
