"""Print the demo's before/after comparison (held-out WER and a few transcripts) and where things are; draw
the before/after chart (``exp/demo_sft/before_after.png``) and the run's training curves.

Usage: python recipes/demo_sft/compare.py exp/demo_sft
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen3asr_train.eval.plots import load_summary, write_before_after, write_run_plots


def main(exp: Path) -> int:
    summaries = {"before": load_summary(exp / "eval_before"), "after": load_summary(exp / "eval_after")}
    before, after = summaries["before"]["sets"]["heldout"], summaries["after"]["sets"]["heldout"]
    rate_before, rate_after = before["corpus"]["rate"], after["corpus"]["rate"]
    rows = {json.loads(line)["id"]: json.loads(line) for line in open(exp / "eval_before" / "results-heldout.jsonl")}
    later = [json.loads(line) for line in open(exp / "eval_after" / "results-heldout.jsonl")]
    print("\nHeld-out transcripts (reference / before training / after training):")
    for row in later[:5]:
        print(f"  ref   : {row['reference']}")
        print(f"  before: {rows[row['id']]['text']}")
        print(f"  after : {row['text']}\n")
    print(f"Held-out WER: {100 * rate_before:.1f}% before training -> {100 * rate_after:.1f}% after training")
    steps = _last_step(exp / "sft")
    chart = write_before_after(
        summaries, exp / "before_after.png", title=f"demo_sft held-out set: model_init vs export after {steps} steps"
    )
    plots = write_run_plots(exp / "sft")
    print(f"\nbefore/after  : {chart}")
    print(f"training      : {plots.get('training_curves', '-')} (index: {plots.get('index', '-')})")
    print(f"\nrun directory : {exp / 'sft'} (run.yaml, logs/metrics.csv, checkpoints/, eval/step-*/)")
    print(f"evaluation    : {exp / 'eval_before'}, {exp / 'eval_after'} (recogs/errs/wer-summary, summary.md)")
    print(f"exports       : {exp / 'export' / 'native'} (transformers), {exp / 'export' / 'original'} (qwen-asr/vLLM)")
    if not rate_after < rate_before:
        print("the held-out error rate did not improve", file=sys.stderr)
        return 1
    return 0


def _last_step(run_dir: Path) -> str:
    """The last optimizer step in ``logs/metrics.csv`` (the export is of the end of training)."""
    from qwen3asr_train.eval.plots import read_metrics_csv

    csv_path = run_dir / "logs" / "metrics.csv"
    if not csv_path.is_file():
        return "?"
    return str(max(step for points in read_metrics_csv(csv_path).values() for step, _ in points))


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "exp/demo_sft")))
