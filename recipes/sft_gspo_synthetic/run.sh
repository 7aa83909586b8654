#!/usr/bin/env bash
# The paper's last two stages on synthetic speech: SFT, then GSPO with WER rewards on a data mix
# (speech + "functional" no-speech clips), then held-out evaluation of both.
#
# Usage: recipes/sft_gspo_synthetic/run.sh [--stage N] [--stop-stage M]
# All outputs go under exp/sft_gspo_synthetic/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
stage=0; stop_stage=100; sft_steps=${SFT_STEPS:-1200}; gspo_steps=${GSPO_STEPS:-200}; exp=exp/sft_gspo_synthetic
while [ $# -gt 0 ]; do
  case $1 in
    --stage) stage=$2; shift 2;; --stop-stage) stop_stage=$2; shift 2;;
    *) echo "unknown option $1"; exit 2;;
  esac
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p $exp
log() { echo "[$(date +%H:%M:%S)] $*"; }

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic speech (1-4 words, 24-word vocabulary) + 300 no-speech clips"
  $PY data_tools/make_synthetic_corpus.py $exp/corpus --languages en --num-train 2000 --num-test 100 \
    --vocabulary-size 24 --min-words 1 --max-words 4 --num-no-speech 300 --seed 0 --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && [ ! -f $exp/sft/.done ]; then
  log "Stage 1: SFT (model=small from scratch, 10% no-speech rows)"
  rm -rf $exp/sft
  $PY -m qwen3asr_train recipe=sft model=small data.train=$exp/corpus/train.jsonl \
    data.max_batch_seconds=60 data.num_workers=1 trainer=cpu trainer.max_steps=$sft_steps \
    trainer.log_every_n_steps=50 trainer.enable_progress_bar=false recipe.optim.lr=3e-3 \
    recipe.optim.warmup_steps=50 recipe.optim.schedule=constant recipe.ctc_weight=0.5 recipe.no_speech_prob=0.1 \
    hydra.run.dir=$exp/sft
  touch $exp/sft/.done
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ] && [ ! -f $exp/gspo/.done ]; then
  log "Stage 2: GSPO from the SFT export; mix 70% speech / 30% functional (no-speech)"
  rm -rf $exp/gspo
  $PY -m qwen3asr_train recipe=gspo model=checkpoint model.path=$exp/sft/export \
    +recipe.mix.speech.manifests=$exp/corpus/train.jsonl +recipe.mix.speech.weight=70 \
    +recipe.mix.functional.manifests=$exp/corpus/no_speech.jsonl +recipe.mix.functional.weight=30 \
    recipe.group_size=8 recipe.rollout_batch_size=8 recipe.steps_per_generation=4 recipe.optim.lr=1e-5 \
    trainer=cpu trainer.max_steps=$gspo_steps trainer.checkpoint_every_n_steps=100 trainer.log_every_n_steps=4 \
    trainer.enable_progress_bar=false data.num_workers=1 hydra.run.dir=$exp/gspo
  touch $exp/gspo/.done
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: held-out evaluation after SFT and after GSPO"
  for model in sft gspo; do
    $PY -m qwen3asr_train recipe=eval recipe.model_path=$exp/$model/export \
      +recipe.sets.heldout=$exp/corpus/test.jsonl +recipe.sets.nospeech=$exp/corpus/no_speech.jsonl \
      hydra.run.dir=$exp/eval_$model
    echo "after $model:"; cat $exp/eval_$model/summary.md
  done
fi
