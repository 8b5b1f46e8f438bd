#!/usr/bin/env bash
# Issue 21's measurements on one GPU, in the foreground, a phase at a time, within one device call:
#   bash benchmarks/bigimg_run.sh PHASE...        # in the order given; the phases are the `case` below
#   (ours, ours256, peer, peer256: each side's runs; pairs, samples: ours and the peer side by side; stream: the
#   streamed folders, made by the first phase in the background, and checkpointing at 256 px; stream64: streamed
#   by worker processes and by threads against in memory, from the same 64 px folder; profile256, profile64: each
#   side's step profiled, its GPU time by kernel kind; profile256k: the same with each Triton kernel's bandwidth;
#   tune256: ours so, with inductor's coordinate-descent tuning; tune64, tune64cd: inductor's fusion options and its
#   coordinate-descent tuning at 64 px; mem256: the peak with and without checkpointing
#   without CUDA graphs; budget256: the partitioner's activation_memory_budget 0.5;
#   largest: the largest batch at 256 px with and without checkpointing, alone on the card; fold, limit64, fold256:
#   train.fold_upsampling and cuDNN's plan search, 2026-12-07; size128: the 128 px pair, profiled; ckmem256,
#   ckgroup256, ck256, ckbig256, ckfit256, base256: checkpointing's memory and speed at 256 px)
# The jobs of a phase start together and compile side by side (CPU work); once all are ready, each takes the GPU
# for its timed part in turn (bench_bigimg.py --gpu-lock --together), so one is timed at a time and none is
# compiling meanwhile. Phases run one after another, and a phase's processes must fit the card together (five of
# ours at once ran out of the H200's memory). Nothing outlives the call: a phase that would end past DEADLINE_S
# (default 570 s after the start) is cut, and what finished is in the log.
# Needs the carried wheels in .whl (pydantic and companions, diffusers). Caches stay in $HOME (TORCHINDUCTOR_CACHE_DIR
# and DDPM_COMPILE_CACHE_DIR), so a call that follows within the machine's 30 s keeps them.
# Output: $OUT/bigimg.log (BENCH lines, phase times) and $OUT/jobs.log (each job's last lines); $HOME/bench else.
set -u
start=$(date +%s); deadline=$((start + ${DEADLINE_S:-570}))
out=${OUT:-$HOME/bench}; mkdir -p "$out" "$HOME/bench"
log=$out/bigimg.log; jobs_log=$out/jobs.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$HOME/inductor \
  DDPM_COMPILE_CACHE_DIR=$HOME/ddpm-compile
B="python3 benchmarks/bench_bigimg.py"; I64="-c examples/iddpm-64.yaml"; D256="-c examples/ddpm-256.yaml"
C32="-c examples/cifar10.yaml"
LOCK=$HOME/bench/gpu.lock
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >> "$log"
export CARD_MIB=${CARD_MIB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)}
[ "$CARD_MIB" -gt 100000 ] && BIG_CARD=1  # (tune64's peer fits beside its four)
if [[ " $* " == *" stream"* ]] && [ ! -e "$HOME/img256/done" ]; then  # the folders to stream from, made while the
  # first phase compiles (only for the phases that stream: it takes cores)
  ( $B folder "$HOME/img64" --size 64 --count 4000 && $B folder "$HOME/img256" --size 256 --count 2000 \
    && touch "$HOME/img256/done" ) > "$HOME/bench/folders.log" 2>&1 &
fi

phase() {  # phase NAME JOB...: the jobs together, each with the lock, cut at the deadline
  local name=$1; shift
  local left=$((deadline - $(date +%s)))
  if [ $left -lt 60 ]; then echo "PHASE $name SKIPPED ($left s left)" >> "$log"; return; fi
  echo "PHASE $name START $(date +%T) ($left s left)" >> "$log"
  local pids=() i=0 lock=$HOME/bench/$name.lock
  rm -rf "$lock.ready"
  for job in "$@"; do
    i=$((i + 1))
    case $job in largest*) turn="" ;; *) turn="--gpu-lock $lock --together $#" ;; esac
    ( echo "== $name/$i: $job"; TORCHINDUCTOR_COMPILE_THREADS=${THREADS:-4} timeout $left $B $job $turn 2>&1 ) \
      > "$HOME/bench/$name-$i.log" &
    pids+=($!)
  done
  wait "${pids[@]}"
  for f in "$HOME/bench/$name"-*.log; do
    grep -h '^BENCH' "$f" >> "$log" || echo "FAILED $(head -1 "$f")" >> "$log"
    { head -1 "$f"; tail -n +2 "$f" | grep -v "^BENCH" | tail -n 15; } >> "$jobs_log"
  done
  echo "PHASE $name END $(date +%T)" >> "$log"
}

