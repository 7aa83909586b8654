#!/usr/bin/env bash
# Issue 12 item 5: does GSPO lower held-out WER more than continued SFT for the same CPU time?
#   recipes/gspo_vs_sft/run.sh [--stage N --stop-stage M]
# 0: the demo's training corpus + dev (100), heldout (400) and unseen (500) sets (make_sets.py says why three)
# 1: the start model: the demo's SFT with 15-s batches for 4,000 steps, then 2,000 more from a second cosine
#    cycle (start2), to a plateau of dev WER (decoded by the hook); start2/export is where stages 2-3 begin
# 2: GSPO from the start model, seeds 1 and 2, GSPO_STEPS steps each
# 3: continued SFT from the start model, seeds 1 and 2, SFT_STEPS steps each
# 4: evaluation of start2 and every run on heldout and unseen (sets used for no choice)
# 5: WER table and paired bootstrap CIs of the differences (compare.py) -> $exp/compare.md
# Settings: configs/experiment/gspo_vs_sft_{start,start2,gspo,sft,eval}.yaml. The step counts are chosen so
# that both methods take about the same CPU time, measured with /usr/bin/time into <run>/cpu_time.txt (user +
# system seconds of the whole process): 1,600 GSPO steps took 203 / 209 CPU-s and 1,450 SFT steps 209 / 236
# (seeds 1 / 2; docs/results.md, "GSPO vs continued SFT").
set -euo pipefail
cd "$(dirname "$0")/../.."
exp=exp/gspo_vs_sft
gspo_steps=${GSPO_STEPS:-1600}; sft_steps=${SFT_STEPS:-1450}
. recipes/common.sh "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
timed() { local out=$1; shift; /usr/bin/time -f "%U %S %e" -o "$out" "$@"; }

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  log "Stage 0: demo corpus (2,000 training clips) and the dev / heldout / unseen sets"
  $PY recipes/gspo_vs_sft/make_sets.py $exp --workers 2
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && [ ! -f $exp/start/.done ]; then
  log "Stage 1: start model, SFT to a plateau (4,000 steps of 15-s batches; dev WER every 1,000 steps)"
  rm -rf $exp/start; mkdir -p $exp/start
  timed $exp/start/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_start hydra.run.dir=$exp/start
  touch $exp/start/.done
fi
if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && [ ! -f $exp/start2/.done ]; then
  log "Stage 1, second part: 2,000 more SFT steps from start/export (cosine from lr 1e-3; dev WER every 500 steps)"
  rm -rf $exp/start2; mkdir -p $exp/start2
  timed $exp/start2/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_start2 hydra.run.dir=$exp/start2
  touch $exp/start2/.done
fi

# two seeds, written out: every qwen3asr_train line must compose as it stands (tests/test_configs.py)
if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: GSPO, seeds 1 and 2, $gspo_steps steps each"
  rm -rf $exp/gspo_s1 $exp/gspo_s2; mkdir -p $exp/gspo_s1 $exp/gspo_s2
  timed $exp/gspo_s1/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_gspo seed=1 \
    trainer.max_steps=$gspo_steps hydra.run.dir=$exp/gspo_s1
  timed $exp/gspo_s2/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_gspo seed=2 \
    trainer.max_steps=$gspo_steps hydra.run.dir=$exp/gspo_s2
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: continued SFT, seeds 1 and 2, $sft_steps steps each"
  rm -rf $exp/sft_s1 $exp/sft_s2; mkdir -p $exp/sft_s1 $exp/sft_s2
  timed $exp/sft_s1/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_sft seed=1 \
    trainer.max_steps=$sft_steps hydra.run.dir=$exp/sft_s1
  timed $exp/sft_s2/cpu_time.txt $PY -m qwen3asr_train experiment=gspo_vs_sft_sft seed=2 \
    trainer.max_steps=$sft_steps hydra.run.dir=$exp/sft_s2
fi

systems=start2,gspo_s1,sft_s1,gspo_s2,sft_s2

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: evaluation of $systems on heldout and unseen"
  for model in ${systems//,/ }; do
    $PY -m qwen3asr_train experiment=gspo_vs_sft_eval recipe.model_path=$exp/$model/export \
      hydra.run.dir=$exp/eval_$model
  done
fi

if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
  log "Stage 5: WER differences with paired bootstrap CIs"
  $PY recipes/gspo_vs_sft/compare.py $exp --systems $systems --pairs \
    gspo_s1-start2,sft_s1-start2,gspo_s1-sft_s1,gspo_s2-start2,sft_s2-start2,gspo_s2-sft_s2 | tee $exp/compare.md
fi
