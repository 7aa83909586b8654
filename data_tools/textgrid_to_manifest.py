"""Turn Montreal Forced Aligner output into an aligner-training manifest (JSONL, one row per utterance).

Usage:
    python data_tools/textgrid_to_manifest.py --corpus-dir corpus/ --alignments-dir mfa_out/ \\
        --language Chinese --out manifests/aligner_train.jsonl [--unk-policy drop_utterance]

``corpus/`` is the MFA input (``<speaker>/<utt>.wav`` + ``<utt>.lab`` or ``.txt``), ``mfa_out/`` what
``mfa align`` wrote (``<speaker>/<utt>.TextGrid``). Word times are re-cut into the forced aligner's word
units (``qwen3asr_train.data.word_units``); see ``qwen3asr_train.data.textgrid`` for the rules. Prints
the counts (written, dropped by reason, how characters inside MFA words were timed) as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging

from qwen3asr_train.data.textgrid import UNK_POLICIES, mfa_corpus_to_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", required=True, help="MFA input corpus: <speaker>/<utt>.wav + .lab/.txt")
    parser.add_argument("--alignments-dir", required=True, help="MFA output: <speaker>/<utt>.TextGrid")
    parser.add_argument("--language", required=True, help="canonical name or ISO code, e.g. Chinese or zh")
    parser.add_argument("--out", required=True, help="manifest to write (JSONL)")
    parser.add_argument(
        "--unk-policy",
        choices=UNK_POLICIES,
        default="drop_utterance",
        help="words MFA could not align: drop the utterance, fail, or interpolate their times",
    )
    parser.add_argument("--words-tier", default="words", help="word tier name (default: words)")
    parser.add_argument("--phones-tier", default="phones", help="phone tier name (default: phones)")
    parser.add_argument("--log-level", default="WARNING", help="logging level; WARNING lists every dropped file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    counts = mfa_corpus_to_manifest(
        args.corpus_dir,
        args.alignments_dir,
        args.language,
        args.out,
        words_tier=args.words_tier,
        phones_tier=args.phones_tier,
        unk_policy=args.unk_policy,
    )
    print(json.dumps(dict(sorted(counts.items())), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
