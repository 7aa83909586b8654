#!/usr/bin/env bash
# Multilingual aligner set: English, German, French, Chinese (qwen3asr-data synth) + Japanese
# (recipes/aligner_synthetic/make_japanese.py), trained and evaluated with the default word-unit policy.
# Usage: recipes/aligner_synthetic/run_multilingual.sh [--stage N] [--stop-stage M] [--steps S]
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${ALIGNER_STEPS:-1000}; num_train=1600; exp=exp/aligner_multi
. recipes/common.sh "$@"
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic en/de/fr/zh ($num_train train / 160 held-out) and Japanese (400 / 40) with word times"
  $PY data_tools/make_synthetic_corpus.py $exp/eu_zh --languages en de fr zh --num-train $num_train --num-test 160 \
    --min-words 4 --max-words 10 --seed 3 --workers 2
  $PY recipes/aligner_synthetic/make_japanese.py $exp/ja --num-train 400 --num-test 40
  for split in train test; do cat $exp/eu_zh/$split.jsonl $exp/ja/$split.jsonl > $exp/$split.jsonl; done
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: train from scratch ($steps steps), default word-unit policy; per-language AAS and unit counts"
  rm -rf $exp/train
  TIMEFORMAT="training CPU time: %U s user + %S s system (%R s wall)"
  time $PY -m qwen3asr_train experiment=aligner_multilingual trainer.max_steps=$steps
  cat $exp/train/unit_policy.json
  cat "$(ls -d $exp/train/eval/step-* | tail -1)/alignment_summary.md"
fi
