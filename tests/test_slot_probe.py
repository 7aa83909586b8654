"""recipes/aligner_synthetic/slot_probe.py: the per-slot top bins of one utterance, checked against the
argmax decoder of the evaluation (its top bin must be what ``align`` decodes) and the manifest's times."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, Utterance
from qwen3asr_train.eval.align_eval import align
from qwen3asr_train.model.builder import build_model

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "slot_probe", REPO / "recipes" / "aligner_synthetic" / "slot_probe.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through the module
    spec.loader.exec_module(module)
    return module


def _clip() -> Sample:
    words = [AlignedWord(w, 0.3 + 0.5 * k, 0.6 + 0.5 * k) for k, w in enumerate(["day", "eat", "walk"])]
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(2.0 * SAMPLE_RATE))).astype(np.float32)
    utt = Utterance(id="u", audio="u.wav", text="day eat walk", language="English", words=words, duration=2.0)
    return Sample(utt, audio, 0)


def test_top_bins_follow_the_decoder_and_the_reference_times():
    probe = _load()
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=100), seed=0)
    model.eval()
    sample = _clip()
    rows = probe.slot_rows(model, processor, sample, top=3)
    assert [(r.word, r.edge) for r in rows] == [(w, e) for w in ["day", "eat", "walk"] for e in ("start", "end")]
    assert [r.ref_s for r in rows] == [t for w in sample.utt.words for t in (w.start, w.end)]
    for row in rows:
        probs = [p for _, p in row.top]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    decoded = align(model, processor, [sample], decode="argmax")[0]
    top_times = [r.top[0][0] for r in rows]
    # the decoder may nudge a zero-length word apart (eval/alignment.py), never by more than one bin
    for got, best in zip([t for span in decoded for t in span], top_times, strict=True):
        assert got == pytest.approx(best, abs=0.08 + 1e-6)
    no_words = Sample(Utterance(id="x", audio="x.wav", text="a", language="English", duration=2.0), sample.audio, 1)
    with pytest.raises(ValueError, match="no word times"):
        probe.slot_rows(model, processor, no_words)
