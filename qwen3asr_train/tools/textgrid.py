"""Montreal Forced Aligner TextGrids -> manifest rows with word times in the aligner's word units.

Why: Qwen3-ForcedAligner is trained on MFA pseudo-timestamps (paper §3.2), but MFA's words are not the
aligner's units. MFA keeps punctuation-free dictionary words (``"hello"``), may split clitics or compounds,
and treats ``"你好"`` as one word where the aligner times each ideograph. This module re-cuts MFA's
timing into ``split_words(transcript, language)`` units and refuses to guess when the two disagree.

Library: praatio 6.2.2. MFA itself depends on praatio (``praatio>=6.0.0``) to write its TextGrids, so
it reads exactly what MFA writes; it also reads the short format and UTF-16 files (as Praat saves them)
and returns typed interval tiers. ``textgrid`` 1.6.1 and ``tgt`` 1.5 would work but add a second parser.

How a row is built (``textgrid_to_rows``):

1. Word intervals whose label is empty, ``sil``, ``sp`` or ``<eps>`` are gaps, not words. Labels are
   cleaned like ``split_words`` (letters, numbers, ``'``); a label that cleans to nothing (punctuation)
   is dropped. ``<unk>``/``spn`` labels are words whose text MFA lost.
2. The cleaned MFA words and the transcript units are compared character by character (case-insensitive:
   MFA may lowercase). Each transcript unit takes its start from its first character and its end from its
   last. A unit covering several MFA words (``"john" + "'s"``) spans them; a unit boundary *inside* an
   MFA word (CJK, Japanese, ``"cannot"`` vs ``"can not"``) needs character times inside that word.
3. Character times inside an MFA word:
   - **phones** (CJK-only words): every phone carrying a tone (Chao tone letters ``˥˦˧˨˩`` as in
     ``mandarin_mfa``, or a trailing digit as in pinyin dictionaries: ``i3``) is one syllable nucleus; when
     the word has exactly one nucleus per character, character k runs from the boundary before its onset
     to the boundary after its coda. Between two nuclei, a phone that can only be a coda (``ŋ ng ɻ p̚ t̚ k̚``)
     closes the first syllable; ``n`` (and ``m`` in Cantonese) is a coda if followed by a consonant, but is
     ambiguous (coda, or onset as in 你/年) when it stands alone or before a single glide (``j w ɥ``): then
     the boundary is the middle of that phone (error at most half a phone, well under the 80 ms class
     width). Anything else starts the second syllable. Word edges stay the word's edges.
   - **even**: otherwise (no phones tier, nucleus count differs, no tones as in Japanese, non-CJK words)
     the word's span is split evenly by character.
   Which method served each split word is counted (``stats``) and logged per utterance.
4. The concatenated units must equal the transcript's units. Each MFA word must continue where the
   previous one ended, or resume at the first later unit boundary where its text occurs (the skipped
   units are *missing*, below). MFA words that cannot be placed (different normalisation, e.g. ``three``
   for ``3``) raise ``TextGridError(reason="mismatch")``, whatever the ``unk_policy``.

Words MFA could not align follow ``unk_policy``; they are units under an ``<unk>``/``spn`` label, under a
word whose phones are all ``spn``, or transcript units with no MFA interval at all (missing):

- ``"drop_utterance"`` (default): return ``None`` and count/log the file; nothing is shifted silently;
- ``"error"``: raise ``TextGridError(reason="unk")``;
- ``"interpolate"``: units under an unaligned interval share that interval evenly by characters; missing
  units share the gap between the neighbouring units' times (0 and the TextGrid end at the edges)
  evenly by characters. Each fixed utterance is counted and logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qwen3asr_train.data.word_units import clean_token, is_cjk_char, resolve_language, split_words

logger = logging.getLogger(__name__)

UnkPolicy = Literal["drop_utterance", "error", "interpolate"]
UNK_POLICIES: tuple[str, ...] = ("drop_utterance", "error", "interpolate")
SILENCE_LABELS = frozenset({"", "sil", "sp", "<sil>", "<eps>", "silence"})
UNK_LABELS = frozenset({"<unk>", "spn", "<spn>", "[unk]", "<oov>"})
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
TRANSCRIPT_EXTENSIONS: tuple[str, ...] = (".lab", ".txt")

_TONE = re.compile(r"[\u02E5-\u02E9]|\d$")
_ONLY_CODAS = frozenset({"ŋ", "ng", "ɻ", "p̚", "t̚", "k̚"})
_GLIDES = frozenset({"j", "w", "ɥ"})


class TextGridError(ValueError):
    """A TextGrid that cannot become a row; ``reason`` is the count key (parse, mismatch, unk, empty)."""

    def __init__(self, path: str | Path, reason: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.reason = str(path), reason


@dataclass
class _Interval:
    start: float
    end: float
    label: str


@dataclass
class _Word:
    """One MFA word interval (or a merged run of ``<unk>`` intervals) placed in the transcript's characters."""

    start: float
    end: float
    text: str | None  # folded, cleaned characters; None = text unknown (<unk>)
    phones: list[_Interval]
    unaligned: bool
    first: int = -1  # character range [first, last) in the transcript units
    last: int = -1
    char_times: list[tuple[float, float]] | None = field(default=None, repr=False)
    method: str = ""


