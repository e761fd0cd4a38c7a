#!/usr/bin/env bash
# Issue 18's GPU checks in one call: the CUDA tests, then the training benchmarks, each stage with a time limit.
#
#   OUT=/some/dir bash benchmarks/check_train_gpu.sh [tests] [smol] [seed] [long] [real]     # tests smol seed if none
#
# tests: tests/test_cuda.py (all of it) into $OUT/pytest.txt. smol: the seed's job at SmolLM2-135M's shape, random
# weights, ours with and without CUDA graphs ($OUT/smol.json). seed: the seed's job at Llama-2-7B's shape, ours,
# hf-seed and hf-best ($OUT/seed_job.json). long: one 7B record of 8k, 32k and 64k tokens, ours and hf, and the two
# attention kernels alone ($OUT/long_seq.json). real: the real SmolLM2-135M GGUF ($GGUF) on ADL's train.json
# ($OUT/real_model_job.json). 70b: the seed's job at Llama-2-70B's shape, ours alone on a random NF4 base built on the
# GPU (no checkpoint), with a memory profile ($OUT/scale_70b.json, $OUT/memory_70b/); 13b: ours, hf-seed and hf-best
# at Llama-2-13B's shape from a written checkpoint ($OUT/scale_13b.json); both merge into $OUT/scale.json
# (benchmarks/scale_results.py). Needs .bench/ (carry it): train_llama2_lengths.json and, for real, train.json; and
# .whl/ (bitsandbytes). Settings: BUDGET (580 s for the call), WORKDIR, PYTHON, SEED_ARGS / SMOL_ARGS / LONG_ARGS /
# REAL_ARGS / SCALE_ARGS (more flags for bench_train.py).
BUDGET=${BUDGET:-580}
. "$(dirname "$0")/gpu_setup.sh"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests smol seed)
B="benchmarks/bench_train.py --workdir $WORKDIR --lengths .bench/train_llama2_lengths.json"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  "$PYTHON" -c 'import torch, triton, transformers, peft, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)'
} 2>&1 | tee "$OUT/log.txt"
status=0
start=$(date +%s)
for stage in "${stages[@]}"; do
  SECONDS=0
  left=$((BUDGET - ($(date +%s) - start)))
  case $stage in
    tests) cmd=("$PYTHON" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py) ;;
    smol) cmd=("$PYTHON" -u $B --workload adl --preset smollm2-135m --impls ours --warmup-steps 4 --steps 8
               --out "$OUT/smol.json" ${SMOL_ARGS:-}) ;;
    seed) cmd=("$PYTHON" -u $B --workload adl --preset llama-2-7b --warmup-steps 4 --steps 6
               --out "$OUT/seed_job.json" ${SEED_ARGS:-}) ;;
    long) cmd=("$PYTHON" -u $B --workload long --preset llama-2-7b --steps 2 --out "$OUT/long_seq.json" ${LONG_ARGS:-}) ;;
    real) cmd=("$PYTHON" -u $B --workload adl --model "${GGUF:?set GGUF}" --data .bench/train.json --warmup-steps 4
               --steps 10 --out "$OUT/real_model_job.json" ${REAL_ARGS:-}) ;;
    70b) cmd=("$PYTHON" -u $B --workload adl --preset llama-2-70b --impls ours --warmup-steps 2 --steps 3
              --memory-profile "$OUT/memory_70b" --out "$OUT/scale_70b.json" ${SCALE_ARGS:-}) ;;
    13b) cmd=("$PYTHON" -u $B --workload adl --preset llama-2-13b --warmup-steps 3 --steps 3
              --out "$OUT/scale_13b.json" ${SCALE_ARGS:-}) ;;
    *) echo "unknown stage $stage (tests, smol, seed, long, real, 70b, 13b)"; exit 2 ;;
  esac
  timeout "$left" "${cmd[@]}" 2>&1 | tee -a "$OUT/log.txt" || status=1
  [ "$stage" = tests ] && grep -E "passed|failed" "$OUT/log.txt" | tail -1 > "$OUT/pytest.txt"
  echo "$stage took $SECONDS s (status so far $status)" | tee -a "$OUT/log.txt"
done
scale=()
for f in "$OUT/scale_70b.json" "$OUT/scale_13b.json"; do [ -f "$f" ] && scale+=("$f"); done
[ ${#scale[@]} -gt 0 ] && "$PYTHON" benchmarks/scale_results.py "${scale[@]}" --out "$OUT/scale.json" | tee -a "$OUT/log.txt"
exit $status
