#!/usr/bin/env bash
# The decoding GPU checks in one call, by stage:
#   tests  the CUDA tests (tests/test_cuda.py, whole, or those pytest -k TESTS_K selects)   -> $OUT/pytest.txt
#   nf4    the NF4 kernels' microbenchmark at their default configurations                  -> $OUT/nf4_matmul.json
#   sweep  the same with every configuration (nf4_matmul's tiles, nf4_mma's tiles a warp x K splits), 1-24 rows
#                                                                                           -> $OUT/nf4_sweep.json
#   adl    the ADL decoding benchmark, ours vs transformers + peft + bitsandbytes           -> $OUT/decode.json
#   ab     ours alone on the ADL benchmark (a shorter job, JOB_PROMPTS), as it is and under each variant
#          in AB_VARIANTS (module constants), on one model in one process, AB_ROUNDS times (2: A B B A), without
#          equal_eager
#                                                                                           -> $OUT/decode_ab.json
#   real   ours' fast path against its eager one on SmolLM2-135M's real weights and real text (equal_eager; the
#          prompts are qlora_core/default_data/eval.jsonl's instructions in the ADL template), as it is and under
#          REAL_VARIANTS (default: AB_VARIANTS' last); the GGUF is $GGUF, or
#          /root/parts/part.aa (an earlier call's) + .big/part.ab (this call's; ../shared/README.md)
#                                                                                           -> $OUT/decode_real.json
#   ncu    each NF4 decode kernel once under Nsight Compute (benchmarks/ncu_nf4.py: throughput, occupancy, stalls,
#          shared-memory bank conflicts, stall samples an instruction)     -> $OUT/ncu.txt, ncu_sass.csv, nf4.ncu-rep
# All but real run at Llama-2-7B's shape (PRESET) with random weights.
#
#   OUT=/some/dir bash benchmarks/check_decode_gpu.sh [tests] [nf4] [sweep] [adl] [ab] [real]   # tests nf4 if none
#
# The whole output goes to $OUT/log.txt. Needs the ADL prompt lengths: $LENGTHS, or .bench/train_llama2_lengths.json
# (carry .bench), or ../shared/data/adl-hw3/train_llama2_lengths.json. Installs .whl/*.whl first if .whl/ exists
# (carry .whl; real needs the gguf wheel there: ../shared/tools/device-wheels.sh gguf==0.19.0). Settings: LAYERS (32),
# PRESET (llama-2-7b), WORKDIR (/tmp/qlora_bench), PYTHON (python3), ADL_ARGS (more flags for bench_generate.py in adl,
# ab and real, e.g. "--hf-job-prompts 16"). Stages have time limits (tests 330 s, nf4 120 s, sweep 300 s, real 210 s;
# adl and ab what is left of BUDGET, default 580 s), so the whole call ends within the device tool's 10 minutes.
BUDGET=${BUDGET:-580}
JOB_PROMPTS=${JOB_PROMPTS:-64}  # 8 batches. ab leaves out equal_eager (--skip-eager: with it a run of ours took about 2
# minutes on an H100, 2026-12-07, JOB_PROMPTS=16); agree_forced checks the first round's greedy tokens
AB_VARIANTS=${AB_VARIANTS:-}  # e.g. "qlora_core.generate.CACHE_BUCKET=64 qlora_core.generate.STOP_READ_LATE=False"
REAL_VARIANTS=${REAL_VARIANTS:-${AB_VARIANTS##*[[:space:]]}}  # the last
ab_flags=() real_flags=()
for v in $AB_VARIANTS; do ab_flags+=(--ab "$v"); done
for v in $REAL_VARIANTS; do real_flags+=(--ab "$v"); done
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
      timeout ${TESTS_S:-330} "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/pytest.txt" \
        | tail -15 | tee -a "$OUT/log.txt"
      summary=$(tail -1 "$OUT/pytest.txt")  # pytest's last line: "N passed, ..." or "N failed, M passed, ..."
      [[ $summary == *passed* && $summary != *failed* && $summary != *error* ]] || status=1 ;;
    nf4)
      timeout 120 "$PYTHON" benchmarks/bench_nf4_matmul.py --rows 1,2,3,8,24 --out "$OUT/nf4_matmul.json" 2>&1 \
        | grep -E "per token|failed|Error" | tee -a "$OUT/log.txt" || status=1 ;;
    sweep)
      timeout 300 "$PYTHON" benchmarks/bench_nf4_matmul.py --rows 1,2,3,8,24 --sweep --out "$OUT/nf4_sweep.json" 2>&1 \
        | grep -E "per token|failed|Error" | tee -a "$OUT/log.txt" || status=1 ;;
    adl|ab)
      [ -n "$LENGTHS" ] || { echo "no ADL lengths file (set LENGTHS or carry .bench)" | tee -a "$OUT/log.txt"; status=1; continue; }
      left=$((BUDGET - ($(date +%s) - start)))
      flags=(--out "$OUT/decode.json")
      [ "$stage" = ab ] && flags=(--impls ours --job-prompts "$JOB_PROMPTS" "${ab_flags[@]}"
        --ab-rounds "${AB_ROUNDS:-2}" --skip-eager --out "$OUT/decode_ab.json")
      timeout "$left" "$PYTHON" -u benchmarks/bench_generate.py --workload adl --preset "$PRESET" --layers "$LAYERS" \
        --workdir "$WORKDIR" --lengths "$LENGTHS" "${flags[@]}" ${ADL_ARGS:-} 2>&1 \
        | grep -v "tokens/s over\|^\[bench\] ours.*positions\|picks:" | tee -a "$OUT/log.txt" || status=1 ;;
    real)
      gguf=${GGUF:-/tmp/smollm2.gguf}
      [ -f "$gguf" ] || cat /root/parts/part.aa .big/part.ab > "$gguf" 2>/dev/null \
        || { echo "no SmolLM2 GGUF (set GGUF, or carry its two parts)" | tee -a "$OUT/log.txt"; status=1; continue; }
      timeout 60 "$PYTHON" -m qlora_core.convert "$gguf" /tmp/smollm2 2>&1 | tail -1 | tee -a "$OUT/log.txt" \
        && timeout 150 "$PYTHON" -u benchmarks/bench_generate.py --workload adl --model /tmp/smollm2 --impls ours \
          --lora-b-std 0.02 --modes greedy,beam3 --single-prompts 8 --text-prompts qlora_core/default_data/eval.jsonl \
          "${real_flags[@]}" \
          --out "$OUT/decode_real.json" ${ADL_ARGS:-} 2>&1 | grep -E "Error|error|^\| ours" | tee -a "$OUT/log.txt" \
        || status=1 ;;
    ncu)
      ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      [ -n "$ncu" ] || { echo "no ncu on this machine" | tee -a "$OUT/log.txt"; status=1; continue; }
      sections=(SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats MemoryWorkloadAnalysis
                MemoryWorkloadAnalysis_Tables InstructionStats SourceCounters)
      timeout 200 "$ncu" --profile-from-start off --clock-control none "${sections[@]/#/--section=}" \
          -o "$OUT/nf4" "$PYTHON" benchmarks/ncu_nf4.py 2>&1 | grep -v "^==PROF==" | tee -a "$OUT/log.txt"
      [ -f "$OUT/nf4.ncu-rep" ] || { status=1; continue; }
      "$ncu" --import "$OUT/nf4.ncu-rep" --page details --print-details all > "$OUT/ncu.txt" 2>&1 \
        || "$ncu" --import "$OUT/nf4.ncu-rep" --page details > "$OUT/ncu.txt" 2>&1 || status=1
      # each SASS instruction's stall samples (to find what the busiest pipe waits on); optional
      "$ncu" --import "$OUT/nf4.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu_sass.csv" 2>&1 || true ;;
    *) echo "unknown stage $stage (tests, nf4, sweep, adl, ab, real, ncu)"; exit 2 ;;
  esac
  echo "$stage took $SECONDS s (status so far $status)" | tee -a "$OUT/log.txt"
done
exit $status
