"""Evaluation artifacts (icefall-style files, one summary table and chart) and the logged metric names.

Why this module exists: a number in a training log is only trustworthy if it can be traced to the
utterances behind it. Every evaluation therefore goes through one path — parse the raw output
(:func:`~qwen3asr_train.eval.metrics.parse_asr_output`, loops kept), score it with the shared
:class:`~qwen3asr_train.eval.metrics.MetricAggregator`, flag repetitions — and writes files from which
the same numbers can be recomputed (:func:`rescore_recogs`; the tests check equality).

Files, per set, in the output directory (ids sorted, text escaped so one utterance field is one line:
``\\`` -> ``\\\\``, newline -> ``\\n``, CR -> ``\\r``, tab -> ``\\t``):

* ``recogs-<set>.txt`` — ``id:\\tref=<reference>``, ``id:\\thyp=<parsed transcript>``,
  ``id:\\traw=<raw model output>``; diffable between runs and enough (with the languages in
  ``results-<set>.jsonl``) to re-score.
* ``errs-<set>.txt`` — corpus rates per language with S/D/I/hits, then per-utterance alignments
  (``(ref->hyp)``, ``*`` = nothing), then the most frequent substitutions, deletions and insertions.
* ``wer-summary-<set>.txt`` — one tab-separated line per language, the corpus and macro lines, then
  LID accuracy, no-speech precision/recall, format errors, repetitions, truncations.
* ``results-<set>.jsonl`` — one JSON record per utterance, including the scoring settings.

Over all sets: ``summary.md`` (:func:`format_table`, linking the chart), ``summary.json`` and
``error_rates.png`` (``eval/plots.py``: fixed 0-100 % axis, model and step in the title).

Logged metric names (:func:`log_metrics`; ``<metric>`` is ``wer``, ``cer`` or ``mer`` as the
aggregator scored the language; languages are canonical names; "speech languages" are those with
reference units, so the no-speech group ``None`` never counts):

* ``val/<set>/<metric>`` — corpus rate of the set, when all its speech languages share one metric.
* ``val/<set>/macro_er`` and ``val/<set>/<lang>/<metric>`` — when the set has two or more speech
  languages (always the case for a mixed-family set, which then has no ``val/<set>/<metric>``).
* ``val/<set>/sub_rate``, ``del_rate``, ``ins_rate`` — S, D, I over the set's reference units (units
  of different families are pooled as they come, like the corpus rate).
* ``val/<set>/lid_acc`` — over unforced speech items (absent when there are none).
* ``val/<set>/no_speech_precision``, ``no_speech_recall`` — when defined;
  ``val/<set>/hallucination_rate`` — when the set has no-speech references.
* ``val/<set>/format_errors``, ``repetitions``, ``truncated`` — counts (as floats).

Rates are fractions (0.25), files and tables show percentages. Only one process (rank 0) should write.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwen3asr_train.data.manifest import read_jsonl
from qwen3asr_train.eval.metrics import (
    METRIC_NAMES,
    AlignOp,
    ErrorCounts,
    MetricAggregator,
    ParsedOutput,
    RepetitionReport,
    detect_repetition,
    format_alignment,
    parse_asr_output,
)
from qwen3asr_train.eval.normalize import NORMALIZER_VERSION, NormalizerOptions, check_language
from qwen3asr_train.languages import NO_SPEECH

logger = logging.getLogger(__name__)


@dataclass
class DecodeResult:
    """One decoded utterance (``language`` is the reference language; None = no speech). Defined here, not in
    ``decode.py``, so reports and re-scoring need no torch."""

    id: str
    language: str | None
    reference: str
    hypothesis: str
    audio_seconds: float
    truncated: bool
    forced_language: str | None = None
    dialect: str | None = None


_ESCAPE = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_UNESCAPE = re.compile(r"\\([\\nrt])")
_UNESCAPED = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def _escape(text: str) -> str:
    return text.translate(_ESCAPE)


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(lambda m: _UNESCAPED[m.group(1)], text)


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.2f}"


@dataclass
class UtteranceRecord:
    """One scored utterance: what was compared, how it was parsed and scored, and its flags.

    ``language`` is the reference language (``None`` = no speech); ``text`` is the parsed transcript
    that was scored (the whole output when the format was broken); ``alignment`` is the
    :func:`format_alignment` string and ``ops`` the alignment it came from.
    """

    id: str
    language: str | None
    reference: str
    hypothesis: str
    parsed_language: str | None
    text: str
    no_speech: bool
    format_ok: bool
    language_forced: bool
    unit: str
    counts: ErrorCounts
    alignment: str
    repetition_report: RepetitionReport
    truncated: bool
    audio_seconds: float
    forced_language: str | None = None
    dialect: str | None = None
    ops: list[AlignOp] = field(default_factory=list, repr=False)

    @property
    def repetition(self) -> bool:
        """A loop or an output too long for the audio."""
        return self.repetition_report.flagged

    @property
    def metric(self) -> str:
        return METRIC_NAMES[self.unit]

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record (no ``ops``: the alignment string carries them for humans)."""
        rep = self.repetition_report
        return {
            "id": self.id,
            "language": self.language,
            "dialect": self.dialect,
            "reference": self.reference,
            "hypothesis": self.hypothesis,
            "parsed_language": self.parsed_language,
            "text": self.text,
            "no_speech": self.no_speech,
            "format_ok": self.format_ok,
            "language_forced": self.language_forced,
            "forced_language": self.forced_language,
            "unit": self.unit,
            "metric": self.metric,
            "counts": self.counts.as_dict(),
            "alignment": self.alignment,
            "repetition": self.repetition,
            "loop": rep.loop,
            "too_long": rep.too_long,
            "repeated_ngram": list(rep.ngram) if rep.ngram else None,
            "repeats": rep.repeats,
            "truncated": self.truncated,
            "audio_seconds": self.audio_seconds,
        }


