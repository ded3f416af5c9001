#!/usr/bin/env bash
# Trains the small defaults shipped in tokenflow_cli/assets/ (used when --model is not given) on
# the 32 px toy world (issue 12), evaluates them with the CLI on held-out sets, and with SHIP=1
# copies them into the package:
#   toy-tokenizer.safetensors  recipe shapes-toy     (130 tokens x 9 bits = 146 bytes per image)
#   toy-generator/             recipe generator-toy  (on the toy tokenizer's codes of the shapes world)
#   toy-llava/                 recipe llava-toy      (64 tokenflow visual tokens, a 4-layer LM)
#   teacher-tiny.safetensors   recipe teacher-tiny   (kept as shipped unless TRAIN_TEACHER=1)
#
#   scripts/build_defaults.sh [OUT_DIR]      # default build/defaults
#   env: TOKENIZER_STEPS GENERATOR_STEPS LLAVA_STEPS LLAVA_STAGE1_STEPS N_SHAPES N_NATURAL DEVICE
#        PARALLEL=1 (train the generator and the LLaVA side by side, one thread each) SHIP=1
#
# Resumable: every data step is skipped when its output exists, and every training resumes
# from its run folder's last checkpoint, so rerunning after an interruption continues.
# Budget on the 2-core CPU machine (bf16 autocast): tokenizer 6000 steps ~35 min, generator
# 7000 steps ~45 min, LLaVA 300 + 3000 steps ~45 min (the last two side by side ~80 min).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-build/defaults}" && cd "${1:-build/defaults}" && pwd)
TF=${TF:-$PWD/.venv/bin/tokenflow}
DEVICE=${DEVICE:-auto}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log() { echo "[$(date +%H:%M:%S)] $*"; }

# ---- data: train, validation (checkpoint choice) and test (reported figures) worlds -------------
[ -f "$OUT/shapes/llava.json" ] || $TF data shapes -n "${N_SHAPES:-20000}" --size 32 --seed 0 --llava -o "$OUT/shapes"
[ -f "$OUT/shapes-val/llava.json" ] || $TF data shapes -n 400 --size 32 --seed 1 --llava -o "$OUT/shapes-val"
[ -f "$OUT/shapes-test/vqa.jsonl" ] || $TF data shapes -n 600 --size 32 --seed 2 -o "$OUT/shapes-test"
[ -f "$OUT/natural/captions.jsonl" ] || $TF data natural -n "${N_NATURAL:-6000}" --size 32 --split train -o "$OUT/natural"
[ -f "$OUT/natural-val/captions.jsonl" ] || $TF data natural -n 200 --size 32 --split val --seed 1 -o "$OUT/natural-val"
{ ls "$OUT"/shapes/images/*.png; ls "$OUT"/natural/images/*.png; } > "$OUT/train.txt"
{ ls "$OUT"/shapes-val/images/*.png; ls "$OUT"/natural-val/images/*.png | head -100; } > "$OUT/val.txt"

# ---- teacher -------------------------------------------------------------------------------------
TEACHER=teacher-tiny  # the shipped one (tokenflow_cli/assets/teacher-tiny.safetensors)
if [ "${TRAIN_TEACHER:-0}" = 1 ]; then
  log "teacher"
  $TF train-teacher teacher-tiny -o "$OUT/teacher" --no-publish --device "$DEVICE" \
    --set data.captions="$OUT/shapes/captions.jsonl" --set train.steps="${TEACHER_STEPS:-1500}"
  TEACHER="$OUT/teacher/model.safetensors"
fi

# ---- tokenizer -----------------------------------------------------------------------------------
log "tokenizer (shapes-toy)"
$TF train-tokenizer shapes-toy -o "$OUT/tokenizer" --device "$DEVICE" \
  --set data.train="$OUT/train.txt" --set data.val="$OUT/val.txt" --set data.val_limit=500 \
  --set model.teacher.pretrained="$TEACHER" --set model.semantic_encoder.pretrained="$TEACHER" \
  --set train.steps="${TOKENIZER_STEPS:-6000}" --set train.eval_every=1000 --set train.checkpoint_every=250

[ -f "$OUT/shapes_codes.npz" ] || $TF tokenize "$OUT/shapes/images" -o "$OUT/shapes_codes.npz" \
  --model "$OUT/tokenizer" --device "$DEVICE"

# ---- generator and understanding model (both read the tokenizer) ---------------------------------
generator() {
  $TF train-generator generator-toy -o "$OUT/generator" --device "$DEVICE" \
    --set data.codes="$OUT/shapes_codes.npz" --set data.captions="$OUT/shapes/captions.jsonl" \
    --set data.tokenizer="$OUT/tokenizer" --set train.steps="${GENERATOR_STEPS:-7000}" \
    --set train.checkpoint_every=250
}
llava() {
  local common=(--device "$DEVICE" --set model.tokenizer="$OUT/tokenizer/model.safetensors"
    --set data.train="$OUT/shapes/llava.json" --set data.val="$OUT/shapes-val/llava.json"
    --set eval.data="$OUT/shapes-test/vqa.jsonl")
  $TF finetune-llava llava-toy --stage 1 -o "$OUT/llava-stage1" "${common[@]}" \
    --set stage1.steps="${LLAVA_STAGE1_STEPS:-300}"
  $TF finetune-llava llava-toy --stage 2 -o "$OUT/llava" --init "$OUT/llava-stage1" "${common[@]}" \
    --set train.steps="${LLAVA_STEPS:-3000}"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  log "generator and llava side by side (one thread each)"
  OMP_NUM_THREADS=1 generator > "$OUT/generator.log" 2>&1 &
  gen_pid=$!
  OMP_NUM_THREADS=1 llava > "$OUT/llava.log" 2>&1
  wait "$gen_pid"
else
  log "generator (generator-toy)"; generator
  log "llava (llava-toy)"; llava
fi

# ---- held-out figures, by the CLI ----------------------------------------------------------------
log "evaluation"; mkdir -p "$OUT/eval"
$TF eval geneval --model "$OUT/generator" -o "$OUT/eval/geneval" --per-tag 20 --samples 4 --device "$DEVICE" \
  | tee "$OUT/eval/geneval.txt"
$TF eval vqa --data "$OUT/shapes-test/vqa.jsonl" --model "$OUT/llava" -o "$OUT/eval/vqa" --device "$DEVICE" \
  | tee "$OUT/eval/vqa.txt"
$TF eval rfid --model "$OUT/tokenizer" --data "$OUT/shapes-test/images" --res 32 -o "$OUT/eval/rfid-shapes" --no-lpips \
  --device "$DEVICE" | tee "$OUT/eval/rfid-shapes.txt"
.venv/bin/python benchmarks/codec_baseline.py --model "$OUT/tokenizer" --data "$OUT/natural-val/images" \
  -o "$OUT/eval/codec" --json "$OUT/eval/codec_baseline.json" | tee "$OUT/eval/codec.txt"

if [ "${SHIP:-0}" = 1 ]; then
  log "shipping into tokenflow_cli/assets"
  .venv/bin/python scripts/ship_defaults.py "$OUT"
fi
log "defaults built in $OUT"