def textgrid_to_rows(
    textgrid_path: str | Path,
    transcript: str,
    language: str | None,
    audio_path: str | Path,
    *,
    words_tier: str = "words",
    phones_tier: str = "phones",
    unk_policy: UnkPolicy = "drop_utterance",
    utt_id: str | None = None,
    stats: Counter[str] | None = None,
) -> dict | None:
    """Build one manifest row ``{"id", "audio", "text", "language", "duration", "words"}`` from an MFA TextGrid.

    Args:
        textgrid_path: MFA output for the utterance.
        transcript: The text given to MFA (raw; it is segmented with ``split_words``).
        language: Canonical name or ISO code; decides the word units.
        audio_path: Stored as the row's ``audio``.
        words_tier: Word tier name (``"<speaker> - words"`` is found too, as MFA names multi-speaker tiers).
        phones_tier: Phone tier name; optional in the file, used to time characters inside CJK words.
        unk_policy: What to do with words MFA could not align (module docstring).
        utt_id: Row id; the TextGrid's stem by default.
        stats: Counter updated with split methods and unk handling (see ``mfa_corpus_to_manifest``).

    Returns:
        The row (``words`` = ``[{"word", "start", "end"}]`` in seconds, 3 decimals), or ``None`` when
        ``unk_policy="drop_utterance"`` dropped it.

    Raises:
        TextGridError: unreadable file or missing words tier (``parse``), no units in the transcript
            (``empty``), MFA words that differ from the transcript (``mismatch``), unaligned words under
            ``unk_policy="error"`` (``unk``).
    """
    if unk_policy not in UNK_POLICIES:
        raise ValueError(f"unk_policy must be one of {UNK_POLICIES}, got {unk_policy!r}")
    stats = stats if stats is not None else Counter()
    path = Path(textgrid_path)
    words_iv, phones_iv, duration = _read_textgrid(path, words_tier, phones_tier)
    language = resolve_language(language)
    units = split_words(transcript, language)
    if not units:
        raise TextGridError(path, "empty", f"transcript {transcript!r} has no word units")

    words = _mfa_words(words_iv, phones_iv)
    owner = _place(path, units, words)  # owner[c] = index into words, or -1 (missing)
    bounds = [0]
    for unit in units:
        bounds.append(bounds[-1] + len(unit))

    times: list[tuple[float, float] | None] = []
    bad: list[int] = []  # units that touch unaligned or missing words
    for u in range(len(units)):
        a, b = bounds[u], bounds[u + 1]
        if owner[a] < 0:
            times.append(None)
            bad.append(u)
            continue
        times.append((_start(words[owner[a]], a, language), _end(words[owner[b - 1]], b, language)))
        if any(words[w].unaligned for w in set(owner[a:b])):
            bad.append(u)

    if bad:
        names = " ".join(units[u] for u in bad)
        if unk_policy == "error":
            raise TextGridError(path, "unk", f"MFA could not align {len(bad)} word(s): {names}")
        if unk_policy == "drop_utterance":
            logger.warning("%s: dropped, MFA could not align %d word(s): %s", path, len(bad), names)
            stats["dropped_unk"] += 1
            return None
        _interpolate_missing(times, units, duration)
        logger.warning("%s: interpolated times for %d unaligned word(s): %s", path, len(bad), names)
        stats["interpolated_utterances"] += 1
        stats["interpolated_words"] += len(bad)

    methods = [w.method for w in words if w.method and not w.unaligned]
    stats.update(f"words_split_by_{m}" for m in methods)
    stats.update(f"utterances_split_by_{m}" for m in set(methods))
    if methods:
        logger.debug("%s: characters inside MFA words timed by %s", path, dict(Counter(methods)))

    rows = [
        {"word": unit, "start": round(t[0], 3), "end": round(t[1], 3)}
        for unit, t in zip(units, times, strict=True)
        if t is not None
    ]
    return {
        "id": utt_id if utt_id is not None else path.stem,
        "audio": str(audio_path),
        "text": transcript,
        "language": language,
        "duration": round(duration, 3),
        "words": rows,
    }


