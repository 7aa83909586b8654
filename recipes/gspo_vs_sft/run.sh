#!/usr/bin/env bash
# Pilot for issue 12 item 5: from the demo SFT export, (a) GSPO and (b) continued SFT for about the same CPU
# time, evaluated on the same held-out sets, with a paired bootstrap CI over utterances of the WER difference.
#   recipes/gspo_vs_sft/run.sh [--stage N --stop-stage M]
# Environment: START (export to start from), TRAIN/HELDOUT/UNSEEN (manifests), GSPO_STEPS, SFT_STEPS, GSPO_LR,
# SFT_LR. The step counts are chosen so that both runs take about the same CPU time (measured with
# /usr/bin/time into <run>/cpu_time.txt: user + system seconds of the run and its loader worker); on the demo
# export 1,200 GSPO steps took 199 CPU-s and 520 SFT steps 201 CPU-s (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
exp=${EXP:-exp/gspo_vs_sft}
start=${START:-exp/demo_sft/export/native}
train=${TRAIN:-exp/demo_sft/corpus/train.jsonl}
heldout=${HELDOUT:-exp/demo_sft/corpus/test.jsonl}
unseen=${UNSEEN:-exp/demo_s/corpus/test_unseen.jsonl}
gspo_steps=${GSPO_STEPS:-1200}; sft_steps=${SFT_STEPS:-520}
gspo_lr=${GSPO_LR:-1e-4}; sft_lr=${SFT_LR:-3e-4}
. recipes/common.sh "$@"
timed() { local out=$1; shift; /usr/bin/time -f "%U %S %e" -o "$out" "$@"; }
common=(model=checkpoint "model.path=$start" "data.train=$train" trainer=cpu data.num_workers=1
  trainer.checkpoint_every_n_steps=100000 trainer.enable_progress_bar=false trainer.log_every_n_steps=20)

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: GSPO, $gspo_steps steps (G=8, 8 utterances per rollout batch, 4 minibatches), lr $gspo_lr"
  rm -rf $exp/gspo; mkdir -p $exp/gspo
  timed $exp/gspo/cpu_time.txt $PY -m qwen3asr_train recipe=gspo "${common[@]}" trainer.max_steps=$gspo_steps \
    recipe.optim.lr=$gspo_lr recipe.group_size=8 recipe.rollout_batch_size=8 recipe.steps_per_generation=4 \
    hydra.run.dir=$exp/gspo
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: continued SFT, $sft_steps steps, lr $sft_lr constant (the demo's batches and speed perturbation)"
  rm -rf $exp/sft; mkdir -p $exp/sft
  timed $exp/sft/cpu_time.txt $PY -m qwen3asr_train recipe=sft "${common[@]}" trainer.max_steps=$sft_steps \
    recipe.optim.lr=$sft_lr recipe.optim.warmup_steps=20 recipe.optim.schedule=constant data.max_batch_seconds=30 \
    data.augment.speed_prob=0.5 "data.augment.speed_factors=[0.9,1.1]" hydra.run.dir=$exp/sft
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: evaluation of the start, GSPO and SFT models on heldout and unseen"
  for name in start gspo sft; do
    model=$start; [ $name = start ] || model=$exp/$name/export
    $PY -m qwen3asr_train recipe=eval recipe.model_path=$model +recipe.sets.heldout=$heldout \
      +recipe.sets.unseen=$unseen hydra.run.dir=$exp/eval_$name
  done
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: WER differences with paired bootstrap CIs"
  $PY recipes/gspo_vs_sft/compare.py $exp | tee $exp/compare.md
fi
