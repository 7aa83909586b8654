"""Print the demo's before/after comparison and where things are; draw the before/after chart
(``exp/demo_sft/before_after.png``) and the run's training curves.

Two held-out sets are compared: ``heldout`` (voices and speaking rates of the training set, other sentences)
and ``unseen`` (voice variants and speaking rates never used in training, see
``recipes/demo_sft/make_corpus.py``). For each: WER as the evaluation scores English, and CER (characters,
spaces skipped) from the same decoded rows with the same normaliser, because a model that gets most of a
word right is closer than WER alone says.

Usage: python recipes/demo_sft/compare.py exp/demo_sft
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package, uninstalled

from qwen3asr_train.data.manifest import read_jsonl  # noqa: E402
from qwen3asr_train.eval.metrics import ErrorCounts, score_utterance  # noqa: E402
from qwen3asr_train.eval.plots import load_summary, read_metrics_csv, write_before_after, write_run_plots  # noqa: E402

SETS = {"heldout": "seen voices/rates", "unseen": "unseen voices/rates"}
CER_GOAL = 0.20
"""The demo's target: held-out CER on unseen voices and rates at most 20% (issue 12)."""


def error_rates(results_jsonl: Path) -> dict[str, float]:
    """Corpus WER and CER of one evaluation's ``results-<set>.jsonl`` (the rows the evaluation wrote).

    Both are recomputed from ``reference`` and the parsed ``text`` with the evaluation's normaliser, so the
    WER equals the summary's and the CER counts the same decoded output in characters.
    """
    totals: dict[str, ErrorCounts] = {"word": ErrorCounts(), "char": ErrorCounts()}
    for row in read_jsonl(results_jsonl):
        for unit in totals:
            totals[unit] = (
                totals[unit] + score_utterance(row["reference"], row["text"] or "", row["language"], unit=unit).counts
            )
    return {"wer": totals["word"].rate, "cer": totals["char"].rate}


def main(exp: Path) -> int:
    summaries = {"before": load_summary(exp / "eval_before"), "after": load_summary(exp / "eval_after")}
    sets = [name for name in SETS if name in summaries["after"]["sets"]]
    rates = {
        when: {name: error_rates(exp / f"eval_{when}" / f"results-{name}.jsonl") for name in sets}
        for when in ("before", "after")
    }
    for name in sets:
        rows = {row["id"]: row for row in read_jsonl(exp / "eval_before" / f"results-{name}.jsonl")}
        later = read_jsonl(exp / "eval_after" / f"results-{name}.jsonl")
        print(f"\n{name} set ({SETS[name]}): reference / before training / after training")
        for row in later[:3]:
            print(f"  ref   : {row['reference']}")
            print(f"  before: {rows[row['id']]['text']}")
            print(f"  after : {row['text']}\n")
    steps = _last_step(exp / "sft")
    print(f"Held-out error rates, model_init -> export after {steps} steps:")
    print(f"  {'set':<8} {'clips':<22} {'WER before':>10} {'WER after':>10} {'CER before':>11} {'CER after':>10}")
    for name in sets:
        b, a = rates["before"][name], rates["after"][name]
        print(
            f"  {name:<8} {SETS[name]:<22} {100 * b['wer']:>9.1f}% {100 * a['wer']:>9.1f}% "
            f"{100 * b['cer']:>10.1f}% {100 * a['cer']:>9.1f}%"
        )
    chart = write_before_after(
        summaries, exp / "before_after.png", title=f"demo_sft held-out sets: model_init vs export after {steps} steps"
    )
    plots = write_run_plots(exp / "sft")
    print(f"\nbefore/after  : {chart}")
    print(f"training      : {plots.get('training_curves', '-')} (index: {plots.get('index', '-')})")
    print(f"\nrun directory : {exp / 'sft'} (run.yaml, logs/metrics.csv, checkpoints/, eval/step-*/)")
    print(f"evaluation    : {exp / 'eval_before'}, {exp / 'eval_after'} (recogs/errs/wer-summary, summary.md)")
    print(f"exports       : {exp / 'export' / 'native'} (transformers), {exp / 'export' / 'original'} (qwen-asr/vLLM)")
    status = 0
    if not all(rates["after"][name]["wer"] < rates["before"][name]["wer"] for name in sets):
        print("a held-out error rate did not improve", file=sys.stderr)
        status = 1
    if "unseen" in sets:
        cer = rates["after"]["unseen"]["cer"]
        verdict = "reached" if cer <= CER_GOAL else "NOT reached"
        print(f"\nunseen voices/rates: CER {100 * cer:.1f}% (goal <= {100 * CER_GOAL:.0f}%: {verdict})")
    return status


def _last_step(run_dir: Path) -> str:
    """The last optimizer step in ``logs/metrics.csv`` (the export is of the end of training)."""
    csv_path = run_dir / "logs" / "metrics.csv"
    if not csv_path.is_file():
        return "?"
    return str(max(step for points in read_metrics_csv(csv_path).values() for step, _ in points))


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "exp/demo_sft")))
