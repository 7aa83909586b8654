"""What the aligner considers for each boundary of one utterance: the top bins of every timestamp slot.

Why a script: an utterance with a large error (``eval/worst_utterances`` in an evaluation's summary) can be a
decoding problem (the right bin has probability, the decoder did not take it) or a model problem (no mass
near the reference). The evaluation reports only the decoded times; this prints, for each word's start and
end, the reference time and the model's ``--top`` most likely times with their probabilities, from one
pass over the whole clip (no chaining). docs/results.md (2026-12-03, thirteenth session) has its output for
syn-test-000071.

Usage: .venv/bin/python recipes/aligner_synthetic/slot_probe.py MODEL MANIFEST UTTERANCE_ID [--top 4]
MODEL is an export, a run directory or a .ckpt; UTTERANCE_ID a row id of MANIFEST (with word times).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen3asr_train.data.aligner import SEGMENT_MS, AlignerCollator
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.prompts import TIMESTAMP

log = logging.getLogger("slot_probe")


@dataclass(frozen=True)
class SlotRow:
    """One timestamp slot: the word, which edge, the reference time (s) and the top (time s, probability)."""

    word: str
    edge: str
    ref_s: float
    top: list[tuple[float, float]]


@torch.no_grad()
def slot_rows(model: torch.nn.Module, processor: Any, sample: Sample, top: int = 4) -> list[SlotRow]:
    """The top ``top`` bins of every slot of ``sample`` (a word's start, then its end, word by word)."""
    words = sample.utt.words or []
    if not words:
        raise ValueError(f"{sample.utt.id}: no word times (the probe needs the manifest's words)")
    collator = AlignerCollator(processor, int(model.config.num_labels), slot_prob=1.0, seed=0, check_units=False)
    batch = collator([sample])
    keys = ("input_ids", "attention_mask", "input_features_mask", "input_features")
    logits = model(**{k: batch[k] for k in keys}).logits[0].float()  # (T, C)
    slot_id = processor.tokenizer.convert_tokens_to_ids(TIMESTAMP)
    positions = (batch["input_ids"][0] == slot_id).nonzero().flatten().tolist()
    if len(positions) != 2 * len(words):
        raise RuntimeError(f"{sample.utt.id}: {len(positions)} slots for {len(words)} words (expected two each)")
    probs = torch.softmax(logits[positions], dim=-1)  # (2W, C)
    values, bins = torch.topk(probs, min(top, probs.shape[-1]), dim=-1)
    rows = []
    for k, (v, c) in enumerate(zip(values.tolist(), bins.tolist(), strict=True)):
        word = words[k // 2]
        rows.append(
            SlotRow(
                word.word,
                "start" if k % 2 == 0 else "end",
                word.start if k % 2 == 0 else word.end,
                [(b * SEGMENT_MS / 1000.0, p) for b, p in zip(c, v, strict=True)],
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("utterance_id")
    parser.add_argument("--top", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from qwen3asr_train.checkpoints import load_for_inference
    from qwen3asr_train.config.data import DataConfig
    from qwen3asr_train.data.datamodule import row_checks
    from qwen3asr_train.eval.hook import load_eval_sets

    torch.set_num_threads(1)
    model, processor = load_for_inference(args.model)
    samples = load_eval_sets({"probe": str(args.manifest)}, row_checks(DataConfig()), "skip")["probe"]
    chosen = [s for s in samples if s.utt.id == args.utterance_id]
    if not chosen:
        parser.error(f"{args.utterance_id!r} is not a usable row of {args.manifest}")
    for row in slot_rows(model, processor, chosen[0], args.top):
        best = "  ".join(f"{t:5.2f}:{p:.2f}" for t, p in row.top)
        sys.stdout.write(f"{row.word:12s} {row.edge:5s} ref {row.ref_s:6.2f}   {best}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
