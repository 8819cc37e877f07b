#!/bin/bash
# On the GPU machine, from the repo root:  bash docs/bench/gpu/batch.sh 'STAGE [STAGE...]' [MINUTES]
# Runs the stages' full-recipe runs, in order, within MINUTES (default 8.5), then packs
# results/ and docs/bench/ into $OUT/results.tgz (also when a run was cut off).
# Needs .gpu/whl and .gpu/tfds beside the repo root's files (docs/bench/gpu/README.md).
source "$(dirname "$0")/setup.sh" || exit 1
stages=$1; minutes=${2:-8.5}
end=$(python3 -c "print(int($SECONDS + $minutes * 60))")
day=$(date -u +%F)
jsonl=docs/bench/$day-gpu.jsonl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run() {  # run CMD... with the time this stage has left; SIGINT first, as Ctrl-C
  local t=$((end - SECONDS))
  if [ $t -lt 30 ]; then echo "SKIPPED (no time left): $*"; return; fi
  echo "== $(date -u +%T) ($t s left): $*"
  timeout --signal=INT --kill-after=20 $t "$@"; echo "== rc=$? after $((SECONDS)) s: $*"
}
for stage in $stages; do
case $stage in
  probe)  # what the machine gives: one short run and one bench line
    run python3 -m experiments.run --arch resnet18 --epochs 1 --max-train 12800 --data-dir $DATA --out /tmp/probe --no-progress
    run python3 -m experiments.bench --arch resnet18 --batch-size 256 --dtype bfloat16 --torch --windows 3 --steps 10 --data-dir $DATA --jsonl $jsonl ;;
  bench)  # issue 4: every network at its recipe, both PyTorch flavours; the bf16 target first
    run python3 -m experiments.bench --arch resnet18 --batch-size 256 --dtype bfloat16 --torch --windows 5 --steps 20 --data-dir $DATA --jsonl $jsonl
    run python3 -m experiments.bench --torch --windows 5 --steps 20 --data-dir $DATA --jsonl $jsonl ;;
  bench-bf16)  # every network in bf16
    run python3 -m experiments.bench --dtype bfloat16 --windows 5 --steps 20 --data-dir $DATA --jsonl $jsonl ;;
  reproduce-224)  # issue 5: the 224x224 networks, the notes' recipe
    run python3 -m experiments.reproduce --archs alexnet vgg11 nin --data-dir $DATA ;;
  reproduce-96)
    run python3 -m experiments.reproduce --archs googlenet resnet18 densenet --data-dir $DATA ;;
  modern)  # issue 5's target: resnet18 >= 94% in 10 epochs
    run python3 -m experiments.reproduce --archs resnet18 --recipe modern --data-dir $DATA ;;
  degradation)
    run python3 -m experiments.degradation --data-dir $DATA ;;
  smoke)  # a CPU dry run of the plumbing
    run python3 -m experiments.reproduce --archs lenet_bn --epochs 1 --max-train 2048 --max-test 500 --data-dir $DATA
    run python3 -m experiments.bench --arch lenet_bn --windows 2 --steps 3 --data-dir $DATA --jsonl $jsonl ;;
  *) echo "unknown stage $stage" ;;
esac
done
pack