def mfa_corpus_to_manifest(
    corpus_dir: str | Path,
    alignments_dir: str | Path,
    language: str | None,
    out_path: str | Path,
    *,
    words_tier: str = "words",
    phones_tier: str = "phones",
    unk_policy: UnkPolicy = "drop_utterance",
) -> Counter[str]:
    """Walk an MFA corpus (``<corpus>/<speaker>/<utt>.wav`` + ``.lab``/``.txt``) and its alignments
    (``<alignments>/<speaker>/<utt>.TextGrid``) and write one JSONL row per usable utterance.

    Every utterance that is not written is logged with its file and counted; nothing stops the walk except
    ``unk_policy="error"``, which re-raises the first unaligned word.

    Returns:
        Counts: ``written``; ``dropped_<reason>`` for ``no_audio``, ``no_textgrid``, ``parse``, ``empty``,
        ``mismatch``, ``unk``; ``utterances_split_by_{phones,even}`` / ``words_split_by_{phones,even}``
        (how characters inside MFA words were timed); ``interpolated_{utterances,words}``.
    """
    corpus_dir, alignments_dir, out_path = Path(corpus_dir), Path(alignments_dir), Path(out_path)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"corpus directory {corpus_dir} does not exist")
    if not alignments_dir.is_dir():
        raise FileNotFoundError(f"alignments directory {alignments_dir} does not exist")
    stats: Counter[str] = Counter(written=0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for transcript_path in _transcripts(corpus_dir):
                row = _corpus_row(
                    transcript_path,
                    corpus_dir,
                    alignments_dir,
                    language,
                    stats,
                    words_tier=words_tier,
                    phones_tier=phones_tier,
                    unk_policy=unk_policy,
                )
                if row is not None:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    stats["written"] += 1
        os.replace(tmp, out_path)  # a manifest appears complete or not at all
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("%s: %s", out_path, dict(stats))
    return stats


def _corpus_row(
    transcript_path: Path,
    corpus_dir: Path,
    alignments_dir: Path,
    language: str | None,
    stats: Counter[str],
    *,
    words_tier: str,
    phones_tier: str,
    unk_policy: UnkPolicy,
) -> dict | None:
    """One corpus utterance -> row, or None after logging and counting why it was skipped."""
    rel = transcript_path.relative_to(corpus_dir).with_suffix("")
    audio = next((a for ext in AUDIO_EXTENSIONS if (a := corpus_dir / rel.with_suffix(ext)).is_file()), None)
    textgrid = alignments_dir / rel.with_suffix(".TextGrid")
    if audio is None:
        logger.warning("%s: skipped, no audio file next to it", transcript_path)
        stats["dropped_no_audio"] += 1
        return None
    if not textgrid.is_file():
        logger.warning("%s: skipped, MFA wrote no alignment %s", transcript_path, textgrid)
        stats["dropped_no_textgrid"] += 1
        return None
    transcript = transcript_path.read_text(encoding="utf-8").strip()
    try:
        return textgrid_to_rows(
            textgrid,
            transcript,
            language,
            audio.resolve(),
            words_tier=words_tier,
            phones_tier=phones_tier,
            unk_policy=unk_policy,
            utt_id=rel.as_posix(),
            stats=stats,
        )
    except TextGridError as err:
        if err.reason == "unk":  # unk_policy="error": the caller asked to stop
            raise
        logger.warning("skipped (%s): %s", err.reason, err)
        stats[f"dropped_{err.reason}"] += 1
        return None


# --------------------------------------------------------------------------------------------- reading


def _read_textgrid(path: Path, words_tier: str, phones_tier: str) -> tuple[list[_Interval], list[_Interval], float]:
    """Words and phones (empty if absent) as non-silent intervals, plus the TextGrid's end time."""
    try:
        from praatio import textgrid as praat_textgrid
    except ImportError as err:
        raise ImportError("reading MFA TextGrids requires praatio: pip install praatio==6.2.2") from err
    try:
        tg = praat_textgrid.openTextgrid(str(path), includeEmptyIntervals=False, reportingMode="silence")
    except FileNotFoundError:
        raise
    except Exception as err:  # praatio raises assorted errors on malformed files
        raise TextGridError(path, "parse", f"cannot read TextGrid: {err}") from err

    def tier(name: str, required: bool) -> list[_Interval]:
        names = [n for n in tg.tierNames if n == name] or [n for n in tg.tierNames if n.endswith(f" - {name}")]
        if len(names) != 1:
            if required or len(names) > 1:
                raise TextGridError(path, "parse", f"needs exactly one tier {name!r}, has tiers {tg.tierNames}")
            return []
        entries = getattr(tg.getTier(names[0]), "entries", None)
        if entries is None or (entries and len(entries[0]) != 3):
            raise TextGridError(path, "parse", f"tier {names[0]!r} is not an interval tier")
        return [
            _Interval(float(s), float(e), lab.strip())
            for s, e, lab in entries
            if lab.strip().lower() not in SILENCE_LABELS
        ]

    return tier(words_tier, True), tier(phones_tier, False), float(tg.maxTimestamp)


def _mfa_words(words: list[_Interval], phones: list[_Interval]) -> list[_Word]:
    """Clean MFA word labels; merge runs of ``<unk>`` intervals (their text, hence their split, is unknown)."""
    out: list[_Word] = []
    for iv in words:
        inside = [p for p in phones if iv.start <= (p.start + p.end) / 2 <= iv.end]
        if iv.label.lower() in UNK_LABELS:
            if out and out[-1].text is None:
                out[-1].end, out[-1].phones = iv.end, out[-1].phones + inside
            else:
                out.append(_Word(iv.start, iv.end, None, inside, unaligned=True))
            continue
        text = _fold(clean_token(iv.label))
        if text:
            spn = bool(inside) and all(p.label.lower() in UNK_LABELS for p in inside)
            out.append(_Word(iv.start, iv.end, text, inside, unaligned=spn))
    return out


# -------------------------------------------------------------------------------------------- placing


def _fold(text: str) -> str:
    """Lowercase without changing the length (``"İ".lower()`` has two characters), so indices stay aligned."""
    return "".join(low if len(low := ch.lower()) == 1 else ch for ch in text)


def _place(path: Path, units: list[str], words: list[_Word]) -> list[int]:
    """Assign each transcript character to the MFA word covering it (-1: no MFA interval).

    A word must continue where the previous one ended; otherwise it may only resume at a later unit
    boundary (the units in between are missing), and an ``<unk>`` run covers whole units up to where the
    next known word resumes. Anything else is a mismatch.
    """
    chars = _fold("".join(units))
    starts: set[int] = set()
    pos = 0
    for unit in units:
        starts.add(pos)
        pos += len(unit)
    starts.add(pos)
    owner = [-1] * len(chars)

    def mismatch(detail: str) -> TextGridError:
        mfa = " ".join(w.text if w.text is not None else "<unk>" for w in words)
        return TextGridError(path, "mismatch", f"{detail}; transcript units [{' '.join(units)}] vs MFA words [{mfa}]")

    ordered = sorted(starts)

    def resume(text: str, after: int) -> int | None:
        return next((p for p in ordered if p > after and chars.startswith(text, p)), None)

    cursor = 0
    for i, word in enumerate(words):
        if word.text is None:
            if cursor not in starts:
                raise mismatch(f"<unk> at {word.start:.3f}s starts inside a word")
            nxt = next((w.text for w in words[i + 1 :] if w.text is not None), None)
            end = len(chars) if nxt is None else resume(nxt, cursor)
            if end is None or end == cursor:
                raise mismatch(f"cannot place <unk> at {word.start:.3f}s")
        elif chars.startswith(word.text, cursor):
            end = cursor + len(word.text)
        else:
            at = resume(word.text, cursor) if cursor in starts else None
            if at is None:
                raise mismatch(f"MFA word {word.text!r} at {word.start:.3f}s does not follow the transcript")
            cursor, end = at, at + len(word.text)
        word.first, word.last = cursor, end
        owner[cursor:end] = [i] * (end - cursor)
        cursor = end
    if cursor not in starts:
        raise mismatch("MFA words end inside a word")
    return owner


# --------------------------------------------------------------------------------------------- timing


def _start(word: _Word, char: int, language: str | None) -> float:
    """Start time of transcript character ``char`` inside ``word``."""
    return word.start if char == word.first else _char_times(word, language)[char - word.first][0]


def _end(word: _Word, stop: int, language: str | None) -> float:
    """End time of the transcript character just before ``stop`` inside ``word``."""
    return word.end if stop == word.last else _char_times(word, language)[stop - 1 - word.first][1]


def _char_times(word: _Word, language: str | None) -> list[tuple[float, float]]:
    """Per-character times inside ``word`` (phones rule, else even split), computed once and recorded."""
    if word.char_times is None:
        word.char_times = None if word.unaligned else _phone_split(word, language)
        word.method = "even" if word.char_times is None else "phones"
        if word.char_times is None:
            n, span = word.last - word.first, word.end - word.start
            word.char_times = [(word.start + k * span / n, word.start + (k + 1) * span / n) for k in range(n)]
    return word.char_times


def _phone_split(word: _Word, language: str | None) -> list[tuple[float, float]] | None:
    """Character times from tone-bearing syllable nuclei (module docstring, step 3), or None if unusable."""
    if word.text is None or not all(is_cjk_char(ch) for ch in word.text):
        return None
    phones = word.phones
    nuclei = [k for k, p in enumerate(phones) if _TONE.search(p.label)]
    if not phones or len(nuclei) != len(word.text):
        return None
    ambiguous = {"n", "m"} if language == "Cantonese" else {"n"}
    cuts = [word.start]
    for k, nxt in zip(nuclei, nuclei[1:], strict=False):
        between = phones[k + 1 : nxt]
        if not between:
            cuts.append(phones[k].end)
            continue
        first, rest = between[0], [p.label for p in between[1:]]
        onset_possible = first.label in ambiguous and (not rest or (len(rest) == 1 and rest[0] in _GLIDES))
        if onset_possible:  # coda of this syllable or onset of the next: split the phone
            cuts.append((first.start + first.end) / 2)
        elif first.label in _ONLY_CODAS or first.label in ambiguous:
            cuts.append(first.end)
        else:
            cuts.append(first.start)
    cuts.append(word.end)
    return list(zip(cuts, cuts[1:], strict=False))


def _interpolate_missing(times: list[tuple[float, float] | None], units: list[str], duration: float) -> None:
    """Fill runs of missing units with the gap between their neighbours, shared by character count."""
    u = 0
    while u < len(times):
        if times[u] is not None:
            u += 1
            continue
        v = u
        while v < len(times) and times[v] is None:
            v += 1
        lo = times[u - 1][1] if u > 0 else 0.0  # type: ignore[index]
        hi = times[v][0] if v < len(times) else duration  # type: ignore[index]
        hi = max(hi, lo)
        total = sum(len(units[k]) for k in range(u, v))
        t = lo
        for k in range(u, v):
            step = (hi - lo) * len(units[k]) / total
            times[k] = (t, t + step)
            t += step
        u = v


def _transcripts(corpus_dir: Path) -> list[Path]:
    """Transcript files under the corpus, one per utterance (``.lab`` preferred over ``.txt``)."""
    found: dict[Path, Path] = {}
    for ext in reversed(TRANSCRIPT_EXTENSIONS):
        for p in corpus_dir.rglob(f"*{ext}"):
            found[p.with_suffix("")] = p
    return [found[k] for k in sorted(found)]
