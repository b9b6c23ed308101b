#!/usr/bin/env bash
# Reproduces the README's demo and benchmark tables, one run at a time:
#
#   benchmarks/reproduce.sh [OUT] [extra demo/benchmark flags, e.g. --device gpu]
#
# 1. the learning-rate sweeps on held-out splits of the training sets (one
#    seed, the grids in mac_optax/demo/cli.py), 2. the demo at its default
#    learning rates with 3 seeds, 3. the cost benchmark with time to target.
# Every table goes to OUT/*.md (default OUT: mac_optax_results). Hours on a
# 2-core CPU; minutes on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-mac_optax_results}"
shift || true
mkdir -p "$out/sweep" "$out/demo"

for model in vit cnn gpt bert; do
  python -m mac_optax.demo --model "$model" --sweep --no-progress \
    --out "$out/sweep" "$@" | tee "$out/sweep_$model.md"
done
for model in vit cnn gpt bert; do
  python -m mac_optax.demo --model "$model" --seeds 3 --no-progress \
    --out "$out/demo" "$@" | tee "$out/demo_$model.md"
done
python -m benchmarks.cost --demo-results "$out/demo" "$@" | tee "$out/cost.md"
