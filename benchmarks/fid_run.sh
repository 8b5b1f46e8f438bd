#!/usr/bin/env bash
# The fixed-budget quality benchmark (GUIDE.md section 5) on the GPU machine, run in the background (setsid):
# train for train.max_time, sample 10,000 images with the default sampler, FID against the 50,000 training
# images, then an FID-vs-NFE sweep. Needs .carry_data/train.zip carried by this call and the Inception weights
# at $HOME/inception.pth (copied by the next call). Results go to $HOME/fid/NAME.jsonl, the log to NAME.log.
#   bash benchmarks/fid_run.sh NAME CONFIG "TRAIN --set ARGS" "SAMPLE ARGS" \
#       "SWEEP: [RUN@]sampler:steps[:guidance[:eta[:ema_decay[:guide_step[:n]]]]] ... [| ANOTHER LANE ...]"
# guidance: empty takes the checkpoint's default (its stored guide, if any); 1 samples unguided.
# guide_step: autoguidance by the run's own checkpoint of that step (keep it: logging.checkpoint_every/keep_last);
# a run's name instead (letters first): by that run's last checkpoint, once it has trained (a smaller guide
# trained by another fid_run.sh on this machine, e.g. `fid_run.sh xs CONFIG "--set model.base_channels=64"`).
# ema_decay L0.08: the post-hoc EMA of relative length 0.08 (`ddpm ema`; the run trained with train.posthoc_ema).
# RUN@: sample another run of this host instead (after it has trained), so that several GPUs share one model's
# sweep; its results go to RUN.jsonl. Empty SAMPLE ARGS: the main score is `ddpm eval RUN -n 10000`, the
# command a user runs (default sampler and guidance). `--per-class` in this run's SAMPLE ARGS applies to its
# whole sweep, RUN@ entries included.
# n: this entry's sample count (default FID_N). " | " splits the sweep into lanes that run side by side on the
# GPU (one process's start-up, compile and Inception overlap another's sampling); an entry's lane is its order.
# FLOOR=PATH (an images zip, e.g. cifar10-jpeg/test.zip, in place with the Inception weights): also score those
# real images against the reference, the floor a model's samples are compared with. Each record's label ends
# with the command's wall time.
# FID_N=200 shrinks the sample counts for a smoke test of this script; DDPM="CMD" replaces `python3 -m ddpm_cli`.
# AFTER=RUN: train only once run RUN of this machine has ended (trained and scored: its NAME.done), so that two
# runs started by one call take the GPU in turn (a small guide first, then the model it guides).
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
    # A fresh run each time: no checkpoints of an earlier run of this name, a cold compile, no stale marks.
    rm -rf "$HOME/fid/$NAME.trained" "$HOME/fid/$NAME.failed" "$HOME/fid/$NAME.done" "$HOME/fid/$NAME.jsonl" \
        "$HOME/runs/$NAME" "$HOME/inductor-$NAME"
    PYTHONPATH=/tmp/site python3 -c 'import pydantic, torch_fidelity' 2> /dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    # A private copy of the code: later calls sync the working tree again, and a run must not change mid-way.
    src=$HOME/src-$NAME; rm -rf "$src"; mkdir -p "$src"; cp -r ddpm_cli benchmarks examples "$src/"
    [ -f "$CONFIG" ] && cp "$CONFIG" "$src/config.yaml" && CONFIG=$src/config.yaml
    export PYTHONPATH=/tmp/site:$src PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$HOME/inductor-$NAME
    (cd "$src" && setsid nohup bash benchmarks/fid_run.sh inner > "$HOME/fid/$NAME.log" 2>&1 < /dev/null &)
    exit 0
fi
set -x
out=$HOME/fid/$NAME
ddpm() { ${DDPM:-python3 -m ddpm_cli} "$@"; }
if [ -n "${AFTER:-}" ]; then  # the GPU to itself: once that run has ended
    until [ -f "$HOME/fid/$AFTER.done" ] || [ -f "$HOME/fid/$AFTER.failed" ]; do sleep 5; done
fi
ddpm train -c "$CONFIG" --set data.root="$HOME/data/train.zip" --set logging.run_dir="$HOME/runs" \
    --set logging.run_name="$NAME" $EXTRA || { touch "$out.failed"; echo TRAIN-FAILED; echo FID-DONE; exit 1; }
