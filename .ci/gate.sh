#!/usr/bin/env bash
# The performance gate, for real: the tiny preset on CPU against the committed baseline, on metrics
# that are stable on a noisy 2-core machine (tokens per scheduler step, prefix-cache hit rate and
# preemptions are deterministic for a seeded workload and are decided by their change alone;
# throughput, the one noisy metric, with a wide tolerance and the exact Mann-Whitney test: 5 repeats
# against the baseline's 3 give it a smallest p of 1/56, below alpha = 0.05, where 3 against 3 sat
# exactly on it; tests/test_gate.py plants regressions at this repeat count).
# Refresh the baseline after an intended change: .ci/gate.sh --update-baseline
set -euo pipefail
cd "$(dirname "$0")/.."
bench="workbench bench throughput --model tiny --num-prompts 48 --input-len 48 --output-len 24 \
 --dataset prefix-repeat --prefix-len 64 --num-prefixes 4 --enable-prefix-caching --max-num-seqs 16 \
 --max-num-batched-tokens 256 --num-gpu-blocks-override 48 --max-model-len 512 --device cpu --output-json {output}"
workbench gate --run "$bench" --repeats 5 --baseline reports/benchmarks/ci-gate-baseline.json \
  --metric tokens_per_step:-2% --metric prefix_cache_hit_rate:-0.02 --metric num_preemptions:+2 \
  --metric output_throughput:-60% --summary results/gate-summary.md "$@"
