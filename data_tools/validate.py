"""Validate manifests the way training reads them; write a clean manifest, every rejected row and a summary.

Usage:
    python data_tools/validate.py train.jsonl [more.jsonl ...] --out-dir checked/ [--aligner] [--decode] \\
        [--max-duration 1200] [--min-duration 0.05] [--extra-languages Klingon ...] [--strict]

Writes ``checked/clean.jsonl`` (accepted rows, audio paths absolute), ``checked/rejects.jsonl`` (file, line,
reason, message of every rejected row), ``checked/summary.json`` and ``checked/durations.png``; prints the
summary. ``--aligner`` also checks word times against the aligner's word units; ``--decode`` decodes every
segment (slow; finds corrupt audio behind a good header). Exit status 1 with ``--strict`` when any row is rejected.
"""

from __future__ import annotations

import argparse
import json
import logging

from qwen3asr_train.config.schema import DataConfig
from qwen3asr_train.data.validate import validate_manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", help="JSONL(.gz) manifests")
    parser.add_argument("--out-dir", required=True, help="where clean.jsonl, rejects.jsonl, summary.json go")
    parser.add_argument("--aligner", action="store_true", help="check word times against the aligner's word units")
    parser.add_argument("--decode", action="store_true", help="decode every segment, not only the header")
    parser.add_argument("--max-duration", type=float, default=DataConfig.max_duration)
    parser.add_argument("--min-duration", type=float, default=DataConfig.min_duration)
    parser.add_argument("--extra-languages", nargs="*", default=[])
    parser.add_argument("--strict", action="store_true", help="exit 1 when any row is rejected")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data = DataConfig(
        max_duration=args.max_duration, min_duration=args.min_duration, extra_languages=list(args.extra_languages)
    )
    summary = validate_manifests(args.manifests, args.out_dir, data, aligner=args.aligner, decode=args.decode)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 1 if args.strict and summary["rejected"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
