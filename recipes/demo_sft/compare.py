"""Print the demo's before/after comparison (held-out WER and a few transcripts) and where things are.

Usage: python recipes/demo_sft/compare.py exp/demo_sft
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(exp: Path) -> int:
    before = json.loads((exp / "eval_before" / "summary.json").read_text())["sets"]["heldout"]
    after = json.loads((exp / "eval_after" / "summary.json").read_text())["sets"]["heldout"]
    rate_before, rate_after = before["corpus"]["rate"], after["corpus"]["rate"]
    rows = {json.loads(line)["id"]: json.loads(line) for line in open(exp / "eval_before" / "results-heldout.jsonl")}
    later = [json.loads(line) for line in open(exp / "eval_after" / "results-heldout.jsonl")]
    print("\nHeld-out transcripts (reference / before training / after training):")
    for row in later[:5]:
        print(f"  ref   : {row['reference']}")
        print(f"  before: {rows[row['id']]['text']}")
        print(f"  after : {row['text']}\n")
    print(f"Held-out WER: {100 * rate_before:.1f}% before training -> {100 * rate_after:.1f}% after training")
    print(f"\nrun directory : {exp / 'sft'} (run.yaml, logs/metrics.csv, checkpoints/, eval/step-*/)")
    print(f"evaluation    : {exp / 'eval_before'}, {exp / 'eval_after'} (recogs/errs/wer-summary, summary.md)")
    print(f"exports       : {exp / 'export' / 'native'} (transformers), {exp / 'export' / 'original'} (qwen-asr/vLLM)")
    if not rate_after < rate_before:
        print("the held-out error rate did not improve", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "exp/demo_sft")))
