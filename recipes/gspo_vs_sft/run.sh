#!/usr/bin/env bash
# Pilot for issue 12 item 5: from the demo SFT export, (a) GSPO and (b) continued SFT for about the same CPU
# time, evaluated on the same held-out sets, with a paired bootstrap CI over utterances of the WER difference.
#   recipes/gspo_vs_sft/run.sh [--stage N --stop-stage M]
# Settings: configs/experiment/gspo_vs_sft_{gspo,sft,eval}.yaml; GSPO_STEPS / SFT_STEPS change the step counts.
# They are chosen so that both runs take about the same CPU time, measured with /usr/bin/time into
# <run>/cpu_time.txt (user + system seconds of the run and its loader worker): on the demo export 1,200 GSPO
# steps took 199 CPU-s and 520 SFT steps 201 CPU-s (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
exp=exp/gspo_vs_sft
gspo_steps=${GSPO_STEPS:-1200}; sft_steps=${SFT_STEPS:-520}
. recipes/common.sh "$@"
timed() { local out=$1; shift; /usr/bin/time -f "%U %S %e" -o "$out" "$@"; }

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: GSPO, $gspo_steps steps (G=8, 8 utterances per rollout batch, 4 minibatches)"
  rm -rf $exp/gspo; mkdir -p $exp/gspo
  timed $exp/gspo/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_gspo trainer.max_steps=$gspo_steps \
    hydra.run.dir=$exp/gspo
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: continued SFT, $sft_steps steps"
  rm -rf $exp/sft; mkdir -p $exp/sft
  timed $exp/sft/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_sft trainer.max_steps=$sft_steps \
    hydra.run.dir=$exp/sft
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: evaluation of the start, GSPO and SFT models on heldout and unseen"
  for model in gspo sft; do
    $PY -m qwen3asr_train experiment=gspo_vs_sft_eval recipe.model_path=$exp/$model/export hydra.run.dir=$exp/eval_$model
  done
  $PY -m qwen3asr_train experiment=gspo_vs_sft_eval hydra.run.dir=$exp/eval_start
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: WER differences with paired bootstrap CIs"
  $PY recipes/gspo_vs_sft/compare.py $exp | tee $exp/compare.md
fi
