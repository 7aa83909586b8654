#!/usr/bin/env bash
# The paper's last two stages on synthetic speech: SFT, then GSPO with WER rewards on a data mix
# (speech + "functional" no-speech clips), then held-out evaluation of both.
#
# Usage: recipes/sft_gspo_synthetic/run.sh [--stage N] [--stop-stage M]
# All outputs go under exp/sft_gspo_synthetic/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/../.."
sft_steps=${SFT_STEPS:-1200}; gspo_steps=${GSPO_STEPS:-200}; exp=exp/sft_gspo_synthetic
. recipes/common.sh "$@"

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic speech (1-4 words, 24-word vocabulary) + 300 no-speech clips"
  $PY data_tools/make_synthetic_corpus.py $exp/corpus --languages en --num-train 2000 --num-test 100 \
    --vocabulary-size 24 --min-words 1 --max-words 4 --num-no-speech 300 --seed 0 --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && [ ! -f $exp/sft/.done ]; then
  log "Stage 1: SFT (model=small from scratch, 10% no-speech rows)"
  rm -rf $exp/sft
  $PY -m qwen3asr_train experiment=sft_gspo_synthetic_sft trainer.max_steps=$sft_steps
  touch $exp/sft/.done
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ] && [ ! -f $exp/gspo/.done ]; then
  log "Stage 2: GSPO from the SFT export; mix 70% speech / 30% functional (no-speech)"
  rm -rf $exp/gspo
  $PY -m qwen3asr_train experiment=sft_gspo_synthetic_gspo trainer.max_steps=$gspo_steps
  touch $exp/gspo/.done
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: held-out evaluation after SFT and after GSPO"
  for model in sft gspo; do
    $PY -m qwen3asr_train experiment=sft_gspo_synthetic_eval recipe.model_path=$exp/$model/export hydra.run.dir=$exp/eval_$model
    echo "after $model:"; cat $exp/eval_$model/summary.md
  done
fi
