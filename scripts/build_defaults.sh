#!/usr/bin/env bash
# Trains the small default models shipped in tokenflow_cli/assets/ (used when --model is not
# given): a tiny CLIP teacher, the tiny tokenizer on shapes + natural crops, and the tiny
# generator on the tokenizer's codes of the shapes world. Same recipes as `make demo`, longer.
#   scripts/build_defaults.sh [OUT_DIR]    (env: TEACHER_STEPS TOKENIZER_STEPS GENERATOR_STEPS DEVICE)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/defaults}
TF=${TF:-.venv/bin/tokenflow}
DEVICE=${DEVICE:-auto}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
[ -f "$OUT/shapes/captions.jsonl" ] || $TF data shapes -n "${N_SHAPES:-4000}" -o "$OUT/shapes" --seed 0
[ -d "$OUT/natural/images" ] || $TF data natural -n "${N_NATURAL:-1500}" -o "$OUT/natural" --split train
(cd "$OUT" && { ls shapes/images/*.png; ls natural/images/*.png; } > train.txt)

$TF train-teacher teacher-tiny -o "$OUT/teacher" --no-publish --device "$DEVICE" \
  --set data.captions="$OUT/shapes/captions.jsonl" --set train.steps="${TEACHER_STEPS:-600}"

TEACHER="$OUT/teacher/model.safetensors"
$TF train-tokenizer tiny -o "$OUT/tokenizer" --device "$DEVICE" \
  --set data.train="$OUT/train.txt" \
  --set model.teacher.pretrained="$TEACHER" --set model.semantic_encoder.pretrained="$TEACHER" \
  --set train.steps="${TOKENIZER_STEPS:-1500}" --set train.eval_every=500 --set train.checkpoint_every=250

$TF tokenize "$OUT/shapes/images" -o "$OUT/shapes_codes.npz" --model "$OUT/tokenizer" --device "$DEVICE"
$TF train-generator generator-tiny -o "$OUT/generator" --device "$DEVICE" \
  --set data.codes="$OUT/shapes_codes.npz" --set data.captions="$OUT/shapes/captions.jsonl" \
  --set data.tokenizer="$OUT/tokenizer" --set train.steps="${GENERATOR_STEPS:-2000}"
echo "defaults built in $OUT"
