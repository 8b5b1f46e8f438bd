#!/usr/bin/env bash
# Scaling on one host: the same `ddpm train` on 1 GPU and on 2 GPUs (same per-GPU batch), in one device call.
# Needs .carry_data/train.zip and .whl carried. Prints each run's median img/s after warm-up and the ratio.
#   bash benchmarks/ddp_run.sh STEPS "EXTRA --set ARGS"
set -u
steps=${1:-300}; extra=${2:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast here
mkdir -p "$HOME/data" && cp .carry_data/train.zip "$HOME/data/train.zip"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
common=(-c examples/cifar10-fast.yaml --set data.root="$HOME/data/train.zip" --set train.max_time=100000
        --set train.steps="$steps" --set logging.log_every=25 --set logging.run_dir="$HOME/runs"
        --set logging.checkpoint_every=1000000 --set logging.sample_every=1000000 --set logging.sample_count=10
        --set logging.sample_steps=2)
python3 -m ddpm_cli train "${common[@]}" --set logging.run_name=g1 $extra 2>&1 | grep -E "^run|^done|rror"
python3 -m ddpm_cli train "${common[@]}" --set logging.run_name=g2 $extra --gpus 2 2>&1 | grep -E "^run|^done|rror"
python3 - "$HOME/runs" <<'PY'
import json, statistics, sys
rates = {}
for name in ("g1", "g2"):
    recs = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}/metrics.jsonl") if '"img_per_s"' in l]
    rates[name] = statistics.median(r["img_per_s"] for r in recs[3:])
    print(f"DDP {name}: {rates[name]:,.0f} img/s (median of {len(recs) - 3} intervals after warm-up)")
print(f"DDP scaling 2 GPUs / 1 GPU: {rates['g2'] / rates['g1']:.3f}x ({rates['g2'] / rates['g1'] / 2:.1%} efficiency)")
PY
