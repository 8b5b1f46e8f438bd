#!/usr/bin/env bash
# The fixed-budget quality benchmark (GUIDE.md section 5) on the GPU machine, run in the background (setsid):
# train for train.max_time, sample 10,000 images with the default sampler, FID against the 50,000 training
# images, then an FID-vs-NFE sweep. Needs .carry_data/train.zip carried by this call and the Inception weights
# at $HOME/inception.pth (copied by the next call). Results go to $HOME/fid/NAME.jsonl, the log to NAME.log.
#   bash benchmarks/fid_run.sh NAME CONFIG "TRAIN --set ARGS" "SAMPLE ARGS" \
#       "SWEEP: sampler:steps[:guidance[:eta[:ema_decay[:guide_step]]]] ..."
# guide_step: autoguidance by the run's own checkpoint of that step (keep it: logging.checkpoint_every/keep_last).
# torch.compile starts cold (a fresh inductor cache per run), as on a fresh machine: compilation counts.
# Keep a call in flight until FID-DONE (e.g. `sleep 520` calls back to back): the device machine goes back after
# 30 s without a call, background job or not; a first run here was lost that way (2026-11-26).
set -u
if [ "${1:-}" != inner ]; then
    export NAME=$1 CONFIG=$2 EXTRA=${3:-} SAMPLE=${4:-} SWEEP=${5:-}
    mkdir -p "$HOME/data" "$HOME/fid" "$HOME/runs"
    # Several runs may share the machine (CUDA_VISIBLE_DEVICES=i each): never rewrite what a running one reads.
    cmp -s .carry_data/train.zip "$HOME/data/train.zip" || { cp .carry_data/train.zip "$HOME/data/train.zip.part" &&
        mv "$HOME/data/train.zip.part" "$HOME/data/train.zip"; }  # a reader keeps the old file; none sees half
    [ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$HOME/inductor-$NAME
    setsid nohup bash "$0" inner > "$HOME/fid/$NAME.log" 2>&1 < /dev/null &
    exit 0
fi
set -x
out=$HOME/fid/$NAME
ddpm() { python3 -m ddpm_cli "$@"; }
ddpm train -c "$CONFIG" --set data.root="$HOME/data/train.zip" --set logging.run_dir="$HOME/runs" \
    --set logging.run_name="$NAME" $EXTRA
ckpt=$HOME/runs/$NAME
ddpm sample "$ckpt" -n 10000 --batch-size 1000 --format npz --out "$out-main.npz" $SAMPLE
while [ ! -f "$HOME/inception.pth" ]; do sleep 2; done
ev=(--ref "$HOME/data/train.zip" --inception-weights "$HOME/inception.pth" --batch-size 500
    --cache-dir "$HOME/fidcache")
echo "MAIN ${SAMPLE:-default sampler and guidance}" >> "$out.jsonl"
ddpm eval "$out-main.npz" "${ev[@]}" | tee -a "$out.jsonl"
for s in $SWEEP; do
    IFS=: read -r smp st w e d g <<< "$s"
    ddpm sample "$ckpt" -n 10000 --batch-size 1000 --format npz --out "$out-$s.npz" --sampler "$smp" \
        --steps "$st" ${w:+--guidance "$w"} ${e:+--eta "$e"} ${d:+--ema-decay "$d"} \
        ${g:+--guide-model "$ckpt/checkpoints/ckpt-$(printf %08d "$g").safetensors"} \
        $(echo "$SAMPLE" | grep -o -- '--per-class')
    echo "SWEEP $smp $st ${w:-default-guidance} ${e:+eta $e} ${d:+ema $d} ${g:+guide $g}" >> "$out.jsonl"
    ddpm eval "$out-$s.npz" "${ev[@]}" | tee -a "$out.jsonl"
done
echo FID-DONE
