#!/usr/bin/env bash
# The NF4 kernels' GPU checks in one device call (branch wip/nf4-mma): their CUDA tests, the microbenchmark with the
# configuration sweep, then ours' ADL decoding alone.
#
#   OUT=/some/dir bash benchmarks/check_nf4_gpu.sh        # carry .whl and .bench
#
# Writes $OUT/pytest.txt, $OUT/nf4_matmul.json, $OUT/decode_ours.json and the whole output in $OUT/log.txt.
. "$(dirname "$0")/gpu_setup.sh"
export PYTHONUNBUFFERED=1
status=0
exec > >(tee "$OUT/log.txt") 2>&1
timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "nf4 or projection_groups or decode" \
    > "$OUT/pytest.txt" 2>&1 || status=1
grep -E "passed|failed|^FAILED" "$OUT/pytest.txt" | head -20
timeout 200 "$PYTHON" benchmarks/bench_nf4_matmul.py --rows 1,3,8,24,32 --sweep --out "$OUT/nf4_matmul.json" \
    2>&1 | grep -E "per token|failed" || status=1
timeout 150 "$PYTHON" benchmarks/bench_generate.py --workload adl --impls ours --lengths .bench/train_llama2_lengths.json \
    --workdir "$WORKDIR" --out "$OUT/decode_ours.json" 2>&1 | grep -E "tokens|peak|Error" || status=1
exit $status
