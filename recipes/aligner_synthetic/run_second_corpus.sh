#!/usr/bin/env bash
# The synthetic aligner recipe (run.sh) on a second corpus made with other settings, to check that its result
# is not a property of one corpus: another seed, 3-14 instead of 4-10 words per clip, speaking rates 110-190
# instead of 130-210 words per minute, only the default and female voice variants (the seven male variants
# are held out and never used), sentence case with punctuation (espeak pauses at commas and full stops) and
# background noise at 25-40 dB SNR. Same 8,000 train / 100 held-out clips, same model and training settings.
# Usage: recipes/aligner_synthetic/run_second_corpus.sh [--stage N] [--stop-stage M] [--steps S]
set -euo pipefail
cd "$(dirname "$0")/../.."
export ALIGNER_EXP=${ALIGNER_EXP:-exp/aligner_synthetic2}
export ALIGNER_SYNTH="--seed 2 --min-words 3 --max-words 14 --rate-range 110 190 \
  --heldout-voices +m1 +m2 +m3 +m4 +m5 +m6 +m7 --cased --snr-db 25 40"
exec recipes/aligner_synthetic/run.sh "$@"
