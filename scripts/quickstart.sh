#!/usr/bin/env bash
# The whole SALSA recipe on the embedded SmolLM2-135M-Instruct and the built-in task suite, on a CPU.
# Every step is an ordinary command a user could type; a step whose output exists is skipped, so a re-run
# resumes where the last one stopped. `make quickstart` runs this with the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=outputs/quickstart
export TOKENIZERS_PARALLELISM=false
# bf16 where the machine computes it fast (GPUs, CPUs with AVX512-BF16/AMX), float32 where torch would emulate it
# (~15x slower; e.g. AVX2-only CPUs): the configs ask for bf16, these overrides follow the hardware
read -r PRECISION DTYPE < <($PY -m salsa_lightning.hardware)
FIT=(--trainer.precision="$PRECISION")
# under bf16-mixed the RL stages' frozen base holds its Linear weights in bf16: the values autocast casts them to
# anyway, so the numbers do not change, with less memory and no per-forward cast (refused under float32)
RL=()
[ "$PRECISION" = bf16-mixed ] && RL=(--model.ppo.base_linears_bf16=true)
echo "== precision: training $PRECISION, generation $DTYPE"
START=$(date +%s)
declare -a TIMES=()

step() {  # step NAME OUTPUT_DIR COMMAND...
  local name=$1 out=$2; shift 2
  if [ -e "$out" ]; then
    echo "== $name: $out exists, skipping (delete it to redo this step)"
    TIMES+=("$name|skipped")
    return
  fi
  echo "== $name: $*"
  local t0=$(date +%s)
  "$@"
  local dt=$(( $(date +%s) - t0 ))
  echo "== $name done in ${dt}s"
  TIMES+=("$name|${dt}s")
}

step "task suite"   $OUT/data         $PY -m salsa_lightning data --config configs/quickstart/data.yaml
step "SFT seed 1"   $OUT/sft-seed1    $PY -m salsa_lightning fit --config configs/quickstart/sft.yaml --seed_everything 1 "${FIT[@]}"
step "SFT seed 2"   $OUT/sft-seed2    $PY -m salsa_lightning fit --config configs/quickstart/sft.yaml --seed_everything 2 "${FIT[@]}"
step "soup"         $OUT/soup         $PY -m salsa_lightning soup --config configs/quickstart/soup.yaml
step "reward model" $OUT/reward       $PY -m salsa_lightning fit --config configs/quickstart/reward.yaml "${FIT[@]}"
step "PPO"          $OUT/ppo          $PY -m salsa_lightning fit --config configs/quickstart/ppo.yaml "${FIT[@]}" "${RL[@]}"
step "SALSA"        $OUT/salsa        $PY -m salsa_lightning fit --config configs/quickstart/salsa.yaml "${FIT[@]}" "${RL[@]}"
if [ -f configs/quickstart/eval.yaml ]; then
  step "evaluate"   $OUT/eval         $PY -m salsa_lightning evaluate --config configs/quickstart/eval.yaml --dtype "$DTYPE"
fi

echo
echo "Step times:"
for t in "${TIMES[@]}"; do printf "  %-14s %s\n" "${t%%|*}" "${t##*|}"; done
echo "Total: $(( $(date +%s) - START ))s.  Outputs are under $OUT/."
