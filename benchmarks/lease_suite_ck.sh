#!/usr/bin/env bash
# One device call (2026-12-07, thirty-second session): the GPU suite on the combo-kernel rule, and beside it (for
# its peak memory only: its img/s runs beside the suite and is no figure) ddpm-256's checkpointed step under the
# CUDA defaults. Carry .whl.
set -u
out=${OUT:-/tmp}
( sleep 20; TORCHINDUCTOR_COMPILE_THREADS=4 PYTHONPATH=/tmp/site:$PWD timeout 480 python3 benchmarks/bench_bigimg.py \
    train -c examples/ddpm-256.yaml --steps 30 --set model.checkpointing=true 2>&1 | grep -E "^BENCH|Error" \
    > "$out/ck256.log" ) &
WORKERS=6 timeout 520 bash benchmarks/gpu_suite.sh --timeout=300 > "$out/suite-stdout.log" 2>&1
grep -E "^code|^torch|GPU-SUITE" "$out/suite-stdout.log"
grep -E "PASSED|FAILED|ERROR|GPU-SUITE|passed|failed|^code|^torch" "$out/gpu-suite.log" | grep -v DEBUG | tail -70
grep -A25 "slowest" "$out/gpu-suite.log" | head -14
wait
cat "$out/ck256.log"
