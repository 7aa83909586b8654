"""Chained-window alignment of long clips (``eval/align_eval.py: chain_align``) and the partial-transcript
training augmentation it needs (``AlignerCollator.spanned``, ``recipe.span_prob``).

Independent references: the original clip's samples and word times (a span must be a slice of both, to the
sample), and an oracle aligner that returns the true times of the words it is given: with it, a correct chain
returns the reference exactly, so any bookkeeping slip (window offsets, accepted words, the next window's
start) shows as a difference.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from qwen3asr_train.config.base import ConfigError
from qwen3asr_train.config.recipes import AlignerConfig, DecodeConfig
from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.aligner import AlignerCollator
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, Utterance
from qwen3asr_train.eval import align_eval
from qwen3asr_train.eval.align_eval import ChainSettings, align, chain_align
from qwen3asr_train.model.builder import build_model

NUM_CLASSES = 100  # 8 s


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)


def _clip(n_words: int, seconds_per_word: float = 0.5, lead: float = 0.3, index: int = 0) -> Sample:
    """``n_words`` unique words (w0, w1, ...), each 0.4 s of speech then a pause, and an audio ramp whose value
    at every sample is its index (so a cut's position can be read off its first sample)."""
    words = [
        AlignedWord(f"w{k}", lead + k * seconds_per_word, lead + k * seconds_per_word + 0.4) for k in range(n_words)
    ]
    total = words[-1].end + 0.3
    audio = np.arange(int(round(total * SAMPLE_RATE)), dtype=np.float64).astype(np.float32)
    utt = Utterance(
        id=f"clip{index}",
        audio=f"clip{index}.wav",
        text=" ".join(w.word for w in words),
        language="English",
        words=words,
        duration=total,
    )
    return Sample(utt, audio, index)


def test_a_span_is_a_slice_of_the_words_and_of_the_audio(tiny):
    _, processor = tiny
    collator = AlignerCollator(processor, NUM_CLASSES, 1.0, seed=3, span_prob=1.0, span_lead_seconds=0.3)
    sample = _clip(8)
    seen = set()
    for epoch in range(40):
        got = collator.spanned(sample, epoch)
        cut = float(got.audio[0]) / SAMPLE_RATE  # the ramp: the first kept sample's index
        names = [w.word for w in got.utt.words]
        a = int(names[0][1:])
        assert names == [f"w{k}" for k in range(a, a + len(names))]  # contiguous
        assert names != [w.word for w in sample.utt.words]  # never the whole clip
        seen.add((a, len(names)))
        assert got.audio.size == sample.audio.size - int(round(cut * SAMPLE_RATE))  # kept to the clip's end
        if a == 0:
            assert cut == 0.0
        else:  # starts up to 0.3 s before its first word
            assert 0.0 <= sample.utt.words[a].start - cut <= 0.3 + 1 / SAMPLE_RATE
        for w in got.utt.words:  # times move with the audio, to the sample
            ref = sample.utt.words[int(w.word[1:])]
            assert w.start + cut == pytest.approx(ref.start, abs=1e-9)
            assert w.end + cut == pytest.approx(ref.end, abs=1e-9)
        assert collator.spanned(sample, epoch).utt.words == got.utt.words  # same draw for (seed, epoch, index)
    assert len(seen) > 10  # the draw varies over epochs
    assert AlignerCollator(processor, NUM_CLASSES, 1.0, seed=3).spanned(sample, 0) is sample  # off by default


def test_a_late_opened_span_starts_inside_its_first_word_and_labels_it_at_zero(tiny):
    _, processor = tiny
    late = AlignerCollator(
        processor, NUM_CLASSES, 1.0, seed=3, span_prob=1.0, span_lead_seconds=0.3, span_late_prob=0.5
    )
    plain = AlignerCollator(processor, NUM_CLASSES, 1.0, seed=3, span_prob=1.0, span_lead_seconds=0.3)
    sample = _clip(8)
    inside = before = 0
    for epoch in range(200):
        got = late.spanned(sample, epoch)
        cut = float(got.audio[0]) / SAMPLE_RATE  # the ramp: the first kept sample's index
        first = sample.utt.words[int(got.utt.words[0].word[1:])]
        if first.start < cut:  # opened inside the first word: at most 0.3 s in, at least 50 ms of it kept
            inside += 1
            assert cut - first.start <= 0.3 + 1 / SAMPLE_RATE and first.end - cut >= 0.05 - 1 / SAMPLE_RATE
            assert got.utt.words[0].start == 0.0  # its start label is the window's start (class 0)
            assert got.utt.words[0].end == pytest.approx(first.end - cut, abs=1e-9)
        else:
            before += 1
            assert first.start - cut <= 0.3 + 1 / SAMPLE_RATE
        for w in got.utt.words[1:]:  # the other words move with the audio, to the sample
            ref = sample.utt.words[int(w.word[1:])]
            assert w.start + cut == pytest.approx(ref.start, abs=1e-9)
    # spans from word 0 (1 in 8) always start at the clip's start; half of the rest open inside
    assert 0.3 < inside / 200 < 0.6 and before > 0
    # q = 0 draws nothing more: the same spans as a collator without the option
    off = AlignerCollator(processor, NUM_CLASSES, 1.0, seed=3, span_prob=1.0, span_lead_seconds=0.3, span_late_prob=0.0)
    for epoch in range(20):
        assert off.spanned(sample, epoch).utt.words == plain.spanned(sample, epoch).utt.words
    with pytest.raises(ValueError, match="span_late_prob"):
        AlignerCollator(processor, NUM_CLASSES, 1.0, seed=0, span_late_prob=2.0)
    with pytest.raises(ConfigError, match="span_late_prob"):
        AlignerConfig(span_late_prob=-0.1).validate()


def test_span_probability_and_its_labels(tiny):
    _, processor = tiny
    collator = AlignerCollator(processor, NUM_CLASSES, 1.0, seed=0, span_prob=0.5)
    samples = [_clip(6, index=i) for i in range(200)]
    spanned = sum(collator.spanned(s, 0) is not s for s in samples)
    assert 70 < spanned < 130
    batch = collator(samples[:4], 0)
    for row, words in zip(batch["labels"], batch["slotted_words"], strict=True):  # labels follow the span's times
        classes = row[row != -100].tolist()
        expected = [round(t / 0.08 + 1e-9) for w in words for t in (w[1], w[2])]
        assert classes == expected
    with pytest.raises(ValueError, match="span_prob"):
        AlignerCollator(processor, NUM_CLASSES, 1.0, seed=0, span_prob=1.5)
    with pytest.raises(ConfigError, match="span_prob"):
        AlignerConfig(span_prob=-0.1).validate()


def _oracle(samples: list[Sample], seen: list[tuple[int, float, list[str]]]):
    """A perfect aligner for :func:`chain_align`: each given word gets its true time relative to the window,
    squeezed into the window when it lies past its end (what a real aligner would have to do)."""
    truth = {(s.index, w.word): (w.start, w.end) for s in samples for w in s.utt.words}

    def align_units(model, processor, collator, units, num_samples, *args):
        out = [[] for _ in range(num_samples)]
        for i, t0, piece in units:
            names = [w.word for w in piece.utt.words]
            assert all(w.start == w.end == 0.0 for w in piece.utt.words)  # no reference time reaches the model
            seen.append((piece.index, t0, names))
            length = piece.audio.size / SAMPLE_RATE
            for name in names:
                start, end = truth[(piece.index, name)]
                out[i].append((t0 + min(start - t0, length), t0 + min(end - t0, length)))
        return out

    return align_units


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_a_perfect_aligner_chained_gives_the_reference(tiny, monkeypatch, overlap):
    model, processor = tiny
    samples = [_clip(40, index=0), _clip(23, seconds_per_word=0.8, index=1), _clip(3, index=2)]
    seen: list[tuple[int, float, list[str]]] = []
    monkeypatch.setattr(align_eval, "_align_units", _oracle(samples, seen))
    chain = ChainSettings(6.0, fill=0.5, accept=0.5, back_s=0.2, overlap=overlap, snap=False, votes=1)
    out = chain_align(model, processor, samples, chain)
    for sample, spans in zip(samples, out, strict=True):
        assert np.asarray(spans) == pytest.approx(np.asarray([(w.start, w.end) for w in sample.utt.words]), abs=1e-9)
    # every word was given to exactly one accepted window position, in order; windows never exceed 6 s
    for i, sample in enumerate(samples):
        windows = [(t0, names) for j, t0, names in seen if j == i]
        assert [t0 for t0, _ in windows] == sorted(t0 for t0, _ in windows)
        assert windows[0][0] == 0.0
        assert len(windows) > 1 or sample.audio.size / SAMPLE_RATE <= 6.0
        given = [n for _, names in windows for n in names]
        assert set(given) == {w.word for w in sample.utt.words}
        again = 0  # each window after the first starts with the last `overlap` words the previous one accepted
        for (t0, names), (t1, after) in zip(windows[:-1], windows[1:], strict=True):
            new = [int(n[1:]) for n in names[again:]]
            keep = max(1, sum(sample.utt.words[k].end <= t0 + 3.0 for k in new))  # accept: first half of 6 s
            again = min(overlap, new[0] + keep)
            assert int(after[0][1:]) == new[0] + keep - again
            # started back_s (0.2 s) before the first re-given word's start, or the last accepted word's end
            anchor = sample.utt.words[int(after[0][1:])].start if overlap else sample.utt.words[new[0] + keep - 1].end
            assert t1 == pytest.approx(max(t0 + 0.01, anchor - 0.2), abs=1e-4)


def test_the_chain_always_advances(tiny, monkeypatch):
    model, processor = tiny
    samples = [_clip(30)]

    def stuck(model, processor, collator, units, num_samples, *args):  # every word at the window's end
        out = [[] for _ in range(num_samples)]
        for i, t0, piece in units:
            end = t0 + piece.audio.size / SAMPLE_RATE
            out[i] = [(end, end)] * len(piece.utt.words)
        return out

    monkeypatch.setattr(align_eval, "_align_units", stuck)
    for overlap in (0, 1, 2):
        out = chain_align(model, processor, samples, ChainSettings(4.0, overlap=overlap))
        assert len(out[0]) == 30


def test_chained_alignment_with_a_real_model_returns_every_word(tiny):
    model, processor = tiny
    samples = [_clip(30, index=0), _clip(4, index=1)]  # 15.6 s: longer than the 8 s the classes address
    with pytest.raises(ValueError, match="exceeds"):
        align(model, processor, samples)
    out = align(model, processor, samples, chain=ChainSettings(5.0))
    for sample, spans in zip(samples, out, strict=True):
        assert len(spans) == len(sample.utt.words)
        total = sample.audio.size / SAMPLE_RATE
        assert all(0.0 <= a <= b <= total + 1e-6 for a, b in spans)
    with pytest.raises(ValueError, match="one long-clip pass"):
        align(model, processor, samples, chain=ChainSettings(5.0), refine_seconds=5.0)
    with pytest.raises(ValueError, match="classes' range"):
        chain_align(model, processor, samples, ChainSettings(9.0))


def test_decode_config_validates_the_chain():
    DecodeConfig(align_chain_seconds=6.0).validate()
    with pytest.raises(ConfigError, match="align_chain_seconds"):
        DecodeConfig(align_chain_seconds=-1.0).validate()
    with pytest.raises(ConfigError, match="align_chain_fill"):
        DecodeConfig(align_chain_seconds=6.0, align_chain_fill=0.0).validate()
    with pytest.raises(ConfigError, match="align_chain_overlap"):
        DecodeConfig(align_chain_seconds=6.0, align_chain_overlap=-1).validate()
    with pytest.raises(ConfigError, match="align_chain_back_seconds"):
        DecodeConfig(align_chain_seconds=6.0, align_chain_back_seconds=-0.1).validate()
    decode = DecodeConfig(
        align_chain_seconds=3.0,
        align_chain_fill=0.6,
        align_chain_accept=0.3,
        align_chain_overlap=2,
        align_chain_back_seconds=0.1,
        align_chain_snap=False,
        align_chain_votes=3,
        align_chain_accept_spread=0.1,
        align_chain_vote_tolerance_seconds=0.3,
    )
    decode.validate()
    evaluator = align_eval.AlignmentEvaluator.from_decode_config(None, {}, decode)
    assert evaluator.chain == ChainSettings(3.0, 0.6, 0.3, 0.1, 2, False, 3, 0.1, 0.3)
    assert ChainSettings.from_decode(DecodeConfig()) == ChainSettings()  # the config's defaults are the library's
    for bad in ("accept", "votes"):
        with pytest.raises(ConfigError, match=f"align_chain_{bad}"):
            DecodeConfig(**{f"align_chain_{bad}": 0}).validate()
    with pytest.raises(ValueError, match="chain accept"):
        ChainSettings(3.0, accept=1.5).check()
    # the votes' accept shares must stay in (0, 1]: 0.3 +- 0.3 reaches 0
    with pytest.raises(ConfigError, match="align_chain_accept_spread"):
        DecodeConfig(align_chain_accept=0.3, align_chain_accept_spread=0.3).validate()
    with pytest.raises(ValueError, match="chain accept"):
        ChainSettings(3.0, accept=0.3, accept_spread=0.3).check()
    DecodeConfig(align_chain_accept=0.3, align_chain_accept_spread=0.3, align_chain_votes=1).validate()  # one chain
    ChainSettings(3.0, accept=0.3, accept_spread=0.3, votes=1).check()
    # 0.5 - 0.5 reaches 0, 0.9 + 0.125 passes 1, and a negative spread is refused
    for accept, spread in ((0.5, 0.5), (0.375, -0.125), (0.9, 0.125)):
        with pytest.raises(ConfigError, match="align_chain_accept_spread"):
            DecodeConfig(align_chain_accept=accept, align_chain_accept_spread=spread).validate()
        with pytest.raises(ValueError, match="chain accept"):
            ChainSettings(3.0, accept=accept, accept_spread=spread).check()
    ChainSettings(3.0, accept=0.5, accept_spread=0.4).check()  # 0.1 ... 0.9
    with pytest.raises(ConfigError, match="align_chain_seconds"):
        DecodeConfig(align_chain_seconds=6.0, align_refine_seconds=6.0).validate()


def test_a_window_span_is_cut_like_a_chain_window(tiny):
    """``span_window_seconds``: the audio is a slice of at most W seconds, its words are exactly those of the
    run that end inside it (times moved to the sample), and a clip longer than W is always cut."""
    _, processor = tiny
    window = 2.0
    collator = AlignerCollator(processor, NUM_CLASSES, 1.0, seed=5, span_prob=0.0, span_window_seconds=window)
    sample = _clip(20)  # 10.3 s
    starts = set()
    for epoch in range(60):
        got = collator.spanned(sample, epoch)
        cut = float(got.audio[0]) / SAMPLE_RATE
        starts.add(round(cut, 1))
        assert 0 < got.audio.size <= int(round(window * SAMPLE_RATE))  # at most one window, despite span_prob 0
        assert got.audio[-1] == got.audio[0] + got.audio.size - 1  # one contiguous slice of the ramp
        names = [int(w.word[1:]) for w in got.utt.words]
        assert names == list(range(names[0], names[0] + len(names)))
        stop = cut + got.audio.size / SAMPLE_RATE
        for w in got.utt.words:
            ref = sample.utt.words[int(w.word[1:])]
            assert w.start + cut == pytest.approx(ref.start, abs=1e-9)
            assert w.end + cut == pytest.approx(ref.end, abs=1e-9)
            assert ref.end <= stop + 1e-9  # every kept word ends inside the window
        a = names[0]
        assert a == 0 or 0.0 <= sample.utt.words[a].start - cut <= 0.3 + 1 / SAMPLE_RATE
    assert len(starts) > 10
    short = _clip(3)  # 1.7 s: shorter than the window, so span_prob (0) decides: untouched
    assert collator.spanned(short, 0) is short
    with pytest.raises(ValueError, match="span_window_seconds"):
        AlignerCollator(processor, NUM_CLASSES, 1.0, seed=0, span_window_seconds=-1.0)
    with pytest.raises(ConfigError, match="span_window_seconds"):
        AlignerConfig(span_window_seconds=6.0, slot_prior_tau=1.0).validate()
    tight = AlignerCollator(processor, NUM_CLASSES, 1.0, seed=0, span_window_seconds=0.2)  # shorter than a word
    with pytest.raises(ValueError, match="no word ends inside"):
        tight.spanned(sample, 0)


def test_long_form_items_are_batched_by_their_window(tmp_path):
    """A windowed :class:`LongFormDataset` reports the window, not the joined length, to the batch sampler."""
    from qwen3asr_train.data.aligner import LongFormDataset
    from qwen3asr_train.data.dataset import UtteranceDataset

    utts = [
        Utterance(
            id=f"u{k}",
            audio=str(tmp_path / f"u{k}.wav"),
            text="a b",
            language="English",
            words=[AlignedWord("a", 0.1, 0.5), AlignedWord("b", 0.6, 1.0)],
            duration=1.5 + k,
        )
        for k in range(4)
    ]
    base = UtteranceDataset(utts)
    plain = LongFormDataset(base, 30.0, 0.5, 375)
    windowed = LongFormDataset(base, 30.0, 0.5, 375, window_seconds=3.0)
    assert plain.durations()[:4] == [1.5, 2.5, 3.5, 4.5]
    assert plain.durations()[4:] == [pytest.approx(1.5 + 2.5 + 3.5 + 4.5 + 3 * 0.5)]  # one joined group
    assert windowed.durations() == [min(d, 3.0) for d in plain.durations()]


def _bursts(n_words: int, pause_after: int, pause_s: float = 1.0) -> Sample:
    """Words of 0.4 s noise bursts 0.1 s apart, silence before the first and after the last, and one long
    pause of ``pause_s`` after word ``pause_after``: real silence, so :func:`find_pauses` sees it."""
    rng = np.random.default_rng(0)
    words, t = [], 0.3
    for k in range(n_words):
        words.append(AlignedWord(f"w{k}", t, t + 0.4))
        t += 0.5 + (pause_s if k == pause_after else 0.0)
    total = words[-1].end + 0.3
    audio = np.zeros(int(round(total * SAMPLE_RATE)), dtype=np.float32)
    for w in words:
        a, b = int(round(w.start * SAMPLE_RATE)), int(round(w.end * SAMPLE_RATE))
        audio[a:b] = 0.3 * rng.standard_normal(b - a).astype(np.float32)
    utt = Utterance(
        id="bursts",
        audio="bursts.wav",
        text=" ".join(w.word for w in words),
        language="English",
        words=words,
        duration=total,
    )
    return Sample(utt, audio, 0)


def test_a_window_never_opens_deep_inside_a_pause(tiny, monkeypatch):
    """Pause snap: an anchor placed early, inside the long pause (a biased aligner), would open the next window
    on a second of silence; with ``snap`` it opens ``back_s`` before the pause's end instead."""
    from qwen3asr_train.eval.alignment import find_pauses

    model, processor = tiny
    sample = _bursts(16, pause_after=5)
    pauses = [p for p in find_pauses(sample.audio) if p[1] - p[0] > 0.5]
    assert len(pauses) == 1  # the long pause, seen in the audio
    a, b = pauses[0]
    truth = {w.word: (w.start, w.end) for w in sample.utt.words}

    def early(model, processor, collator, units, num_samples, *args):  # word 6 (after the pause) placed early
        out = [[] for _ in range(num_samples)]
        for i, t0, piece in units:
            for w in piece.utt.words:
                s, e = truth[w.word]
                if w.word == "w6":
                    s, e = a + 0.5, a + 0.9
                out[i].append((max(s, t0), max(e, t0)))
        return out

    for snap in (False, True):
        seen: list[float] = []

        def recording(model, processor, collator, units, num_samples, *args, seen=seen):
            seen.extend(t0 for _, t0, _ in units)
            return early(model, processor, collator, units, num_samples, *args)

        monkeypatch.setattr(align_eval, "_align_units", recording)
        chain_align(
            model, processor, [sample], ChainSettings(3.0, accept=0.5, back_s=0.15, overlap=1, snap=snap, votes=1)
        )
        inside = [t for t in seen if a <= t < b - 0.15 - 1e-6]
        assert bool(inside) is not snap  # without snap the chain opens a window deep inside the pause
        if snap:
            assert any(t == pytest.approx(b - 0.15, abs=1e-3) for t in seen)


def test_the_earliest_group_of_chains_by_hand():
    """Three chains of one clip: all agree on word 0; chain 1 goes late from word 1, chain 2 from word 2. The
    earliest group (starts within 0.2 s of the earliest) keeps the chains still on track; a plain median would
    take chain 1's late word 2."""
    from qwen3asr_train.eval.align_eval import earliest_group

    chains = [
        [(1.0, 1.2), (2.0, 2.2), (3.0, 3.2)],
        [(1.02, 1.25), (2.5, 2.7), (3.5, 3.7)],
        [(0.98, 1.18), (2.04, 2.3), (3.6, 3.8)],
    ]
    got = earliest_group(chains, 0.2)
    assert np.asarray(got) == pytest.approx(np.asarray([(1.0, 1.2), (2.02, 2.25), (3.0, 3.2)]), abs=1e-12)
    assert earliest_group(chains, 1.0)[2] == pytest.approx((3.5, 3.7))  # a tolerance past every gap: the median
    assert earliest_group([[], []], 0.2) == []


def test_votes_combine_whole_chains_at_spread_accept_shares(tiny, monkeypatch):
    """``votes=3``: three whole chains at accept 0.3, 0.4, 0.5 (0.4 +- 0.1), combined by the earliest group,
    built here a second way from three single chains run one by one. The aligner is the oracle with an error
    that depends on where its window opens, so chains with other accept shares (other windows) give other
    times. The votes run in lockstep and align a window several chains open identically only once: every
    clip's first window is run once, not once per chain, and fewer windows run in all than the singles need."""
    from qwen3asr_train.eval.align_eval import earliest_group

    model, processor = tiny
    samples = [_clip(30, index=0), _clip(24, seconds_per_word=0.7, index=1)]
    truth = {(s.index, w.word): (w.start, w.end) for s in samples for w in s.utt.words}
    calls: list[list[tuple[int, float, tuple[str, ...]]]] = []

    def noisy(model, processor, collator, units, num_samples, *args):
        calls.append([(piece.index, t0, tuple(w.word for w in piece.utt.words)) for _, t0, piece in units])
        out = [[] for _ in range(num_samples)]
        for j, t0, piece in units:
            for k, w in enumerate(piece.utt.words):
                start, end = truth[(piece.index, w.word)]
                error = 0.08 * np.sin(37.0 * t0 + k)  # up to 80 ms, set by the window
                out[j].append((start + error, end + error))
        return out

    monkeypatch.setattr(align_eval, "_align_units", noisy)
    base = ChainSettings(4.0, accept=0.4, accept_spread=0.1, vote_tolerance_s=0.05, votes=1, snap=False)
    singles = []
    single_windows = 0
    for share in (0.3, 0.4, 0.5):
        calls.clear()
        singles.append(chain_align(model, processor, samples, replace(base, accept=share)))
        single_windows += sum(len(c) for c in calls)
    assert singles[0] != singles[1] != singles[2]  # the shares make different chains
    calls.clear()
    voted = chain_align(model, processor, samples, replace(base, votes=3))
    assert [c[:2] for c in calls[0]] == [(0, 0.0), (1, 0.0)]  # one first window per clip, shared by 3 chains
    assert sum(len(c) for c in calls) < single_windows
    assert all(len(set(c)) == len(c) for c in calls)  # no window is run twice at one position
    for i, sample in enumerate(samples):
        assert len(voted[i]) == len(sample.utt.words)
        expected = earliest_group([s[i] for s in singles], 0.05)
        assert np.asarray(voted[i]) == pytest.approx(np.asarray(expected), abs=1e-9)
        median = np.median(np.stack([np.asarray(s[i]) for s in singles]), axis=0)
        assert not np.allclose(np.asarray(voted[i]), median)  # at 50 ms the groups are not all three chains
