"""Context-biasing evaluation: keyword recall, false alarms and WER on the other words as the hot-word list grows,
plus the no-speech hallucination rate at each list size.

Why: SFT and GSPO train context biasing (hot words in the system turn, a ``keyword_recall`` reward), but a biasing
model is only useful if recall stays high *and* the listed words that were not spoken stay out of the transcript
as the list grows (users report recall falling and false positives rising from 100 to 2,000 words). So every
utterance is decoded once per list size with a list built the way SFT builds context: the utterance's own
hot words plus distractors, comma-separated in a shuffled order, in the system turn (``data/prompts.py``).

Lists, per utterance (all draws seeded by ``(seed, set, utterance id)``, so a rerun decodes the same lists):

* **true hot words**: up to ``hotwords_per_utterance`` distinct candidate words of the reference
  (``data.collate.candidate_words``: 3+ character words, 2–4 character spans for CER languages), the rarest in the
  word pool first (rare/content words are what users list), ties broken at random. They are the same at every
  size, including size 0, which measures their recall without any list (the baseline).
* **distractors**: ``size − #true`` words drawn from the pool (candidate words of the evaluation texts and of
  ``pool_manifests``), never a word of the utterance's own reference. Lists are nested: the distractors of a
  smaller list are the first ones of the larger list. When the pool is too small, the list is as long as the
  pool allows; the report gives the mean list length actually used.
* no-speech items (``language None`` or an empty reference) get distractors only.

Metrics per set and size (words compared after the evaluation normaliser, in the set's error units; a hot word
"appears" when its units occur contiguously — the same rule as the ``keyword_recall`` reward):

* ``recall``: true hot words found in the hypothesis / true hot words (pooled over utterances).
* ``false_alarm_rate``: distractors that appear in the hypothesis (never in the reference, by construction) /
  distractors listed (pooled, "per distractor"); ``false_alarm_utterance_rate``: speech utterances with at least
  one such distractor / speech utterances with a non-empty distractor list ("per utterance").
* ``u_wer`` (unbiased WER): errors on reference units outside the true hot words, plus insertions of units
  outside any listed word, over the number of reference units outside the true hot words; ``b_wer`` the same for
  the true hot words (insertions of listed words count here). Substitutions and deletions are charged to the
  reference unit they hit, as in Le et al. 2021 ("U-WER/B-WER").
* ``hallucination_rate``: no-speech items whose transcript is not empty / no-speech items (``None`` without any).

Size 0 has no distractors, so its false-alarm rates are ``None``.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3asr_train.data.collate import candidate_words
from qwen3asr_train.eval.metrics import align, parse_asr_output, tokenize, unit_for_language
from qwen3asr_train.eval.normalize import NormalizerOptions, check_language

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ lists


@dataclass(frozen=True)
class BiasingItem:
    """One utterance of a biasing evaluation: its true hot words and its distractor order (longest list)."""

    id: str
    language: str | None
    reference: str
    true_words: tuple[str, ...]
    distractors: tuple[str, ...]

    @property
    def no_speech(self) -> bool:
        return self.language is None or not self.reference.strip()

    def hot_list(self, size: int, seed: int) -> list[str]:
        """The list of ``size`` words (fewer when the pool is short): true words first, then distractors,
        shuffled by a seeded draw so the true words are not always at the front."""
        if size <= 0:
            return []
        true = list(self.true_words[:size])
        words = true + list(self.distractors[: max(size - len(true), 0)])
        random.Random(zlib.crc32(f"biasing-order/{seed}/{self.id}/{size}".encode())).shuffle(words)
        return words

    def listed_distractors(self, size: int) -> tuple[str, ...]:
        """The distractors in the list of ``size`` words."""
        if size <= 0:
            return ()
        return self.distractors[: max(size - min(len(self.true_words), size), 0)]


def word_pool(texts: Iterable[tuple[str, str | None]]) -> Counter[str]:
    """Candidate words of ``(text, language)`` pairs with their counts (the distractor pool and rarity ranks)."""
    pool: Counter[str] = Counter()
    for text, language in texts:
        if language is not None and text.strip():
            pool.update(candidate_words(text, language))
    return pool


def build_items(
    set_name: str,
    rows: Sequence[tuple[str, str | None, str]],
    pool: Mapping[str, int],
    max_size: int,
    hotwords_per_utterance: int,
    seed: int,
    options: NormalizerOptions | None = None,
) -> list[BiasingItem]:
    """Biasing items of one set from ``(id, language, reference)`` rows (see the module docstring for the rules).

    ``max_size`` bounds the distractors drawn (the longest list); words whose normalised form occurs in the
    reference are never distractors of that utterance, so a listed distractor in the hypothesis is a false alarm.
    """
    opts = options or NormalizerOptions()
    vocabulary = sorted(pool)
    units_of: dict[str | None, dict[str, tuple[str, ...]]] = {}  # language -> word -> its normalised units
    items = []
    for utt_id, language, reference in rows:
        rng = random.Random(zlib.crc32(f"biasing/{seed}/{set_name}/{utt_id}".encode()))
        language = check_language(language)
        true: tuple[str, ...] = ()
        ref_units: list[str] = []
        if language is not None and reference.strip():
            unit = unit_for_language(language)
            ref_units = tokenize(opts.apply(reference, language), unit)
            own = list(dict.fromkeys(candidate_words(reference, language)))
            rng.shuffle(own)  # random tie-break, then a stable sort by rarity
            own = [w for w in sorted(own, key=lambda w: pool.get(w, 0)) if _units(w, language, opts)]
            true = tuple(own[:hotwords_per_utterance])
        if language not in units_of:
            units_of[language] = {w: _units(w, language, opts) for w in vocabulary}
        forbidden = {w for w, u in units_of[language].items() if _contains(ref_units, u)} | set(true)
        candidates = [w for w in vocabulary if w not in forbidden]
        take = min(max(max_size, 0), len(candidates))
        items.append(BiasingItem(utt_id, language, reference, true, tuple(rng.sample(candidates, take))))
    return items


def _units(word: str, language: str | None, options: NormalizerOptions) -> tuple[str, ...]:
    unit = unit_for_language(language)
    return tuple(tokenize(options.apply(word, language), unit))


def _contains(units: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(tuple(units[i : i + n]) == tuple(needle) for i in range(len(units) - n + 1))


def _covered(units: Sequence[str], needles: Iterable[Sequence[str]]) -> list[bool]:
    """Per unit: does it lie inside an occurrence of one of ``needles``?"""
    marks = [False] * len(units)
    for needle in needles:
        n = len(needle)
        if n == 0:
            continue
        for i in range(len(units) - n + 1):
            if tuple(units[i : i + n]) == tuple(needle):
                marks[i : i + n] = [True] * n
    return marks


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class BiasingCounts:
    """Counts of one (set, size); rates are derived so that sets and sizes pool by addition."""

    true_words: int = 0
    true_found: int = 0
    distractors: int = 0
    false_alarms: int = 0
    speech_with_distractors: int = 0
    speech_with_false_alarm: int = 0
    u_ref: int = 0
    u_errors: int = 0
    b_ref: int = 0
    b_errors: int = 0
    no_speech: int = 0
    hallucinated: int = 0
    list_words: int = 0
    utterances: int = 0
    false_alarm_words: Counter[str] = field(default_factory=Counter)

    def rates(self) -> dict[str, float | None]:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        return {
            "recall": ratio(self.true_found, self.true_words),
            "false_alarm_rate": ratio(self.false_alarms, self.distractors),
            "false_alarm_utterance_rate": ratio(self.speech_with_false_alarm, self.speech_with_distractors),
            "u_wer": ratio(self.u_errors, self.u_ref),
            "b_wer": ratio(self.b_errors, self.b_ref),
            "hallucination_rate": ratio(self.hallucinated, self.no_speech),
            "mean_list_size": ratio(self.list_words, self.utterances),
        }

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "false_alarm_words"}
        out["top_false_alarms"] = self.false_alarm_words.most_common(10)
        return {**out, **self.rates()}


def score_item(
    counts: BiasingCounts,
    item: BiasingItem,
    size: int,
    hypothesis: str,
    forced_language: str | None = None,
    options: NormalizerOptions | None = None,
) -> None:
    """Add one decoded utterance at one list size to ``counts`` (``hypothesis`` is the raw model output)."""
    opts = options or NormalizerOptions()
    text = parse_asr_output(hypothesis, forced_language).text
    listed = item.listed_distractors(size)
    counts.utterances += 1
    counts.list_words += len(item.hot_list(size, 0))
    if item.no_speech:
        counts.no_speech += 1
        counts.hallucinated += int(bool(text.strip()))
        return
    language = item.language
    unit = unit_for_language(language)
    ref = tokenize(opts.apply(item.reference, language), unit)
    hyp = tokenize(opts.apply(text, language), unit)
    true_units = [_units(w, language, opts) for w in item.true_words]
    counts.true_words += len(true_units)
    counts.true_found += sum(_contains(hyp, u) for u in true_units)
    alarms = [w for w in listed if _contains(hyp, _units(w, language, opts))]
    counts.distractors += len(listed)
    counts.false_alarms += len(alarms)
    counts.false_alarm_words.update(alarms)
    if listed:
        counts.speech_with_distractors += 1
        counts.speech_with_false_alarm += int(bool(alarms))
    hot_ref = _covered(ref, true_units)
    listed_units = [_units(w, language, opts) for w in (*item.true_words[: max(size, 0)], *listed)]
    hot_hyp = _covered(hyp, listed_units)
    counts.b_ref += sum(hot_ref)
    counts.u_ref += len(ref) - sum(hot_ref)
    i = j = 0  # positions in ref / hyp while walking the alignment
    for op in align(ref, hyp):
        if op.op in ("hit", "sub", "del"):
            error = op.op != "hit"
            if hot_ref[i]:
                counts.b_errors += error
            else:
                counts.u_errors += error
            i += 1
            j += op.op != "del"
        else:  # insertion
            if hot_hyp[j]:
                counts.b_errors += 1
            else:
                counts.u_errors += 1
            j += 1


# ------------------------------------------------------------------------------------------------ decoding


def evaluate_biasing(
    model: Any,
    processor: Any,
    sets: Mapping[str, Sequence[Any]],
    decode_opts: Any,
    cfg: Any,
    extra_texts: Iterable[tuple[str, str | None]] = (),
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Decode every set once per list size with the hot-word list in the system turn; score it.

    ``sets``: name -> decoded samples (``data.dataset.Sample``); ``decode_opts``: the ``DecodeConfig`` used
    (its ``use_context`` is forced on, ``forced_language`` kept); ``cfg``: a ``BiasingConfig``; ``extra_texts``:
    more ``(text, language)`` pairs for the distractor pool. Every rank must call it (decoding is sharded);
    returns ``(summary, rows)`` where rows are the per-utterance lists and hypotheses, for the report.
    """
    from dataclasses import replace

    from qwen3asr_train.data.dataset import Sample
    from qwen3asr_train.eval.decode import decode_distributed

    chosen = {
        name: list(samples)[: cfg.max_utterances] if cfg.max_utterances > 0 else list(samples)
        for name, samples in sets.items()
    }
    texts = [(s.utt.text, s.utt.language) for samples in sets.values() for s in samples]
    pool = word_pool([*texts, *extra_texts])
    sizes = sorted(int(n) for n in cfg.sizes)
    opts = replace(decode_opts, use_context=True)
    counts: dict[str, dict[int, BiasingCounts]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, samples in chosen.items():
        items = build_items(
            name,
            [(s.utt.id, s.utt.language, s.utt.text) for s in samples],
            pool,
            max(sizes),
            cfg.hotwords_per_utterance,
            cfg.seed,
        )
        counts[name] = {}
        rows[name] = []
        for size in sizes:
            biased = [
                Sample(replace(s.utt, context=", ".join(item.hot_list(size, cfg.seed))), s.audio, s.index)
                for s, item in zip(samples, items, strict=True)
            ]
            results = decode_distributed(model, processor, biased, opts)
            c = counts[name][size] = BiasingCounts()
            for item, sample, result in zip(items, biased, results, strict=True):
                score_item(c, item, size, result.hypothesis, result.forced_language)
                rows[name].append(
                    {
                        "id": item.id,
                        "size": size,
                        "context": sample.utt.context,
                        "true_words": list(item.true_words),
                        "distractors": list(item.listed_distractors(size)),
                        "reference": item.reference,
                        "hypothesis": result.hypothesis,
                    }
                )
        log.info("biasing set %s: %d utterances x sizes %s, pool %d words", name, len(samples), sizes, len(pool))
    settings = {
        "sizes": sizes,
        "hotwords_per_utterance": cfg.hotwords_per_utterance,
        "seed": cfg.seed,
        "pool_words": len(pool),
        "utterances": {name: len(samples) for name, samples in chosen.items()},
    }
    return {"settings": settings, "sets": summarize(counts)}, rows


# ------------------------------------------------------------------------------------------------ reports


def summarize(counts: Mapping[str, Mapping[int, BiasingCounts]]) -> dict[str, Any]:
    """``{set: {size: counts + rates}}`` (sizes as strings, JSON keys), sizes ascending."""
    return {name: {str(size): c.as_dict() for size, c in sorted(per_size.items())} for name, per_size in counts.items()}


def log_metrics(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float]:
    """Flat metrics ``val/<set>/biasing/<size>/<rate>`` for every defined rate."""
    out: dict[str, float] = {}
    for name, per_size in summary.items():
        for size, entry in per_size.items():
            for key in ("recall", "false_alarm_rate", "false_alarm_utterance_rate", "u_wer", "b_wer"):
                if entry.get(key) is not None:
                    out[f"val/{name}/biasing/{size}/{key}"] = float(entry[key])
            if entry.get("hallucination_rate") is not None:
                out[f"val/{name}/biasing/{size}/hallucination_rate"] = float(entry["hallucination_rate"])
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Markdown table, one row per set and list size."""
    header = (
        "| set | list size | mean words listed | recall % | false alarms % (per distractor) | "
        "false alarms % (per utterance) | U-WER % | B-WER % | no-speech hallucination % |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, per_size in summary.items():
        for size, e in per_size.items():
            lines.append(
                f"| {name} | {size} | {e['mean_list_size'] or 0:.1f} | {_pct(e['recall'])} "
                f"({e['true_found']}/{e['true_words']}) | {_pct(e['false_alarm_rate'])} "
                f"({e['false_alarms']}/{e['distractors']}) | {_pct(e['false_alarm_utterance_rate'])} | "
                f"{_pct(e['u_wer'])} | {_pct(e['b_wer'])} | {_pct(e['hallucination_rate'])} |"
            )
    return "\n".join(lines) + "\n"


def write_biasing_report(
    out_dir: str | Path,
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    settings: Mapping[str, Any],
    hypotheses: Mapping[str, list[dict[str, Any]]],
    title: str | None = None,
) -> dict[str, Path]:
    """``biasing_summary.{md,json}``, ``biasing.png`` and ``biasing-<set>.jsonl`` (lists and hypotheses)."""
    from qwen3asr_train.eval.plots import plot_biasing

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "biasing_summary.md", "json": out / "biasing_summary.json", "plot": out / "biasing.png"}
    plot_biasing(paths["plot"], summary, f"context biasing: {title or out.name}")
    heading = f"# Context biasing: {title}\n\n" if title else "# Context biasing\n\n"
    legend = (
        "\nRecall: true hot words found / listed. False alarms: listed distractors (never in the reference) found "
        "in the hypothesis, per distractor and per utterance. U-WER / B-WER: WER on the words outside / inside the "
        "true hot words. Definitions: `qwen3asr_train/eval/biasing.py`.\n"
    )
    chart = f"\n![recall and false alarms vs list size]({paths['plot'].name})\n"
    paths["markdown"].write_text(heading + format_table(summary) + legend + chart, encoding="utf-8")
    payload = {"settings": dict(settings), "title": title, "sets": summary}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, rows in hypotheses.items():
        path = out / f"biasing-{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[f"rows-{name}"] = path
    log.info("context biasing:\n%s", format_table(summary))
    return paths


__all__ = [
    "BiasingCounts",
    "BiasingItem",
    "build_items",
    "evaluate_biasing",
    "format_table",
    "log_metrics",
    "score_item",
    "summarize",
    "word_pool",
    "write_biasing_report",
]