# ------------------------------------------------------------------------------------------ scoring


def _score_one(
    aggregator: MetricAggregator, set_name: str, result: DecodeResult, parsed: ParsedOutput
) -> UtteranceRecord:
    language = check_language(result.language)
    score = aggregator.add(set_name, language, result.reference, parsed)
    seconds = result.audio_seconds if result.audio_seconds > 0 else None
    rep = detect_repetition(parsed.text, language, seconds, unit=aggregator.unit, options=aggregator.options)
    return UtteranceRecord(
        id=result.id,
        language=language,
        reference=result.reference,
        hypothesis=result.hypothesis,
        parsed_language=parsed.language,
        text=parsed.text,
        no_speech=parsed.no_speech,
        format_ok=parsed.format_ok,
        language_forced=parsed.language_forced,
        unit=score.unit,
        counts=score.counts,
        alignment=format_alignment(score.alignment),
        repetition_report=rep,
        truncated=result.truncated,
        audio_seconds=result.audio_seconds,
        forced_language=result.forced_language,
        dialect=result.dialect,
        ops=score.alignment,
    )


def _check_ids(set_name: str, ids: Sequence[str]) -> None:
    if "/" in set_name or "\\" in set_name or not set_name:
        raise ValueError(f"set name {set_name!r} must be non-empty and free of path separators")
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ValueError(f"set {set_name!r}: duplicate utterance ids {dupes[:5]}")


def score_results(
    set_name: str, results: Sequence[DecodeResult], aggregator: MetricAggregator | None = None
) -> tuple[MetricAggregator, list[UtteranceRecord]]:
    """Parse (honouring ``forced_language``), score and repetition-check every result of one set.

    Scores go into ``aggregator`` (a new default one when ``None``) under ``set_name`` and the
    reference language; call once per set, since the written files hold exactly these records.
    """
    aggregator = aggregator or MetricAggregator()
    _check_ids(set_name, [r.id for r in results])
    records = [_score_one(aggregator, set_name, r, parse_asr_output(r.hypothesis, r.forced_language)) for r in results]
    return aggregator, records


