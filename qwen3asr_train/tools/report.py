"""``qwen3asr-data report``: what a manifest holds, before anyone trains on it.

Reads rows as written (no audio is opened, so a report of a million rows takes seconds) and writes
``report.json`` (everything), ``report.md`` (the tables) and ``durations.png`` (duration histogram stacked by
language) to the output folder.

Unusual characters — the definition used here. A byte-level BPE (Qwen's tokenizer) has merges for the text it
was trained on; a character outside the scripts of the row's language usually falls back to its raw UTF-8
bytes (2–4 tokens per character) and is a frequent sign of mojibake, markup or a wrong language label. So a
character is *normal* for a row when it is whitespace, a number (Unicode category N*), punctuation (P*), or a
letter or combining mark (L*, M*) of one of the scripts of the row's language (:data:`LANGUAGE_SCRIPTS`; the
script is the first word of the character's Unicode name, e.g. ``LATIN``, ``CYRILLIC``, ``CJK``). Everything
else is reported: letters of other scripts, symbols (S*: emoji, currency, maths), control and format
characters (C*: zero-width spaces, BOMs, private use). Languages outside the table (``extra_languages``) and
no-speech rows accept every letter. This is a property of the text, not a measurement of a tokenizer: the
report lists each character with its code point, name, category, count and the first row it appears in.
"""

from __future__ import annotations

import gzip
import json
import logging
import statistics
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from qwen3asr_train.tools.importers import atomic_write_text

log = logging.getLogger(__name__)

LATIN = frozenset({"LATIN"})
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{
        name: LATIN
        for name in (
            "Czech Danish Dutch English Filipino Finnish French German Hungarian Indonesian Italian Malay "
            "Polish Portuguese Romanian Spanish Swedish Turkish Vietnamese"
        ).split()
    },
    "Arabic": frozenset({"ARABIC"}),
    "Persian": frozenset({"ARABIC"}),
    "Greek": frozenset({"GREEK"}),
    "Russian": frozenset({"CYRILLIC"}),
    "Macedonian": frozenset({"CYRILLIC"}),
    "Hindi": frozenset({"DEVANAGARI"}),
    "Thai": frozenset({"THAI"}),
    "Chinese": frozenset({"CJK"}),
    "Cantonese": frozenset({"CJK"}),
    "Japanese": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "Korean": frozenset({"HANGUL", "CJK"}),
}
"""Scripts (first word of the Unicode character name) whose letters are normal in each language."""

NO_SPEECH = "None"
TOP_CHARACTERS = 50
"""Unusual characters listed in the report (most frequent first); report.json keeps them all."""


def character_script(char: str) -> str:
    """The script of a character: the first word of its Unicode name (``LATIN``, ``CJK``, ...), or ``?``."""
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else "?"


def is_normal(char: str, language: str | None) -> bool:
    """Whether ``char`` is in the normal range for a row of ``language`` (see the module docstring)."""
    if char.isspace():
        return True
    category = unicodedata.category(char)
    if category[0] in "NP":
        return True
    if category[0] in "LM":
        scripts = LANGUAGE_SCRIPTS.get(language or "")
        return scripts is None or character_script(char) in scripts
    return False


