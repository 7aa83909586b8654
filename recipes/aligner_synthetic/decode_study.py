"""Compare the aligner's slot decoders and the refinement pass on evaluation sets, for one model.

Why a script: `recipe=eval` runs one decoding per call; this runs several on the same loaded model and sets
and also counts how many refinement cuts put a word in the wrong piece (against the reference), which the
evaluation cannot know. docs/results.md (2026-12-02, sixth session) has its output for the recipe's models.

Usage: .venv/bin/python recipes/aligner_synthetic/decode_study.py MODEL SET=MANIFEST [SET=MANIFEST ...]
           [--configs argmax:0 monotonic:0 argmax:6]
MODEL is an export, a run directory or a .ckpt; each config is DECODE:REFINE_SECONDS, or
DECODE:chainW[:KEY=VALUE...] for chained windows of W seconds (``decode.align_chain_seconds``), KEY a field
of ``ChainSettings`` (fill, accept, back_s, overlap, snap, votes, accept_spread, vote_tolerance_s; the defaults otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np

from qwen3asr_train.checkpoints import load_for_inference
from qwen3asr_train.config.data import DataConfig
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.datamodule import row_checks
from qwen3asr_train.eval.align_eval import ChainSettings, align, refine_cuts
from qwen3asr_train.eval.alignment import TIME_BINS_S, boundary_errors_ms

log = logging.getLogger("decode_study")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("sets", nargs="+", help="NAME=MANIFEST")
    parser.add_argument("--configs", nargs="+", default=["argmax:0", "monotonic:0", "argmax:6", "monotonic:6"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qwen3asr_train.eval.hook import load_eval_sets

    model, processor = load_for_inference(args.model)
    sets = load_eval_sets(dict(s.split("=", 1) for s in args.sets), row_checks(DataConfig()), "skip")
    first_passes: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}  # (decode, set) -> one pass
    for config in args.configs:
        decode, refine, *rest = config.split(":")
        chain = float(refine[len("chain") :]) if refine.startswith("chain") else 0.0
        given = dict(item.split("=", 1) for item in rest)
        kinds = {f.name: type(getattr(ChainSettings(), f.name)) for f in dataclasses.fields(ChainSettings)}
        unknown = sorted(set(given) - set(kinds))
        if unknown:
            parser.error(f"unknown chain settings {unknown}; known: {sorted(kinds)}")
        chain_settings = ChainSettings(
            chain, **{k: (v in ("1", "true", "True")) if kinds[k] is bool else kinds[k](v) for k, v in given.items()}
        )
        if chain > 0:
            refine = "0"
        for name, samples in sets.items():
            started = time.process_time()
            pred = align(
                model,
                processor,
                samples,
                chunk_long=True,
                decode=decode,
                refine_seconds=float(refine),
                chain=chain_settings,
            )
            if chain > 0:
                name_shown = f"{name} chain {chain:g} " + " ".join(f"{k}={v}" for k, v in given.items())
            else:
                name_shown = name
            if float(refine) <= 0 and chain <= 0:
                first_passes[(decode, name)] = pred
            refs = [[(w.start, w.end) for w in s.utt.words or []] for s in samples]
            errors = np.concatenate([boundary_errors_ms(p, r) for p, r in zip(pred, refs, strict=True)])
            times = np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1) for r in refs])
            bins = [
                f"{errors[(times >= lo) & (times < hi)].mean():.0f}"
                for lo, hi in zip(TIME_BINS_S[:-1], TIME_BINS_S[1:], strict=True)
                if ((times >= lo) & (times < hi)).any()
            ]
            log.info(
                "%-9s refine %-4s %-24s AAS %7.1f ms  median %5.0f  by time [%s]  (%.0f CPU-s)",
                decode,
                refine,
                name_shown,
                errors.mean(),
                np.median(errors),
                " ".join(bins),
                time.process_time() - started,
            )
            if float(refine) > 0:
                cuts = wrong = words = 0
                if (decode, name) not in first_passes:  # the first pass the refinement planned its cuts from
                    first_passes[(decode, name)] = align(model, processor, samples, chunk_long=True, decode=decode)
                for sample, first, ref in zip(samples, first_passes[(decode, name)], refs, strict=True):
                    if sample.audio.size / SAMPLE_RATE <= float(refine):
                        continue
                    centres = np.array([(a + b) / 2 for a, b in ref])
                    for cut, last in refine_cuts(sample.audio, first, float(refine)):
                        true_before = int(np.searchsorted(centres, cut))
                        cuts, wrong, words = (
                            cuts + 1,
                            wrong + (true_before != last + 1),
                            words + abs(true_before - last - 1),
                        )
                log.info(
                    "    refinement cuts %d, with a word on the wrong side %d, words misplaced %d", cuts, wrong, words
                )


if __name__ == "__main__":
    main()
