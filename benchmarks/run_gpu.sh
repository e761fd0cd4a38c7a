#!/usr/bin/env bash
# The benchmark run on one GPU: a QLoRA training step and greedy decoding, ours against transformers + peft +
# bitsandbytes, at Llama-2-7B's shape with random weights. Results: $OUT/train.json, $OUT/generate.json,
# the whole output in $OUT/log.txt.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh [train] [generate]      # both when none is named
#
# Settings through the environment: LAYERS (decoder layers, default 32 = the full 7B), PRESET (llama-2-7b),
# WORKDIR (random checkpoint, default /tmp/qlora_bench; reused when already there), PYTHON (python3), and
# TRAIN_ARGS / GENERATE_ARGS (more flags for bench_train.py / bench_generate.py, e.g. "--steps 5").
# If .whl/ exists (../shared/tools/device-wheels.sh puts bitsandbytes there), its wheels are installed first.
. "$(dirname "$0")/gpu_setup.sh"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(train generate)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  "$PYTHON" -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)'
} 2>&1 | tee "$OUT/log.txt"
status=0
for stage in "${stages[@]}"; do
  case $stage in
    train) args=(--out "$OUT/train.json" ${TRAIN_ARGS:-}) ;;
    generate) args=(--out "$OUT/generate.json" ${GENERATE_ARGS:-}) ;;
    *) echo "unknown stage $stage (train, generate)"; exit 2 ;;
  esac
  SECONDS=0
  "$PYTHON" -u "benchmarks/bench_$stage.py" --preset "$PRESET" --layers "$LAYERS" --workdir "$WORKDIR" "${args[@]}" \
    2>&1 | tee -a "$OUT/log.txt" || status=1
  echo "$stage took $SECONDS s" | tee -a "$OUT/log.txt"
done
exit $status