T80="--steps 80"
for p in "$@"; do
  case $p in  # each phase's processes must fit the card together: ours at 256 px holds 74 GiB, the peer's ~60
    ours) phase ours "train $I64 $T80" "train $D256 --size 128 $T80" "sample $D256 --steps 20" ;;
    ours256) phase ours256 "train $D256 $T80" "train $D256 $T80 --set model.checkpointing=true" ;;
    peer) phase peer "peer $I64 --steps 60" "peer $D256 --size 128 --steps 60" "sample $D256 --peer --steps 60" ;;
    peer256) phase peer256 "peer $D256 --steps 60" ;;
    pairs) phase pairs "peer $D256 --steps 60" "train $D256 --size 128 $T80" "peer $D256 --size 128 --steps 60" ;;
    samples) phase samples "sample $D256 --steps 20" "sample $D256 --peer --steps 60" ;;
    stream) wait  # the folders
      phase stream "train $I64 $T80 --data $HOME/img64 --set data.streaming=on" \
        "train $D256 $T80 --data $HOME/img256 --set data.streaming=on" \
        "train $D256 $T80 --set model.checkpointing=true" ;;
    stream64) wait  # streamed (worker processes, then threads) against in memory, the same folder (17 GiB each)
      phase stream64 "train $I64 $T80 --data $HOME/img64 --set data.streaming=on" \
        "train $I64 $T80 --data $HOME/img64 --set data.streaming=on --set data.stream_workers=0" \
        "train $I64 $T80 --data $HOME/img64 --set data.streaming=off" ;;
    profile256)  # where a step's GPU time goes (--profile: ms a step by kernel kind), ours then the peer: together
      # they would not fit an H100 (74 + 60 GiB)
      phase prof256 "train $D256 $T80 --profile"
      phase prof256-peer "peer $D256 --steps 30 --profile" ;;
    profile256k)  # the same with each Triton kernel's bytes and bandwidth (inductor's benchmark_kernel)
      phase prof256k "train $D256 $T80 --profile --kernels"
      phase prof256k-peer "peer $D256 --steps 30 --profile --kernels" ;;
    tune256)  # inductor's coordinate-descent tuning of each kernel's block sizes, profiled (compiled afresh)
      phase tune256 "train $D256 $T80 --profile --kernels --inductor coordinate_descent_tuning=True" ;;
    mem256)  # the compiled step's peak without CUDA graphs (train.compile=on), with and without checkpointing: did
      # the CUDA graph pool raise the checkpointed peak (72.9 against 55.7 GiB with reduce-overhead)?
      phase mem256 "train $D256 $T80 --set train.compile=on"
      phase mem256-ckpt "train $D256 $T80 --set train.compile=on --set model.checkpointing=true" ;;
    ckmem256)  # mem256 shortened to one call: 30 steps each, the plain step then the checkpointed one
      phase ckmem256 "train $D256 --steps 30 --set train.compile=on"
      phase ckmem256-ckpt "train $D256 --steps 30 --set train.compile=on --set model.checkpointing=true" ;;
    ckgroup256)  # ckmem256's checkpointed step with the per-group kernel and combo kernels, as d6b3ee3's rule ran it
      # (on an H100, 2026-12-07, out of memory)
      g="--set train.norm_stats=group --set train.combo_kernels=on"
      phase ckgroup256 "train $D256 --steps 30 --set train.compile=on --set model.checkpointing=true $g" ;;
    ck256)  # the checkpointed 256 px step under the CUDA defaults (combo kernels off with it since fe836fd), at
      # batch 64 and 32 side by side and timed in turns: its speed, and its peak's slope in the batch, from which
      # the largest compiled batch (then ckbig256 with BATCH=that, alone)
      phase ck256 "train $D256 --steps 30 --set model.checkpointing=true" \
        "train $D256 --steps 30 --batch 32 --set model.checkpointing=true" ;;
    ckbig256) phase ckbig256 "train $D256 --steps 20 --batch ${BATCH:-160} --set model.checkpointing=true" ;;
    ckfit256)  # ckbig256 at the batch ck256's two peaks predict (a straight line in the batch, to 97% of the card's
      # memory, a multiple of 8), so one call measures both; BATCH, if set, wins
      fit=$(python3 - "$log" <<'PY'
import json, os, sys
lines = [json.loads(l.split(" ", 1)[1]) for l in open(sys.argv[1]) if l.startswith("BENCH {")]
runs = sorted((r["batch"], r["first_steps_peak_gib"]) for r in lines if r.get("kind") == "train"
              and r.get("checkpointing") and r.get("image_size") == [256, 256] and r.get("first_steps_peak_gib"))
if len(runs) < 2: sys.exit(1)
(b0, m0), (b1, m1) = runs[0], runs[-1]
per = (m1 - m0) / (b1 - b0)
card = float(os.environ["CARD_MIB"]) / 1024
print(int((0.97 * card - (m0 - b0 * per)) / per) // 8 * 8)
PY
) || { echo "PHASE ckfit256 SKIPPED (no two checkpointed 256 px peaks in the log)" >> "$log"; continue; }
      echo "FIT ckfit256 batch ${BATCH:-$fit} (predicted from ck256's peaks)" >> "$log"
      phase ckfit256 "train $D256 --steps 20 --batch ${BATCH:-$fit} --set model.checkpointing=true" ;;
    base256)  # the plain 256 px step under the CUDA defaults, alone: checkpointing's cost on the card of ck256
      phase base256 "train $D256 --steps 30" ;;
    budget256)  # the partitioner's own trade (functorch's activation_memory_budget) against checkpointing's 16%
      phase budget256 "train $D256 $T80 --inductor functorch.activation_memory_budget=0.5" ;;
    profile64) phase prof64 "train $I64 $T80 --profile" "peer $I64 --steps 60 --profile" ;;
    fold)  # train.fold_upsampling on (the CUDA default) and off at 64 and 32 px, the peer beside each; 64 px profiled
      # (with the bound: bench_bigimg.bound)
      phase fold "train $I64 $T80 --profile" "train $I64 $T80 --profile --set train.fold_upsampling=off" \
        "peer $I64 --steps 60 --profile" "train $C32 --steps 300 --log-every 25" \
        "train $C32 --steps 300 --log-every 25 --set train.fold_upsampling=off" "peer $C32 --steps 150" ;;
    tune64)  # inductor's fusion options at 64 px, each compiled afresh side by side, the default first: whether any
      # makes the fused kernels (34.5 ms a step against a 7.9 ms floor, BENCHMARKS.md) move fewer bytes. Each holds
      # ~17.4 GiB (12.7 allocated): four fit 80 GB; the peer joins where the card has over 100 GB
      phase tune64 "train $I64 $T80 --profile --inductor" "train $I64 $T80 --profile --inductor aggressive_fusion=True" \
        "train $I64 $T80 --profile --inductor triton.mix_order_reduction_allow_multi_stages=True" \
        "train $I64 $T80 --profile --inductor max_fusion_size=128 score_fusion_memory_threshold=1" \
        ${BIG_CARD:+"peer $I64 --steps 30"} ;;
    tune64cd)  # coordinate-descent tuning alone: its tuning runs kernels on the GPU while it compiles (beside tune64's
      # four it ran out of the H100's memory, 2026-12-07)
      phase tune64cd "train $I64 $T80 --profile --inductor coordinate_descent_tuning=True" ;;
    limit64)  # cuDNN's benchmark over all its plans, not torch's default 10 (inductor's cache warm from `fold`)
      phase limit64 "train $I64 $T80 --profile --cudnn-limit 0" ;;
    fold256)  # the 256 px step as profile256 runs it, ours with the fold (the default), then the peer
      phase fold256 "train $D256 $T80 --profile"
      phase fold256-peer "peer $D256 --steps 30 --profile" ;;
    size128)  # the 128 px row on the card of the other rows: ours (folded, the default) and the peer, both profiled
      phase size128 "train $D256 --size 128 $T80 --profile" "peer $D256 --size 128 --steps 60 --profile" ;;
    largest) phase largest "largest $D256"
      phase largest-ckpt "largest $D256 --set model.checkpointing=true" ;;
    *) echo "unknown phase $p (ours ours256 peer peer256 pairs samples stream stream64 profile256 profile256k" \
         "tune256 tune64 tune64cd mem256 budget256 profile64 fold limit64 fold256 size128 ckmem256 ckgroup256 ck256 ckbig256" \
         "ckfit256 base256" \
         "largest)" >&2; exit 2 ;;
  esac
done
echo "DONE $(date +%T), $(( $(date +%s) - start )) s" >> "$log"
cat "$log"
