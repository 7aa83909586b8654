#!/usr/bin/env bash
# Forced-aligner training on synthetic speech, the way it runs on real data:
# word times -> TextGrids (here written from the synthetic truth, in place of `mfa align`) -> manifests
# (the TextGrid import users run on MFA output) -> aligner training from scratch -> AAS evaluation
# (model and the no-model energy baseline) on held-out data.
#
# Usage: recipes/aligner_synthetic/run.sh [--stage N] [--stop-stage M] [--steps S]
# All outputs go under exp/aligner_synthetic/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
stage=0; stop_stage=100; steps=${ALIGNER_STEPS:-3000}; exp=exp/aligner_synthetic
while [ $# -gt 0 ]; do
  case $1 in
    --stage) stage=$2; shift 2;; --stop-stage) stop_stage=$2; shift 2;; --steps) steps=$2; shift 2;;
    *) echo "unknown option $1"; exit 2;;
  esac
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p $exp
log() { echo "[$(date +%H:%M:%S)] $*"; }

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic English speech with word times (2000 train / 100 held-out clips, 4-10 words)"
  $PY data_tools/make_synthetic_corpus.py $exp/corpus --languages en --num-train 2000 --num-test 100 \
    --min-words 4 --max-words 10 --seed 1 --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: word times -> MFA-style corpus + TextGrids"
  for split in train test; do
    $PY data_tools/manifest_to_mfa_layout.py $exp/corpus/$split.jsonl \
      --corpus-dir $exp/mfa/$split/corpus --alignments-dir $exp/mfa/$split/aligned
  done
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: TextGrids -> aligner manifests (word units as the aligner segments them)"
  for split in train test; do
    $PY data_tools/textgrid_to_manifest.py --corpus-dir $exp/mfa/$split/corpus \
      --alignments-dir $exp/mfa/$split/aligned --language English --out $exp/manifests/$split.jsonl
  done
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ] && [ ! -f $exp/train/.done ]; then
  log "Stage 3: train a small aligner from scratch ($steps steps, 30 s of 80 ms bins)"
  rm -rf $exp/train
  $PY -m qwen3asr_train recipe=aligner model=small model.num_labels=375 \
    data.train=$exp/manifests/train.jsonl data.max_batch_seconds=60 data.num_workers=1 \
    trainer=cpu trainer.max_steps=$steps trainer.log_every_n_steps=50 trainer.checkpoint_every_n_steps=500 \
    trainer.enable_progress_bar=false recipe.optim.lr=1e-3 recipe.optim.warmup_steps=50 \
    recipe.optim.schedule=constant recipe.slot_prob=0.8 +evaluation.sets.heldout=$exp/manifests/test.jsonl \
    evaluation.every_n_steps=$((steps / 4)) hydra.run.dir=$exp/train
  touch $exp/train/.done
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: AAS of the untrained and the trained aligner on held-out data (+ energy baseline)"
  $PY -m qwen3asr_train recipe=eval recipe.model_path=$exp/train/model_init \
    +recipe.sets.heldout=$exp/manifests/test.jsonl hydra.run.dir=$exp/eval_before
  $PY -m qwen3asr_train recipe=eval recipe.model_path=$exp/train/export \
    +recipe.sets.heldout=$exp/manifests/test.jsonl hydra.run.dir=$exp/eval_after
  echo "before training:"; cat $exp/eval_before/alignment_summary.md
  echo "after training:";  cat $exp/eval_after/alignment_summary.md
fi
