#!/usr/bin/env bash
# Several fixed-budget quality runs side by side, run i on GPU i of this host, each exactly as
# benchmarks/fid_run.sh runs one alone (its own cold inductor cache, train.max_time of training, 10,000 samples,
# FID against the training set). Needs what fid_run.sh needs (.carry_data/train.zip and .whl in this call, the
# Inception weights at $HOME/inception.pth by the time the first run finishes training).
#   bash benchmarks/fid_sweep.sh CONFIG "NAME|TRAIN --set ARGS|SAMPLE ARGS|SWEEP" ...
# Then keep calls in flight until `python3 benchmarks/fid_summary.py $HOME/fid` shows every run done.
set -u
config=$1; shift
i=0
for spec in "$@"; do
    IFS='|' read -r name extra sample sweep <<< "$spec"
    CUDA_VISIBLE_DEVICES=$i bash "$(dirname "$0")/fid_run.sh" "$name" "$config" "$extra" "$sample" "$sweep"
    i=$((i + 1))
done
