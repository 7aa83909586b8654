#!/usr/bin/env bash
# The synthetic aligner recipe (run.sh: same model, training settings and evaluation) on a second corpus made
# with other settings, to check that its result is not a property of one corpus: another seed, 3-14 instead of
# 4-10 words per clip, speaking rates 110-190 instead of 130-210 words per minute, only the default and female
# voice variants (the seven male variants are held out and never used), sentence case with punctuation (espeak
# pauses at commas and full stops) and background noise at 25-40 dB SNR. 8,000 train / 100 held-out clips as
# run.sh (generated in about 4 minutes on 2 cores; docs/results.md).
# Usage: recipes/aligner_synthetic/run_second_corpus.sh [--stage N] [--stop-stage M] [--steps S] [--num-train N]
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${ALIGNER_STEPS:-2500}; num_train=${ALIGNER_NUM_TRAIN:-8000}; exp=exp/aligner_synthetic2
. recipes/common.sh "$@"
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: second synthetic English corpus ($num_train train / 100 held-out clips, other voices/rates/lengths)"
  $PY data_tools/make_synthetic_corpus.py $exp/corpus --languages en --num-train $num_train --num-test 100 \
    --seed 2 --min-words 3 --max-words 14 --rate-range 110 190 --heldout-voices +m1 +m2 +m3 +m4 +m5 +m6 +m7 \
    --cased --snr-db 25 40 --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: word times -> MFA-style corpus + TextGrids -> aligner manifests; 30 s held-out clips"
  for split in train test; do
    $PY data_tools/manifest_to_mfa_layout.py $exp/corpus/$split.jsonl \
      --corpus-dir $exp/mfa/$split/corpus --alignments-dir $exp/mfa/$split/aligned
    $PY data_tools/textgrid_to_manifest.py --corpus-dir $exp/mfa/$split/corpus \
      --alignments-dir $exp/mfa/$split/aligned --language English --out $exp/manifests/$split.jsonl
  done
  $PY recipes/aligner_synthetic/make_long_set.py $exp/manifests/test.jsonl $exp/long --max-seconds 30 --num-classes 375
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ] && [ ! -f $exp/train/.done ]; then
  log "Stage 2: train the recipe's aligner from scratch on it ($steps steps)"
  rm -rf $exp/train
  TIMEFORMAT="training CPU time: %U s user + %S s system (%R s wall)"
  time $PY -m qwen3asr_train experiment=aligner_synthetic trainer.max_steps=$steps \
    data.train=$exp/manifests/train.jsonl evaluation.sets.heldout=$exp/manifests/test.jsonl \
    evaluation.sets.heldout_long=$exp/long/long.jsonl hydra.run.dir=$exp/train
  touch $exp/train/.done
  cat "$(ls -d $exp/train/eval/step-* | tail -1)/alignment_summary.md"
fi
