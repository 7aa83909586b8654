#!/usr/bin/env bash
# Custom-domain fine-tuning, offline: a base model trained on general synthetic speech is fine-tuned on a domain
# corpus with ten new words (medical terms, hot words in every row's context), (a) on the domain only and (b) with
# replay of the general corpus, for the same steps; both are compared with the base on held-out domain clips
# (WER, CER, domain-term recall) and on the base's own general held-out set (forgetting).
#
# Usage: recipes/custom_domain/run.sh [--stage N] [--stop-stage M] [--steps S]
# All outputs go under exp/custom_domain/ (CUSTOM_EXP=<dir> for another folder; delete it to start over).
# Stages skip themselves once done. Your own base and data (docs/custom_domain.md):
#   BASE_MODEL=<export dir>       the checkpoint to fine-tune (default: the demo's export, see stage 0)
#   GENERAL_TRAIN= GENERAL_TEST=  its general training set (replay) and held-out set (forgetting)
#   DEMO_EXP=<dir>                where the demo's outputs are (default exp/demo_sft)
#   DOMAIN_TRAIN= DOMAIN_TEST=    your domain manifests (rows may carry `context`), used instead of stage 1's corpus
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${CUSTOM_STEPS:-1200}; exp=exp/custom_domain
if [ -n "${CUSTOM_EXP:-}" ]; then exp=$CUSTOM_EXP; fi
demo=${DEMO_EXP:-exp/demo_sft}
. recipes/common.sh "$@"
# as in the demo: batch tensors stay in the heap instead of being mapped and unmapped every step (docs/decisions.md)
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ] && [ ! -f $exp/base/.done ]; then
  log "Stage 0: the base model (general synthetic English, 24 words) and its general train/held-out manifests"
  base=${BASE_MODEL:-}
  if [ -z "$base" ]; then
    if [ -f $demo/export/native/config.json ]; then base=$demo/export/native
    elif [ -f $demo/sft/export/config.json ]; then base=$demo/sft/export
    else
      log "  no demo export in $demo: running the demo's stages 0-1 (corpus, SFT) first"
      DEMO_EXP=$demo recipes/demo_sft/run.sh --stop-stage 1
      base=$demo/sft/export
    fi
  fi
  general_train=${GENERAL_TRAIN:-$demo/corpus/train.jsonl}; general_test=${GENERAL_TEST:-$demo/corpus/test.jsonl}
  # a snapshot: the demo (or your base) may be retrained later, this recipe's numbers stay about this model
  rm -rf $exp/base $exp/general; mkdir -p $exp/general
  cp -r "$base" $exp/base
  cp "$general_train" $exp/general/train.jsonl; cp "$general_test" $exp/general/test.jsonl
  echo "$base" > $exp/base/SOURCE
  touch $exp/base/.done
  log "  base: $base -> $exp/base"
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  if [ -n "${DOMAIN_TRAIN:-}" ]; then
    log "Stage 1: your domain manifests ($DOMAIN_TRAIN, $DOMAIN_TEST); a 600-row replay sample of the general set"
    $PY recipes/custom_domain/make_corpus.py $exp/corpus --general-train $exp/general/train.jsonl \
      --domain-train "$DOMAIN_TRAIN" --domain-test "$DOMAIN_TEST"
  else
    log "Stage 1: domain corpus (espeak-ng): 600 train + 100 held-out clips, 24 general + 10 new medical words,"
    log "         the domain's hot words as context; a 600-row replay sample of the general training set"
    $PY recipes/custom_domain/make_corpus.py $exp/corpus --general-train $exp/general/train.jsonl --workers 2
  fi
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ] && [ ! -f $exp/eval_base/summary.json ]; then
  log "Stage 2: the base model on the domain (with and without context) and general held-out sets"
  $PY -m qwen3asr_train experiment=custom_domain_eval recipe.model_path=$exp/base \
    recipe.sets.domain=$exp/corpus/domain/test.jsonl recipe.sets.domain_nocontext=$exp/corpus/domain/test_nocontext.jsonl \
    recipe.sets.general=$exp/general/test.jsonl hydra.run.dir=$exp/eval_base
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  if [ ! -f $exp/ft_domain/.done ]; then
    log "Stage 3a: fine-tune on the domain only, $steps steps"
    rm -rf $exp/ft_domain
    $PY -m qwen3asr_train experiment=custom_domain trainer.max_steps=$steps model.path=$exp/base \
      data.train=$exp/corpus/domain/train.jsonl hydra.run.dir=$exp/ft_domain
    touch $exp/ft_domain/.done
  fi
  if [ ! -f $exp/ft_replay/.done ]; then
    log "Stage 3b: fine-tune on the domain + general replay (1:1 rows), $steps steps"
    rm -rf $exp/ft_replay
    $PY -m qwen3asr_train experiment=custom_domain_replay trainer.max_steps=$steps model.path=$exp/base \
      data.train=[$exp/corpus/domain/train.jsonl,$exp/corpus/replay.jsonl] hydra.run.dir=$exp/ft_replay
    touch $exp/ft_replay/.done
  fi
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  for run in ft_domain ft_replay; do
    log "Stage 4: $run's export on the three sets"
    $PY -m qwen3asr_train experiment=custom_domain_eval recipe.model_path=$exp/$run/export \
      recipe.sets.domain=$exp/corpus/domain/test.jsonl recipe.sets.domain_nocontext=$exp/corpus/domain/test_nocontext.jsonl \
      recipe.sets.general=$exp/general/test.jsonl hydra.run.dir=$exp/eval_$run
  done
fi

if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
  $PY recipes/custom_domain/compare.py $exp
fi