def _rows(path: Path) -> Any:
    """``(line, row or None, error)`` for each non-empty line of a JSONL(.gz) manifest."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"malformed JSON ({exc.msg})"
                continue
            yield n, row, "" if isinstance(row, dict) else "not a JSON object"


def _language_and_text(row: dict[str, Any], languages: Any) -> tuple[str, str]:
    """The row's canonical language (``None`` for no speech; the label itself when unknown) and its text."""
    from qwen3asr_train.languages import UnknownLanguageError

    text = str(row.get("text") or "")
    label = row.get("language")
    if "<asr_text>" in text:
        prefix, text = text.split("<asr_text>", 1)
        label = label or prefix.removeprefix("language ").strip()
    if row.get("no_speech") or label == NO_SPEECH:
        return NO_SPEECH, text
    if not label:
        return "?", text
    try:
        return languages.resolve(str(label))[0], text
    except UnknownLanguageError:
        return str(label), text


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 3),
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def data_report(manifests: list[Path], out_dir: Path, bins: int = 40) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``durations.png`` to ``out_dir``; return the summary."""
    from qwen3asr_train.languages import LanguageTable

    languages = LanguageTable()
    out_dir.mkdir(parents=True, exist_ok=True)
    durations: dict[str, list[float]] = defaultdict(list)
    chars: dict[str, list[float]] = defaultdict(list)
    words: dict[str, list[float]] = defaultdict(list)
    rows_per_language: Counter[str] = Counter()
    unusual: Counter[tuple[str, str]] = Counter()  # (character, language) -> count
    first_seen: dict[tuple[str, str], str] = {}
    rows_with_unusual: Counter[str] = Counter()
    unreadable: list[str] = []
    no_duration = 0
    total = 0
    for manifest in manifests:
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: manifest not found")
        for line, row, error in _rows(manifest):
            where = f"{manifest}:{line}"
            if error:
                unreadable.append(f"{where}: {error}")
                continue
            total += 1
            language, text = _language_and_text(row, languages)
            rows_per_language[language] += 1
            duration = row.get("duration")
            if isinstance(duration, int | float) and duration > 0:
                durations[language].append(float(duration))
            else:
                no_duration += 1
            chars[language].append(len(text))
            words[language].append(len(text.split()))
            odd = {c for c in text if not is_normal(c, language)}
            if odd:
                rows_with_unusual[language] += 1
            for c in text:
                if c in odd:
                    unusual[(c, language)] += 1
                    first_seen.setdefault((c, language), where)
    per_language = {
        lang: {
            "rows": rows_per_language[lang],
            "hours": round(sum(durations[lang]) / 3600, 4),
            "duration_s": _stats(durations[lang]),
            "text_chars": _stats(chars[lang]),
            "text_words": _stats(words[lang]),
            "rows_with_unusual_characters": rows_with_unusual[lang],
        }
        for lang in sorted(rows_per_language, key=lambda k: (-rows_per_language[k], k))
    }
    characters = [
        {
            "char": c,
            "code_point": f"U+{ord(c):04X}",
            "name": unicodedata.name(c, "<unnamed>"),
            "category": unicodedata.category(c),
            "language": lang,
            "count": n,
            "first_row": first_seen[(c, lang)],
        }
        for (c, lang), n in sorted(unusual.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    all_durations = [d for values in durations.values() for d in values]
    summary: dict[str, Any] = {
        "manifests": [str(m) for m in manifests],
        "rows": total,
        "hours": round(sum(all_durations) / 3600, 4),
        "rows_without_duration": no_duration,
        "unreadable_rows": unreadable,
        "languages": per_language,
        "unusual_characters": characters,
        "histogram": str(out_dir / "durations.png"),
        "report": str(out_dir / "report.md"),
    }
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "report.md", _markdown(summary))
    _histogram(durations, out_dir / "durations.png", bins)
    printed = dict(summary, unusual_characters=characters[:TOP_CHARACTERS])
    return printed


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Data report",
        "",
        f"{summary['rows']} rows, {summary['hours']:.3f} h from {', '.join(summary['manifests'])}"
        + (f"; {summary['rows_without_duration']} rows without a duration" if summary["rows_without_duration"] else "")
        + (f"; {len(summary['unreadable_rows'])} unreadable rows" if summary["unreadable_rows"] else ""),
        "",
        "![durations](durations.png)",
        "",
        "| language | rows | hours | duration s (median / p95 / max) | chars (median / p95 / max) "
        "| words (median / p95 / max) | rows with unusual chars |",
        "|---|---:|---:|---|---|---|---:|",
    ]

    def triple(stats: dict[str, float]) -> str:
        return " / ".join(f"{stats[k]:g}" for k in ("median", "p95", "max")) if stats else "-"

    for lang, s in summary["languages"].items():
        lines.append(
            f"| {lang} | {s['rows']} | {s['hours']:.3f} | {triple(s['duration_s'])} | {triple(s['text_chars'])} "
            f"| {triple(s['text_words'])} | {s['rows_with_unusual_characters']} |"
        )
    lines += ["", "## Characters outside the normal range of the row's language (docs/data.md)", ""]
    if not summary["unusual_characters"]:
        lines.append("None.")
    else:
        lines += [
            "| char | code point | name | category | language | count | first row |",
            "|---|---|---|---|---|---:|---|",
        ]
        for c in summary["unusual_characters"][:TOP_CHARACTERS]:
            shown = c["char"] if c["category"][0] not in "CZ" else " "
            lines.append(
                f"| {shown} | {c['code_point']} | {c['name']} | {c['category']} | {c['language']} | {c['count']} "
                f"| {c['first_row']} |"
            )
    return "\n".join(lines) + "\n"


def _histogram(durations: dict[str, list[float]], path: Path, bins: int) -> None:
    """Duration histogram, stacked by language (the most frequent languages first, the rest as 'other')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = sorted(durations, key=lambda k: -len(durations[k]))
    shown, rest = order[:8], order[8:]
    series = [durations[k] for k in shown] + ([sum((durations[k] for k in rest), [])] if rest else [])
    labels = [f"{k} ({sum(durations[k]) / 3600:.2f} h)" for k in shown] + (["other"] if rest else [])
    everything = [d for values in series for d in values]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if everything:
        edges = np.linspace(0.0, max(everything) * 1.0001, bins + 1)
        ax.hist(series, bins=edges, stacked=True, label=labels)
        ax.legend(title="language", fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no row has a duration", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("rows")
    ax.set_title(f"Utterance durations: {len(everything)} rows, {sum(everything) / 3600:.2f} h")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
