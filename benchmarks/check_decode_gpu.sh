#!/usr/bin/env bash
# The decoding GPU checks in one call: the CUDA tests (tests/test_cuda.py, whole), the NF4 kernels' microbenchmark,
# and the ADL decoding benchmark (ours vs transformers + peft + bitsandbytes) at Llama-2-7B's shape with random
# weights.
#
#   OUT=/some/dir bash benchmarks/check_decode_gpu.sh [tests] [nf4] [adl]   # tests and nf4 when none is named
#
# Writes $OUT/pytest.txt, $OUT/nf4_matmul.json, $OUT/decode.json and the whole output in $OUT/log.txt.
# Needs the ADL prompt lengths: $LENGTHS, or .bench/train_llama2_lengths.json (carry .bench), or
# ../shared/data/adl-hw3/train_llama2_lengths.json. Installs .whl/*.whl first if .whl/ exists (carry .whl).
# Settings: LAYERS (32), PRESET (llama-2-7b), WORKDIR (/tmp/qlora_bench), PYTHON (python3), ADL_ARGS (more flags for
# bench_generate.py, e.g. "--hf-job-prompts 16"). Stages have time limits (tests 240 s, nf4 120 s, adl what is left
# of BUDGET, default 580 s), so the whole call ends within the device tool's 10 minutes.
BUDGET=${BUDGET:-580}
. "$(dirname "$0")/gpu_setup.sh"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests nf4)
LENGTHS=${LENGTHS:-}
for f in .bench/train_llama2_lengths.json ../shared/data/adl-hw3/train_llama2_lengths.json; do
  [ -z "$LENGTHS" ] && [ -f "$f" ] && LENGTHS=$f
done
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  "$PYTHON" -c 'import torch, triton, transformers, peft, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)'
  echo "git $(git rev-parse HEAD 2>/dev/null) lengths ${LENGTHS:-missing}"
} 2>&1 | tee "$OUT/log.txt"
status=0
start=$(date +%s)
for stage in "${stages[@]}"; do
  SECONDS=0
  case $stage in
    tests)
      timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt" \
        | tail -15 | tee -a "$OUT/log.txt"
      summary=$(tail -1 "$OUT/pytest.txt")  # pytest's last line: "N passed, ..." or "N failed, M passed, ..."
      [[ $summary == *passed* && $summary != *failed* && $summary != *error* ]] || status=1 ;;
    nf4)
      timeout 120 "$PYTHON" benchmarks/bench_nf4_matmul.py --rows 1,2,3,8,24 --out "$OUT/nf4_matmul.json" 2>&1 \
        | grep -E "per token|failed|Error" | tee -a "$OUT/log.txt" || status=1 ;;
    adl)
      [ -n "$LENGTHS" ] || { echo "no ADL lengths file (set LENGTHS or carry .bench)" | tee -a "$OUT/log.txt"; status=1; continue; }
      left=$((BUDGET - ($(date +%s) - start)))
      timeout "$left" "$PYTHON" -u benchmarks/bench_generate.py --workload adl --preset "$PRESET" --layers "$LAYERS" \
        --workdir "$WORKDIR" --lengths "$LENGTHS" --out "$OUT/decode.json" ${ADL_ARGS:-} 2>&1 \
        | tee -a "$OUT/log.txt" || status=1 ;;
    *) echo "unknown stage $stage (tests, nf4, adl)"; exit 2 ;;
  esac
  echo "$stage took $SECONDS s (status so far $status)" | tee -a "$OUT/log.txt"
done
exit $status