def summarize_set(aggregator: MetricAggregator, set_name: str, records: Sequence[UtteranceRecord]) -> dict[str, Any]:
    """The aggregator's summary of ``set_name`` plus what only the records know.

    Adds per language and per set: ``format_errors`` (per language), ``repetitions`` and ``truncated``
    counts, and the ``scoring`` settings (unit mode, normaliser version and options) so that every
    number travels with how it was made.
    """
    sets = aggregator.summary()["sets"]
    if set_name not in sets:
        raise ValueError(f"set {set_name!r} has no scored items")
    summary = sets[set_name]
    for lang, entry in summary["languages"].items():
        mine = [r for r in records if (r.language or NO_SPEECH) == lang]
        entry["format_errors"] = sum(not r.format_ok for r in mine)
        entry["repetitions"] = sum(r.repetition for r in mine)
        entry["truncated"] = sum(r.truncated for r in mine)
    summary["repetitions"] = sum(r.repetition for r in records)
    summary["truncated"] = sum(r.truncated for r in records)
    summary["scoring"] = {"unit": aggregator.unit or "by-language", **aggregator.options.as_dict()}
    return summary


def _speech_languages(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {lang: v for lang, v in summary["languages"].items() if v["ref_units"]}


def log_metrics(summary: Mapping[str, Mapping[str, Any]], set_name: str) -> dict[str, float]:
    """Flat ``val/<set>/...`` metrics of one set from ``{set: summarize_set(...)}`` (names: module docstring)."""
    s = summary[set_name]
    p = f"val/{set_name}"
    speech = _speech_languages(s)
    families = {v["metric"] for v in speech.values()}
    out: dict[str, float] = {}
    if len(families) == 1:
        out[f"{p}/{families.pop()}"] = s["corpus"]["rate"]
    if len(speech) > 1:
        out[f"{p}/macro_er"] = s["macro"]
        out.update({f"{p}/{lang}/{v['metric']}": v["rate"] for lang, v in speech.items()})
    corpus = s["corpus"]
    if corpus["ref_units"]:
        for key, name in (("sub_rate", "substitutions"), ("del_rate", "deletions"), ("ins_rate", "insertions")):
            out[f"{p}/{key}"] = corpus[name] / corpus["ref_units"]
    if s["lid"] and s["lid"]["accuracy"] is not None:
        out[f"{p}/lid_acc"] = s["lid"]["accuracy"]
    for key in ("precision", "recall"):
        if s["no_speech"] and s["no_speech"][key] is not None:
            out[f"{p}/no_speech_{key}"] = s["no_speech"][key]
    if corpus["empty_refs"]:
        out[f"{p}/hallucination_rate"] = corpus["hallucination_rate"]
    for key in ("format_errors", "repetitions", "truncated"):
        out[f"{p}/{key}"] = float(s[key])
    return out


# ------------------------------------------------------------------------------------------ writers


def _rate_line(metric: str, c: Mapping[str, Any], label: str) -> str:
    return (
        f"%{metric.upper()} {_pct(c['rate'])} [ {c['substitutions'] + c['deletions'] + c['insertions']} / "
        f"{c['ref_units']}, {c['insertions']} ins, {c['deletions']} del, {c['substitutions']} sub ] "
        f"{label} (hits {c['hits']}, utterances {c['utterances']})"
    )


def _no_speech_line(lang: str, c: Mapping[str, Any]) -> str:
    return (
        f"{lang}: {c['empty_refs']} no-speech reference(s), {c['hallucinations']} hallucinated "
        f"({c['hallucinated_units']} units, rate {_pct(c['hallucination_rate'])}%)"
    )


def _write_recogs(path: Path, records: Sequence[UtteranceRecord]) -> None:
    lines = []
    for r in records:
        utt = _escape(r.id)
        lines += [f"{utt}:\tref={_escape(r.reference)}", f"{utt}:\thyp={_escape(r.text)}"]
        lines.append(f"{utt}:\traw={_escape(r.hypothesis)}")
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _write_errs(path: Path, set_name: str, records: Sequence[UtteranceRecord], s: Mapping[str, Any], top: int) -> None:
    sc = s["scoring"]
    lines = [f"# set {set_name}: normaliser {sc['normalizer_version']}, unit {sc['unit']}"]
    for lang, c in s["languages"].items():
        lines.append(_rate_line(c["metric"], c, lang) if c["ref_units"] else _no_speech_line(lang, c))
    if len(_speech_languages(s)) > 1:
        lines.append(f"%MACRO {_pct(s['macro'])} (unweighted mean over languages)")
    lines += ["", "PER-UTT DETAILS: (ref->hyp) marks an error, * = nothing"]
    for r in records:
        flags = [n for n, on in (("format-error", not r.format_ok), ("repetition", r.repetition)) if on]
        flags += ["truncated"] * r.truncated + ["no-speech-ref"] * bool(r.counts.empty_refs)
        lines.append(f"{_escape(r.id)}:\t{_escape(r.alignment)}" + (f"\t# {','.join(flags)}" if flags else ""))
    subs: Counter[tuple[str, str]] = Counter()
    dels: Counter[str] = Counter()
    ins: Counter[str] = Counter()
    for r in records:
        if r.counts.empty_refs:  # hallucinated units are not insertions (see metrics)
            continue
        for op in r.ops:
            if op.op == "sub":
                subs[(str(op.ref), str(op.hyp))] += 1
            elif op.op == "del":
                dels[str(op.ref)] += 1
            elif op.op == "ins":
                ins[str(op.hyp)] += 1
    lines += ["", f"SUBSTITUTIONS (top {top}): count ref -> hyp"]
    lines += [f"{n}\t{_escape(a)} -> {_escape(b)}" for (a, b), n in subs.most_common(top)]
    lines += ["", f"DELETIONS (top {top}): count ref"]
    lines += [f"{n}\t{_escape(a)}" for a, n in dels.most_common(top)]
    lines += ["", f"INSERTIONS (top {top}): count hyp"]
    lines += [f"{n}\t{_escape(b)}" for b, n in ins.most_common(top)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_wer_summary(path: Path, s: Mapping[str, Any]) -> None:
    lines = ["settings\tmetric\trate(%)\tS\tD\tI\tref_units\tutterances"]

    def row(name: str, metric: str, rate: float | None, c: Mapping[str, Any]) -> str:
        counts = (c["substitutions"], c["deletions"], c["insertions"], c["ref_units"], c["utterances"])
        return "\t".join([name, metric, _pct(rate), *map(str, counts)])

    speech = _speech_languages(s)
    for lang, c in speech.items():
        lines.append(row(lang, c["metric"], c["rate"], c))
    families = {c["metric"] for c in speech.values()}
    if speech:
        lines.append(row("corpus", families.pop() if len(families) == 1 else "er", s["corpus"]["rate"], s["corpus"]))
        lines.append("\t".join(["macro", "er", _pct(s["macro"])]))
    for lang, c in s["languages"].items():
        if not c["ref_units"]:
            lines.append(f"no_speech_refs[{lang}]\t{c['empty_refs']}\thallucinated\t{c['hallucinations']}")
    if s["lid"]:
        lines.append(f"lid_accuracy\t{_pct(s['lid']['accuracy'])}\t{s['lid']['correct']}/{s['lid']['total']}")
    if s["no_speech"]:
        ns = s["no_speech"]
        lines.append(f"no_speech_precision\t{_pct(ns['precision'])}\t{ns['tp']}/{ns['tp'] + ns['fp']}")
        lines.append(f"no_speech_recall\t{_pct(ns['recall'])}\t{ns['tp']}/{ns['tp'] + ns['fn']}")
    lines += [f"{key}\t{s[key]}" for key in ("format_errors", "repetitions", "truncated")]
    lines.append(f"normalizer_version\t{s['scoring']['normalizer_version']}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_set_reports(
    out_dir: str | Path,
    set_name: str,
    records: Sequence[UtteranceRecord],
    summary: Mapping[str, Any],
    *,
    top_errors: int = 100,
) -> dict[str, Path]:
    """Write ``recogs``/``errs``/``wer-summary``/``results`` files of one set; returns ``{kind: path}``.

    ``summary`` is :func:`summarize_set` of the same records. Records are written sorted by id so
    that files of two runs diff line by line.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_ids(set_name, [r.id for r in records])
    ordered = sorted(records, key=lambda r: r.id)
    paths = {kind: out / f"{kind}-{set_name}.{ext}" for kind, ext in (("recogs", "txt"), ("errs", "txt"))}
    paths["wer-summary"] = out / f"wer-summary-{set_name}.txt"
    paths["results"] = out / f"results-{set_name}.jsonl"
    _write_recogs(paths["recogs"], ordered)
    _write_errs(paths["errs"], set_name, ordered, summary, top_errors)
    _write_wer_summary(paths["wer-summary"], summary)
    with paths["results"].open("w", encoding="utf-8") as f:
        for r in ordered:
            f.write(json.dumps({"set": set_name, **r.as_json(), "scoring": summary["scoring"]}, ensure_ascii=False))
            f.write("\n")
    logger.info("wrote evaluation files of set %s to %s", set_name, out)
    return paths


# ------------------------------------------------------------------------------------ cross-set summary

_COLUMNS = (
    "set",
    "language",
    "metric",
    "ER %",
    "S",
    "D",
    "I",
    "ref units",
    "utts",
    "LID %",
    "no-speech P %",
    "no-speech R %",
    "format errors",
    "repetitions",
    "truncated",
)


def format_table(summary_by_set: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table: a row per set × language, then a ``macro`` row per set with set-level stats.

    The no-speech group (language ``None``) shows its hallucination rate in the ER column. A footnote
    gives the scoring settings of each set.
    """
    rows = [_COLUMNS]
    settings = []
    for set_name, s in summary_by_set.items():
        for lang, c in s["languages"].items():
            metric, rate = (c["metric"], c["rate"]) if c["ref_units"] else ("halluc.", c["hallucination_rate"])
            counts = (c["substitutions"], c["deletions"], c["insertions"], c["ref_units"], c["utterances"])
            tail = (c["format_errors"], c["repetitions"], c["truncated"])
            rows.append((set_name, lang, metric, _pct(rate), *counts, "", "", "", *tail))
        c, ns = s["corpus"], s["no_speech"] or {}
        counts = (c["substitutions"], c["deletions"], c["insertions"], c["ref_units"], c["utterances"])
        lid = _pct(s["lid"]["accuracy"]) if s["lid"] else "-"
        set_stats = (lid, _pct(ns.get("precision")), _pct(ns.get("recall")))
        tail = (s["format_errors"], s["repetitions"], s["truncated"])
        rows.append((set_name, "**macro**", "er", _pct(s["macro"]), *counts, *set_stats, *tail))
        sc = s["scoring"]
        options = ", ".join(f"{k}={v}" for k, v in sc.items() if k not in ("unit", "normalizer_version"))
        settings.append(f"{set_name}: normaliser {sc['normalizer_version']} ({options}), unit {sc['unit']}")
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(_COLUMNS))
    return "\n".join(lines) + "\n\nScoring: " + "; ".join(settings) + "\n"


def write_summary(
    out_dir: str | Path, summary_by_set: Mapping[str, Mapping[str, Any]], title: str | None = None
) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.json`` and ``error_rates.png`` over all sets; returns the paths.

    ``title`` says what was evaluated (model and step, e.g. ``"exp/sft/export, step 1200"``); it heads the
    chart and ``summary.md``, which links the chart. The chart (:func:`qwen3asr_train.eval.plots.plot_error_rates`)
    uses a fixed 0-100 % axis so charts of different runs compare by eye.
    """
    from qwen3asr_train.eval.plots import plot_error_rates

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "summary.md", "json": out / "summary.json", "plot": out / "error_rates.png"}
    heading = f"# Evaluation: {title}\n\n" if title else ""
    chart = f"\n![error rate per language]({paths['plot'].name})\n"
    paths["markdown"].write_text(heading + format_table(summary_by_set) + chart, encoding="utf-8")
    payload = {"normalizer_version": NORMALIZER_VERSION, "title": title, "sets": summary_by_set}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    has_speech = any(_speech_languages(s) for s in summary_by_set.values())
    if has_speech:
        plot_error_rates(
            paths["plot"], {title or out.name: summary_by_set}, f"error rate per language: {title or out.name}"
        )
    else:  # only no-speech references: there is no error rate to draw
        paths["plot"].unlink(missing_ok=True)
        del paths["plot"]
        paths["markdown"].write_text(heading + format_table(summary_by_set), encoding="utf-8")
    return paths


def write_reports(
    out_dir: str | Path,
    results_by_set: Mapping[str, Sequence[DecodeResult]],
    aggregator: MetricAggregator | None = None,
    title: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every set, write all files, log the table; returns ``{set: summarize_set(...)}``.

    ``title``: model and step, for ``summary.md`` and the chart (see :func:`write_summary`)."""
    aggregator = aggregator or MetricAggregator()
    summary_by_set = {}
    for set_name, results in results_by_set.items():
        _, records = score_results(set_name, results, aggregator)
        summary_by_set[set_name] = summarize_set(aggregator, set_name, records)
        write_set_reports(out_dir, set_name, records, summary_by_set[set_name])
    write_summary(out_dir, summary_by_set, title)
    logger.info("evaluation summary:\n%s", format_table(summary_by_set))
    return summary_by_set


# ---------------------------------------------------------------------------------------- re-scoring


def rescore_recogs(path: str | Path) -> dict[str, dict[str, Any]]:
    """Recompute ``{set: summary}`` from ``recogs-<set>.txt`` and the ``results-<set>.jsonl`` beside it.

    The ``hyp=`` line is what gets scored (so an edited hypothesis is honoured); ``raw=`` gives the
    format/LID/no-speech information, and the JSONL gives languages, durations, truncation flags and
    the scoring settings. Feeding the result to :func:`log_metrics` must reproduce the logged numbers.
    """
    path = Path(path)
    if not (path.name.startswith("recogs-") and path.name.endswith(".txt")):
        raise ValueError(f"{path} is not a recogs-<set>.txt file")
    set_name = path.name[len("recogs-") : -len(".txt")]
    jsonl = path.with_name(f"results-{set_name}.jsonl")
    info = {rec["id"]: rec for rec in read_jsonl(jsonl)}
    fields: dict[str, dict[str, str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line:
            continue
        utt, sep, rest = line.partition(":\t")
        key, eq, value = rest.partition("=")
        if not sep or not eq or key not in ("ref", "hyp", "raw"):
            raise ValueError(f"{path}:{n}: expected 'id:\\t(ref|hyp|raw)=...', got {line[:80]!r}")
        fields.setdefault(_unescape(utt), {})[key] = _unescape(value)
    if set(fields) != set(info) or any(len(f) != 3 for f in fields.values()):
        raise ValueError(f"{path} and {jsonl} do not describe the same utterances with ref/hyp/raw lines")
    scorings = {json.dumps(rec["scoring"], sort_keys=True) for rec in info.values()}
    if len(scorings) != 1:
        raise ValueError(f"{jsonl}: records were scored with different settings: {sorted(scorings)}")
    scoring = dict(info[next(iter(info))]["scoring"])
    unit, version = scoring.pop("unit"), scoring.pop("normalizer_version")
    if version != NORMALIZER_VERSION:
        logger.warning("%s was scored with normaliser %s, re-scoring with %s", jsonl, version, NORMALIZER_VERSION)
    aggregator = MetricAggregator(
        unit=None if unit == "by-language" else unit, options=NormalizerOptions.from_mapping(scoring)
    )
    records = []
    for utt in sorted(fields):
        f, rec = fields[utt], info[utt]
        row = DecodeResult(
            id=utt,
            language=rec["language"],
            reference=f["ref"],
            hypothesis=f["raw"],
            audio_seconds=rec["audio_seconds"],
            truncated=rec["truncated"],
            forced_language=rec["forced_language"],
            dialect=rec["dialect"],
        )
        parsed = replace(parse_asr_output(f["raw"], row.forced_language), text=f["hyp"])
        records.append(_score_one(aggregator, set_name, row, parsed))
    return {set_name: summarize_set(aggregator, set_name, records)}


__all__ = [
    "UtteranceRecord",
    "format_table",
    "log_metrics",
    "rescore_recogs",
    "score_results",
    "summarize_set",
    "write_reports",
    "write_set_reports",
    "write_summary",
]
