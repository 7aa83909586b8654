"""Stage 0 of recipes/gspo_vs_sft: the demo's training corpus and three evaluation sets, each with one role.

Why a script of its own: a comparison whose settings were chosen on its test set is biased, and 100 clips give a
95% interval of about ±5 WER points, too wide for the differences GSPO can make. So:

* ``corpus/``: the demo corpus (``recipes/demo_sft/make_corpus.py``'s ``DEMO_CORPUS``), whose ``train.jsonl``
  every stage trains on;
* ``eval_corpus/``: the same generator and seed with 500 ``test`` and 500 ``test_unseen`` clips. Clips are drawn
  per (seed, split, index), so its first 100 test clips are the demo corpus's test set, and its training split
  (1 clip) is not used;
* ``sets/dev.jsonl``: those first 100 test clips (same texts, voices and rates), for every choice (the start model's plateau, GSPO tuning);
* ``sets/heldout.jsonl``: the other 400 test clips (training voices and rates), only for the final comparison;
* ``sets/unseen.jsonl``: the 500 unseen clips (voices and rates never trained on), only for the final comparison.

Usage: python recipes/gspo_vs_sft/make_sets.py exp/gspo_vs_sft [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo_sft"))

from make_corpus import DEMO_CORPUS  # noqa: E402

from qwen3asr_train.data.manifest import read_jsonl  # noqa: E402
from qwen3asr_train.tools.synthetic import make_corpus  # noqa: E402

DEV_CLIPS = 100
"""Leading clips of the evaluation corpus's test split used as the dev set (= the demo corpus's test set)."""
EVAL_CORPUS = {**DEMO_CORPUS, "num_train": 1, "num_test": 500, "num_unseen": 500}
"""The evaluation corpus: the demo's generator and seed, more test clips."""

log = logging.getLogger(__name__)


def split_sets(test: Path, unseen: Path, out: Path, dev_clips: int = DEV_CLIPS) -> dict[str, Path]:
    """Write ``dev`` (first ``dev_clips`` lines of ``test``), ``heldout`` (the rest) and ``unseen`` (a copy)."""
    rows = test.read_text().splitlines(keepends=True)
    if len(rows) <= dev_clips:
        raise ValueError(f"{test}: {len(rows)} rows, need more than the {dev_clips} dev clips")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"dev": out / "dev.jsonl", "heldout": out / "heldout.jsonl", "unseen": out / "unseen.jsonl"}
    paths["dev"].write_text("".join(rows[:dev_clips]))
    paths["heldout"].write_text("".join(rows[dev_clips:]))
    paths["unseen"].write_text(unseen.read_text())
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp", type=Path)
    parser.add_argument("--workers", type=int, default=2, help="processes (output does not depend on it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train = make_corpus(args.exp / "corpus", workers=args.workers, **DEMO_CORPUS)
    evals = make_corpus(args.exp / "eval_corpus", workers=args.workers, **EVAL_CORPUS)
    paths = split_sets(evals["test"], evals["test_unseen"], args.exp / "sets")

    def texts(path: Path) -> list[tuple[str, str, str]]:
        return [(row["id"], row["text"], row["language"]) for row in read_jsonl(path)]

    # the dev set must be the demo corpus's test set: same ids, texts and voices/rates. The audio itself may
    # differ by a few samples (espeak-ng's output moved clip durations by up to ~2 ms between two generations)
    if texts(paths["dev"]) != texts(train["test"]):
        raise RuntimeError("the evaluation corpus's first test clips differ from the demo corpus's test set")
    for name, path in paths.items():
        log.info("%-8s %s (%d clips)", name, path, len(path.read_text().splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
