"""Duration relabelling measured offline on an evaluation's predictions (no model run).

Usage: relabel_study.py TRAIN_MANIFEST ALIGNMENTS_JSON [ALIGNMENTS_JSON ...] [--sigma S ...] [--penalty P ...]

Reads ``alignments-<set>.json`` written by an aligner evaluation (each word's predicted and reference times),
learns the duration table from the training manifest, and prints the AAS before and after
``relabel_spans`` for every (sigma, penalty), per file, with the number of clips changed. Why offline: the
relabelling reads only the predicted spans and the word texts, so its settings can be studied without
aligning again (docs/aligner.md, duration relabelling).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from qwen3asr_train.eval.durations import DurationTable, relabel_spans

log = logging.getLogger("relabel_study")


def aas_ms(pred: list[tuple[float, float]], ref: list[tuple[float, float]]) -> tuple[float, int]:
    """Summed |error| over starts and ends (ms) and the number of boundaries."""
    p, r = np.asarray(pred), np.asarray(ref)
    return float(np.abs(p - r).sum() * 1000.0), int(p.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_manifest")
    parser.add_argument("alignments", nargs="+")
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.2])
    parser.add_argument("--penalty", type=float, nargs="+", default=[10.0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = DurationTable.from_manifest(args.train_manifest)
    for path in args.alignments:
        clips = json.loads(Path(path).read_text())["utterances"]
        base = [
            aas_ms([(w["start"], w["end"]) for w in c["words"]], [(w["ref_start"], w["ref_end"]) for w in c["words"]])
            for c in clips
        ]
        total = sum(n for _, n in base)
        log.info("%s: %d clips, AAS %.1f ms before", path, len(clips), sum(e for e, _ in base) / total)
        for sigma in args.sigma:
            for penalty in args.penalty:
                err, changed, better, worse = 0.0, 0, 0, 0
                for clip, (before, _) in zip(clips, base, strict=True):
                    words = [w["word"] for w in clip["words"]]
                    spans = [(w["start"], w["end"]) for w in clip["words"]]
                    new, moves = relabel_spans(spans, table.expected(words), sigma, penalty)
                    after, _ = aas_ms(new, [(w["ref_start"], w["ref_end"]) for w in clip["words"]])
                    err += after
                    changed += bool(moves)
                    better += after < before - 1e-6
                    worse += after > before + 1e-6
                log.info(
                    "  sigma %.2f penalty %5.1f: AAS %.1f ms, %d clips changed (%d better, %d worse)",
                    sigma,
                    penalty,
                    err / total,
                    changed,
                    better,
                    worse,
                )


if __name__ == "__main__":
    main()
