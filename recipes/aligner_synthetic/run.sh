#!/usr/bin/env bash
# Forced-aligner training on synthetic speech, the way it runs on real data:
# word times -> TextGrids (here written from the synthetic truth, in place of `mfa align`) -> manifests
# (the TextGrid import users run on MFA output) -> aligner training from scratch -> AAS evaluation
# (model and the no-model energy baseline) on held-out data.
#
# Usage: recipes/aligner_synthetic/run.sh [--stage N] [--stop-stage M] [--steps S] [--num-train N]
# All outputs go under exp/aligner_synthetic/ (delete it to start over). The same recipe on a second corpus made
# with other settings: run_second_corpus.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${ALIGNER_STEPS:-2500}; num_train=${ALIGNER_NUM_TRAIN:-8000}; exp=exp/aligner_synthetic
. recipes/common.sh "$@"
# Keep freed tensor memory in the heap instead of returning it to the kernel after every step: with
# glibc's defaults the variable-length batches cost 60-200 s of system CPU time per 3000 steps, ~5 s with these.
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic English speech with word times ($num_train train / 100 held-out clips, 4-10 words)"
  $PY data_tools/make_synthetic_corpus.py $exp/corpus --languages en --num-train $num_train --num-test 100 \
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
  log "Stage 2: 30 s evaluation clips joined from the held-out clips (long-form accuracy)"
  $PY recipes/aligner_synthetic/make_long_set.py $exp/manifests/test.jsonl $exp/long --max-seconds 30 --num-classes 375
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ] && [ ! -f $exp/train/.done ]; then
  log "Stage 3: train a small aligner from scratch ($steps steps, 30 s of 80 ms bins, short clips + 3 s windows)"
  rm -rf $exp/train
  # configs/experiment/aligner_synthetic.yaml: every word slotted, Gaussian soft targets, cosine decay, partial
  # transcripts and 3 s windows cut from joined clips, audio-token clock loss, attention supervision; evaluated
  # every 1,250 steps with 3 s chained windows. Another seed: add seed=N (docs/results.md).
  TIMEFORMAT="training CPU time: %U s user + %S s system (%R s wall)"
  time $PY -m qwen3asr_train experiment=aligner_synthetic trainer.max_steps=$steps
  touch $exp/train/.done
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: AAS of the untrained and the trained aligner on held-out data (+ energy baseline)"
  $PY -m qwen3asr_train experiment=aligner_synthetic_eval recipe.model_path=$exp/train/model_init hydra.run.dir=$exp/eval_before
  $PY -m qwen3asr_train experiment=aligner_synthetic_eval
  echo "before training:"; cat $exp/eval_before/alignment_summary.md
  echo "after training:";  cat $exp/eval_after/alignment_summary.md
fi
