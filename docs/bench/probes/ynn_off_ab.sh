#!/bin/bash
# A/B of XLA:CPU's YNNPACK fusions on JAX 0.10.2: "on" is the jaxlib default (XLA_FLAGS
# empty), "off" is --xla_cpu_experimental_ynn_fusion_type= . Alternating processes, two
# passes, JSON lines appended to $1. Run at commit f92e484: since the next commit,
# `import cnnjax` switches the fusions off itself when XLA_FLAGS does not name the flag.
cd "$(dirname "$0")/../../.."
out=${1:-/tmp/ynn_ab.jsonl}
bench() { # label flags args...
  local label=$1 flags=$2; shift 2
  XLA_FLAGS=$flags python -m experiments.bench "$@" 2>/dev/null | grep '^{' | python -c "
import sys, json
for l in sys.stdin:
    d = json.loads(l); d['xla_flags'] = '$flags'; d['pass_label'] = '$label'; print(json.dumps(d))" >> $out
}
for pass in 1 2; do
  for fl in "" "--xla_cpu_experimental_ynn_fusion_type="; do
    bench $pass "$fl" --arch lenet lenet_bn_scratch lenet_bn --windows 5 --steps 10
    bench $pass "$fl" --arch resnet18 --batch-size 64 --windows 3 --steps 3
    bench $pass "$fl" --arch googlenet densenet --batch-size 32 --windows 3 --steps 3
    bench $pass "$fl" --arch alexnet vgg11 nin --batch-size 16 --windows 3 --steps 3
  done
done