touch "$out.trained"
ckpt=$HOME/runs/$NAME
ev=(--ref "$HOME/data/train.zip" --inception-weights "$HOME/inception.pth" --cache-dir "$HOME/fidcache")
# The label and the result together: lanes, and runs of other GPUs, append to the same file, and bash writes each
# line of a printf apart (a CI run saw two lanes interleave; two writers in a loop under load mispaired 849 of
# 4,000 pairs without the lock, none with it). A failed score says so. $4: the second the command started
# (SECONDS), for its wall time.
record() {
    local r; r=$(tail -n 1 "$3" 2> /dev/null)
    [[ $r == "{"* ]] || r='{"fid": null, "failed": true}'
    { command -v flock > /dev/null && flock 9
      printf '%s (wall %d s)\n%s\n' "$1" $((SECONDS - $4)) "$r" >> "$2"; } 9>> "$2.lock"
}
while [ ! -f "$HOME/inception.pth" ]; do sleep 2; done
t0=$SECONDS
if [ -z "$SAMPLE" ]; then
    ddpm eval "$ckpt" -n "${FID_N:-10000}" --batch-size 1000 "${ev[@]}" | tee "$out-main.json"
    record "MAIN ddpm eval RUN -n ${FID_N:-10000} (default sampler and guidance)" "$out.jsonl" "$out-main.json" $t0
else
    ddpm sample "$ckpt" -n "${FID_N:-10000}" --batch-size 1000 --format npz --out "$out-main.npz" $SAMPLE
    ddpm eval "$out-main.npz" "${ev[@]}" --batch-size 500 | tee "$out-main.json"
    record "MAIN $SAMPLE" "$out.jsonl" "$out-main.json" $t0
fi
if [ -n "${FLOOR:-}" ]; then
    t0=$SECONDS
    ddpm eval "$FLOOR" "${ev[@]}" --batch-size 500 | tee "$out-floor.json"
    record "FLOOR ddpm eval $(basename "$FLOOR") (real images against the reference)" "$out.jsonl" "$out-floor.json" $t0
fi
trained() {  # wait until run $1 has trained (true), failed or never started within an hour (false)
    local waited=0
    while [ ! -f "$HOME/fid/$1.trained" ] && [ ! -f "$HOME/fid/$1.failed" ] && [ $waited -lt 3600 ]; do
        sleep 5; waited=$((waited + 5))
    done
    [ -f "$HOME/fid/$1.trained" ]
}
lane() {
for s in "$@"; do
    run=$NAME; spec=$s
    [[ $s == *@* ]] && { run=${s%%@*}; spec=${s#*@}; }
    trained "$run" || { echo "SKIPPED $s: run $run did not train"; continue; }
    IFS=: read -r smp st w e d g n <<< "$spec"
    c=$HOME/runs/$run; o=$HOME/fid/$run-$spec-by-$NAME; t0=$SECONDS; src=$c; decay=$d
    digits=${g//[^0-9]/}; guide=${g:+$c/checkpoints/ckpt-$(printf %08d "$((10#${digits:-0}))").safetensors}
    if [[ $g == [A-Za-z]* ]]; then  # another run's last checkpoint guides: wait for it as for the run itself
        trained "$g" || { echo "SKIPPED $s: guide run $g did not train"; continue; }
        guide=$HOME/runs/$g
    fi
    if [[ $d == L* ]]; then  # a post-hoc EMA length: its checkpoint first, sampled in place of the run
        rm -f "$o.safetensors" "$o.json"; src=$o.safetensors; decay=
        ddpm ema "$c" --length "${d#L}" --out "$o.safetensors" ||
            { record "SWEEP $s: ddpm ema failed" "$HOME/fid/$run.jsonl" "$o.json" $t0; continue; }
    fi
    ddpm sample "$src" -n "${n:-${FID_N:-10000}}" --batch-size 1000 --format npz --out "$o.npz" --sampler "$smp" \
        --steps "$st" ${w:+--guidance "$w"} ${e:+--eta "$e"} ${decay:+--ema-decay "$decay"} \
        ${guide:+--guide-model "$guide"} \
        $(echo "$SAMPLE" | grep -o -- '--per-class')
    ddpm eval "$o.npz" "${ev[@]}" --batch-size 500 | tee "$o.json"
    record "SWEEP $smp $st ${w:-default-guidance} ${e:+eta $e} ${d:+ema $d} ${g:+guide $g} n ${n:-${FID_N:-10000}} (on $NAME's GPU)" \
        "$HOME/fid/$run.jsonl" "$o.json" $t0
    rm -f "$o.npz" "$o.safetensors"
done
}
IFS='|' read -ra lanes <<< "$SWEEP"
for l in "${lanes[@]}"; do
    lane $l &  # unquoted: a lane is its space-separated entries
done
wait
touch "$out.done"
echo FID-DONE
