#!/usr/bin/env bash
# Offline SFT demo on synthetic speech (no downloads): corpus -> held-out WER of the untrained model ->
# SFT of a small model built in-process -> held-out WER after training -> export in both layouts.
#
# Usage: recipes/demo_sft/run.sh [--stage N] [--stop-stage M] [--steps S]
# All outputs go under exp/demo_sft/ (delete it to start over). Stages skip themselves once done.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${DEMO_STEPS:-1200}; exp=exp/demo_sft
. recipes/common.sh "$@"

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic English speech (espeak-ng): 2000 train / 100 held-out clips of 1-4 words from a 24-word vocabulary"
  $PY data_tools/make_synthetic_corpus.py $exp/corpus --languages en --num-train 2000 --num-test 100 \
    --vocabulary-size 24 --min-words 1 --max-words 4 --seed 0 --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && [ ! -f $exp/sft/.done ]; then
  log "Stage 1: SFT of a ~0.6M-parameter Qwen3-ASR (model=small, random init) for $steps steps"
  rm -rf $exp/sft
  $PY -m qwen3asr_train experiment=demo_sft trainer.max_steps=$steps evaluation.every_n_steps=$((steps / 2))
  touch $exp/sft/.done
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: decode the held-out set with the untrained and the trained model"
  $PY -m qwen3asr_train experiment=demo_sft_eval recipe.model_path=$exp/sft/model_init hydra.run.dir=$exp/eval_before
  $PY -m qwen3asr_train experiment=demo_sft_eval
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: export the trained checkpoint in both layouts (transformers-native and original thinker)"
  $PY -m qwen3asr_train experiment=demo_sft_export
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  $PY recipes/demo_sft/compare.py $exp
fi
