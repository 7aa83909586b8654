"""Synthetic corpus options for custom domains: an explicit word list (``vocabulary``) and a ``context`` on every
speech row; corpora made without them are unchanged (texts, ids and voice/rate draws recorded from the code
before the options existed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwen3asr_train.tools import synthetic
from qwen3asr_train.tools.synthetic import espeak_available, make_corpus

requires_espeak = pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not installed (apt-get install -y espeak-ng libespeak-ng1)"
)
DEMO_LIKE = dict(
    languages=("en",),
    num_train=12,
    num_test=4,
    num_unseen=4,
    seed=0,
    words_per_clip=(1, 4),
    vocabulary_size=24,
    rate_wpm=(140, 200),
    unseen_voices=("+m3", "+f3"),
    unseen_rate_wpm=((115, 135), (205, 225)),
    cased=True,
)
"""The demo corpus's options (recipes/demo_sft/make_corpus.py) at a few clips."""
# (id, text, voice, rate) written by the generator before `vocabulary`/`context` existed, for DEMO_LIKE
DEMO_LIKE_ROWS = [
    ("syn-train-000000-en", "City cat boat book!", "en-us", 188),
    ("syn-train-000001-en", "Brown, apple, bright cold.", "en+m1", 149),
    ("syn-train-000002-en", "Child?", "en-us+f1", 165),
    ("syn-train-000003-en", "Cold door brown!", "en-us+f1", 164),
    ("syn-train-000004-en", "Dream.", "en+m7", 167),
    ("syn-train-000005-en", "Dream bird black dream?", "en+m6", 150),
    ("syn-train-000006-en", "City blue cat?", "en+m2", 181),
    ("syn-train-000007-en", "Bird apple city dream!", "en+f1", 183),
    ("syn-train-000008-en", "Bird clean brown?", "en-us+f1", 165),
    ("syn-train-000009-en", "Day city black.", "en-us+f2", 164),
    ("syn-train-000010-en", "Brown dark?", "en+m4", 159),
    ("syn-train-000011-en", "City brown, book.", "en+f5", 156),
    ("syn-test-000000-en", "Dog dream chair.", "en-us+m7", 188),
    ("syn-test-000001-en", "Day dark boat.", "en+f5", 153),
    ("syn-test-000002-en", "Dog book boat.", "en+m1", 165),
    ("syn-test-000003-en", "Dog.", "en+m6", 177),
    ("syn-test_unseen-000000-en", "Dog door day?", "en+m3", 224),
    ("syn-test_unseen-000001-en", "Apple cat, dark cat.", "en-us+m3", 205),
    ("syn-test_unseen-000002-en", "Door, ball bird.", "en+m3", 221),
    ("syn-test_unseen-000003-en", "Apple dream boat.", "en+f3", 119),
]
DOMAIN = ("aspirin", "insulin", "biopsy")
CUSTOM = dict(
    languages=("en",),
    num_train=10,
    num_test=3,
    seed=5,
    words_per_clip=(2, 4),
    cased=True,
    vocabulary=("apple", "baby", "ball", *DOMAIN),
    context=", ".join(DOMAIN),
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@requires_espeak
def test_corpora_without_the_new_options_are_unchanged(tmp_path: Path) -> None:
    manifests = make_corpus(tmp_path, workers=1, **DEMO_LIKE)
    rows = [r for split in ("train", "test", "test_unseen") for r in _rows(manifests[split])]
    assert [(r["id"], r["text"], r["synthesis"]["voice"], r["synthesis"]["rate_wpm"]) for r in rows] == DEMO_LIKE_ROWS
    assert all("context" not in r for r in rows)
    record = json.loads((tmp_path / "corpus_config.json").read_text())["config"]
    assert "vocabulary" not in record and "context" not in record and record["version"] == 1


def test_explicit_vocabulary_draws_like_the_built_in_list() -> None:
    """A second construction: the built-in words passed explicitly give the same sentences from the same seed."""
    built_in = tuple(word for word, _ in synthetic.VOCABULARIES["en"])
    for n_units in (1, 3, 7):
        implicit = synthetic._draw_sentence(np.random.default_rng(n_units), "en", n_units, 24)
        explicit = synthetic._draw_sentence(np.random.default_rng(n_units), "en", n_units, 24, built_in)
        assert implicit == explicit and len(implicit[0]) == n_units


@pytest.fixture(scope="module")
def custom_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("custom"), workers=1, **CUSTOM)


@requires_espeak
def test_vocabulary_and_context_rows(custom_corpus: dict[str, Path]) -> None:
    rows = _rows(custom_corpus["train"]) + _rows(custom_corpus["test"])
    assert len(rows) == 13
    words = [w["word"].lower() for r in rows for w in r["words"]]
    assert set(words) <= set(CUSTOM["vocabulary"])
    assert set(DOMAIN) & set(words)  # fixed seed: the new words are drawn
    assert all(r["context"] == "aspirin, insulin, biopsy" for r in rows)
    assert all(2 <= len(r["words"]) <= 4 for r in rows)


@requires_espeak
def test_custom_options_recorded_and_idempotent(custom_corpus: dict[str, Path]) -> None:
    folder = custom_corpus["train"].parent
    record = json.loads((folder / "corpus_config.json").read_text())["config"]
    assert record["vocabulary"] == list(CUSTOM["vocabulary"]) and record["context"] == CUSTOM["context"]
    before = {k: p.stat().st_mtime_ns for k, p in custom_corpus.items()}
    assert make_corpus(folder, workers=1, **CUSTOM) == custom_corpus
    assert {k: p.stat().st_mtime_ns for k, p in custom_corpus.items()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(languages=("en", "fr")), "exactly one language"),
        (dict(languages=("zh",)), "exactly one language"),
        (dict(vocabulary=("apple", "x-ray")), "'x-ray' must be letters only"),
        (dict(vocabulary=("apple", "two words")), "must be letters only"),
        (dict(vocabulary=("apple", "ball", "apple")), r"\['apple'\] more than once"),
    ],
)
def test_bad_vocabulary_refused_before_any_audio(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_corpus(tmp_path, workers=1, **{**CUSTOM, **change})
    assert not (tmp_path / "wavs").exists()
