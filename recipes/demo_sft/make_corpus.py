"""Stage 0 of the demo: the synthetic English corpus with a held-out split of unseen voices and speaking rates.

Why a script of its own: the demo's claim is that the model transcribes speech it never heard, so besides
``train`` and ``test`` (same voices and rates as training) the corpus has ``test_unseen``: voice variants
``+m3`` and ``+f3`` and speaking rates below and above the training range are reserved for it and never
used in training (``qwen3asr_train.tools.synthetic``, ``unseen_voices`` / ``unseen_rate_wpm``).
Transcripts are cased and punctuated; scoring normalises both away, the model still has to write them.

Usage: python recipes/demo_sft/make_corpus.py exp/demo_sft/corpus [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package, uninstalled

from qwen3asr_train.tools.synthetic import make_corpus  # noqa: E402

DEMO_CORPUS = dict(
    languages=("en",),
    num_train=2000,
    num_test=100,
    num_unseen=100,
    seed=0,
    words_per_clip=(1, 4),
    vocabulary_size=24,
    rate_wpm=(140, 200),
    unseen_voices=("+m3", "+f3"),
    unseen_rate_wpm=((115, 135), (205, 225)),
    cased=True,
)
"""The demo corpus; recipes/demo_sft/run.sh prints the same description."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes (texts and settings do not depend on it; the audio is bit-identical for the same count)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEMO_CORPUS["seed"],
        help="another seed draws other sentences, voices and rates with the same recipe (robustness checks)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifests = make_corpus(args.out_dir, workers=args.workers, **{**DEMO_CORPUS, "seed": args.seed})
    for split, path in manifests.items():
        logging.info("%-11s %s", split, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
