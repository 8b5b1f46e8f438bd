#!/usr/bin/env bash
# One device call: install the carried wheels, then run the peer and our benchmark in the background (setsid,
# so it outlives the call), logging under $HOME/bench. Usage:
#   [NOPEER=1] [WARM=1] [CLI="<bench_sample_cli.py args>"] [GPUTEST=1] bash benchmarks/gpu_run.sh "<bench args>" ...
# CLI: afterwards `ddpm sample` end to end (benchmarks/bench_sample_cli.py); GPUTEST: then `pytest -m gpu` (put
# pytest, pluggy, iniconfig and packaging wheels among the carried .whl).
# An argument set "@NAME <bench args>" times another version of the code: .ab/NAME, an ignored folder made here
# with `mkdir -p .ab/NAME && git archive COMMIT ddpm_cli benchmarks | tar -x -C .ab/NAME` and carried (.ab), so
# that one call sets versions side by side on one machine (its bench_speed.py, its package).
# The peer's script is .carry/peer_diffusers.py, or .ab/peer_diffusers.py where .carry holds other things.
# WARM=1 first runs every argument set (and the peer) at once, briefly, to fill inductor's on-disk cache with
# all their graphs in parallel (timings discarded, logs in warm*.log); the measured runs then follow one after
# another, loading their graphs from the cache, so their "first step" is a warm start, not a cold compile.
# Autotuning (coordinate descent, max-autotune) then picks its configs while the GPU is shared.
# The run outlives the call, not the machine: the device tool hands an idle machine back ~30 s after a call ends,
# and the run with it. Follow with polling calls (`sleep 60; tail $HOME/bench/log`) back to back until BENCH-DONE
# (2026-11-27: a run lost this way, with its warm-up and peer).
set -u
mkdir -p "$HOME/bench"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
ls .carry/diffusers-*.whl > /dev/null 2>&1 &&  # else the peer's diffusers is among .whl, installed above
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/peer" .carry/diffusers-*.whl
# A private copy of the code and the peer: the next call syncs the working tree again, and drops the carried
# .carry if that call does not name it (2026-11-27: the peer's measured run found no script).
src=$HOME/bench-src; rm -rf "$src"; mkdir -p "$src"
cp -r ddpm_cli benchmarks tests examples pyproject.toml .carry "$src/"; [ -d .ab ] && cp -r .ab "$src/"
cd "$src" || exit 1
export PYTHONPATH=/tmp/site:$src
peer=.carry/peer_diffusers.py; [ -f $peer ] || peer=.ab/peer_diffusers.py
setsid nohup bash -c "
  version() {  # \"@NAME args\" -> root=.ab/NAME, path (its package first), args without @NAME
    root=.; path=\$PYTHONPATH
    case \$1 in @*) root=.ab/\${1#@}; path=/tmp/site:$src/\$root; shift;; esac; args=\$*
  }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  if [ -n \"${WARM:-}\" ]; then
    i=0; for args in ${*@Q}; do i=\$((i+1)); args=\${args//--e2e/}; args=\${args//--profile/}; version \$args
      (export TORCHINDUCTOR_COMPILE_THREADS=4; eval PYTHONPATH=\$path python3 \$root/benchmarks/bench_speed.py \$args --steps 60 --sample-steps 2 > \$HOME/bench/warm\$i.log 2>&1) &
    done
    [ -n \"${NOPEER:-}\" ] || PYTHONPATH=\$HOME/peer:/tmp/site python3 $peer --compile > \$HOME/bench/warm-peer.log 2>&1 &
    wait; echo WARM-DONE \$(date +%T)
  fi
  [ -n \"${NOPEER:-}\" ] || PYTHONPATH=\$HOME/peer:/tmp/site python3 $peer --compile
  i=0; for args in ${*@Q}; do i=\$((i+1)); version \$args; echo \"BENCH code \$root\"
    eval PYTHONPATH=\$path python3 \$root/benchmarks/bench_speed.py \$args --json \$HOME/bench/ours\$i.json; done
  [ -z \"${CLI+x}\" ] || python3 benchmarks/bench_sample_cli.py ${CLI:-}
  [ -z \"${GPUTEST:-}\" ] || python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -9
  echo BENCH-DONE
" > "$HOME/bench/log" 2>&1 < /dev/null &
