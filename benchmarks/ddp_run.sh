#!/usr/bin/env bash
# Scaling on one host: the same `ddpm train` on 1 GPU and on N GPUs (same per-GPU batch), in one device call.
# Needs .carry_data/train.zip and .whl carried. Prints each run's median img/s after warm-up and its ratio to
# the first run. Each RUN is "NAME GPUS [--set ARGS...]"; the first is the 1-GPU baseline.
#   bash benchmarks/ddp_run.sh STEPS "g1 1" "g2 2" "g2-ddp 2 --set train.grad_sync=ddp"
set -u -o pipefail
steps=${1:-300}; shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast here
mkdir -p "$HOME/data" && cp .carry_data/train.zip "$HOME/data/train.zip"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
nvidia-smi topo -m | head -4
common=(-c examples/cifar10-fast.yaml --set data.root="$HOME/data/train.zip" --set train.max_time=100000
        --set train.steps="$steps" --set logging.log_every=25 --set logging.run_dir="$HOME/runs"
        --set logging.checkpoint_every=1000000 --set logging.sample_every=1000000 --set logging.sample_count=10
        --set logging.sample_steps=2)
names=()
for spec in "$@"; do
    read -r name gpus extra <<< "$spec"
    names+=("$name")
    rm -rf "${HOME:?}/runs/$name"  # a name reused on a warm machine must not report the old run
    timeout 420 python3 -m ddpm_cli train "${common[@]}" --set logging.run_name="$name" $extra --gpus "$gpus" 2>&1 \
        | grep -E "^run|^done|rror|compil"
done
python3 - "$HOME/runs" "${names[@]}" <<'PY'
import json, statistics, sys
runs, names = sys.argv[1], sys.argv[2:]
rates = {}
for name in names:
    try:
        recs = [json.loads(l) for l in open(f"{runs}/{name}/metrics.jsonl") if '"img_per_s"' in l][3:]
    except OSError:
        recs = []
    if not recs:
        print(f"DDP {name}: no steady-state intervals (the run failed or was too short)")
        continue
    rates[name] = statistics.median(r["img_per_s"] for r in recs)
    base = rates.get(names[0])
    print(f"DDP {name}: {rates[name]:,.0f} img/s (median of {len(recs)} intervals after warm-up)"
          + (f", {rates[name] / base:.3f}x {names[0]}" if base else ""))
PY
