#!/usr/bin/env bash
# Offline SFT demo on synthetic speech (no downloads): corpus -> held-out WER/CER of the untrained model ->
# SFT of a small model built in-process -> held-out WER/CER after training -> export in both layouts.
# Two held-out sets: `heldout` (the training voices and speaking rates, other sentences) and `unseen` (voice
# variants and speaking rates that training never used).
#
# Usage: recipes/demo_sft/run.sh [--stage N] [--stop-stage M] [--steps S]
# All outputs go under exp/demo_sft/ (DEMO_EXP=<dir> for another folder; delete it to start over). Stages
# skip themselves once done.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${DEMO_STEPS:-3500}; exp=exp/demo_sft
if [ -n "${DEMO_EXP:-}" ]; then exp=$DEMO_EXP; fi
. recipes/common.sh "$@"
# glibc keeps freed batch tensors in its heap for the next step instead of mapping and unmapping them:
# allocations below 32 MB come from the heap and the heap is not trimmed. The earlier 128 kB thresholds did
# the opposite (every tensor over 128 kB mmap'd, page-faulted and unmapped each step): 0.30 of the
# 0.62 CPU-s of a training step was system time, 0.012 with these (docs/results.md, 2026-12-02 "cheap step").
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: synthetic English speech (espeak-ng), cased and punctuated, 24-word vocabulary, 1-4 words per clip:"
  log "         2000 train + 100 held-out clips (same voices/rates) + 100 clips of unseen voices (+m3, +f3) and rates"
  $PY recipes/demo_sft/make_corpus.py $exp/corpus --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && [ ! -f $exp/sft/.done ]; then
  log "Stage 1: SFT of a ~1.0M-parameter Qwen3-ASR (model=small with a 4-layer LLM, random init) for $steps steps"
  rm -rf $exp/sft
  $PY -m qwen3asr_train experiment=demo_sft trainer.max_steps=$steps evaluation.every_n_steps=$((steps / 2)) \
    data.train=$exp/corpus/train.jsonl evaluation.sets.heldout=$exp/corpus/test.jsonl \
    +evaluation.sets.unseen=$exp/corpus/test_unseen.jsonl hydra.run.dir=$exp/sft
  touch $exp/sft/.done
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: decode both held-out sets with the untrained and the trained model"
  $PY -m qwen3asr_train experiment=demo_sft_eval recipe.model_path=$exp/sft/model_init \
    recipe.sets.heldout=$exp/corpus/test.jsonl +recipe.sets.unseen=$exp/corpus/test_unseen.jsonl hydra.run.dir=$exp/eval_before
  $PY -m qwen3asr_train experiment=demo_sft_eval recipe.model_path=$exp/sft/export \
    recipe.sets.heldout=$exp/corpus/test.jsonl +recipe.sets.unseen=$exp/corpus/test_unseen.jsonl hydra.run.dir=$exp/eval_after
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: export the trained checkpoint in both layouts (transformers-native and original thinker)"
  $PY -m qwen3asr_train experiment=demo_sft_export recipe.checkpoint=$exp/sft recipe.output_dir=$exp/export \
    hydra.run.dir=$exp/export_log
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  $PY recipes/demo_sft/compare.py $exp
fi
