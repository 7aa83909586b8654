"""Manifests: JSONL(.gz) rows (two accepted shapes) and HF datasets -> validated ``Utterance`` records.

Accepted row shapes (one JSON object per line):

* upstream fine-tuning format: ``{"audio": path, "text": "language English<asr_text>the text",
  "prompt": optional context}`` (``language None<asr_text>`` = no speech);
* structured: ``{"audio": path, "text": str, "language": name or ISO code, "context": str?,
  "duration": s?, "offset": s?, "id": str?, "words": [{"word", "start", "end"}]?, "no_speech": bool?}``.

Relative audio paths are resolved against the manifest's directory. Every problem names the file and
line. ``on_bad_row="error"`` raises at the first bad row; ``"skip"`` drops it, counts it by reason and
logs a summary with examples — nothing is dropped silently; the stages also write every dropped row to
``<run_dir>/rejects.jsonl`` (:meth:`SkipReport.write`).

Every row's audio header is read at start (``soundfile.info``, threads for large manifests), also when
the row gives a ``duration``: a zero-byte, corrupt or header-only file, or a segment outside the file,
is a bad row at start instead of a crash in the middle of training. Each line is decoded on its own, so
a non-UTF-8 byte is a bad row (``bad_encoding``) under the same policy.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3asr_train.data.audio import DURATION_SLACK_SECONDS, AudioError, audio_info
from qwen3asr_train.data.prompts import ASR_TEXT
from qwen3asr_train.languages import NO_SPEECH, LanguageTable, UnknownLanguageError

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message starts with ``file:line``.

    ``reason`` is a short category used to count rows dropped under the skip policy.
    """

    def __init__(self, message: str, reason: str = "invalid_row") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class AlignedWord:
    """One word unit with its time span in seconds (relative to the utterance start).

    Not frozen: Lightning's batch transfer rebuilds dataclasses it finds in a batch (GSPO batches carry
    utterances) and refuses frozen ones.
    """

    word: str
    start: float
    end: float


@dataclass
class Utterance:
    """One training/evaluation item.

    ``language`` is the canonical target name, ``None`` for a no-speech item. ``source`` is
    ``file:line`` for error messages. ``audio`` is a path, or ``hf://<index>`` for an HF-datasets row.
    """

    id: str
    audio: str
    duration: float
    text: str
    language: str | None
    offset: float = 0.0
    context: str = ""
    dialect: str | None = None
    words: list[AlignedWord] | None = None
    source: str = ""

    @property
    def no_speech(self) -> bool:
        """True for items whose target is ``language None<asr_text>``."""
        return self.language is None


@dataclass
class SkipReport:
    """Rows dropped under ``on_bad_row="skip"``: counts by reason, and every row (for ``rejects.jsonl``).

    Why keep every row: a log line can show a few examples, but whoever cleans the corpus needs the
    complete list with file, line and reason.
    """

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, reason: str, message: str, source: str = "", what: str = "") -> None:
        """Record one dropped row; ``source`` is ``file:line`` (or ``file[split]:index``) when known."""
        self.counts[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(message)
        file, _, line = source.rpartition(":")
        entry: dict[str, Any] = {"file": file or source, "line": int(line) if line.isdigit() else None}
        entry.update(reason=reason, message=message)
        if what:
            entry["what"] = what
        self.rows.append(entry)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log(self, what: str) -> None:
        if self.total:
            log.warning(
                "skipped %d bad rows in %s: %s; e.g. %s (every row: rejects.jsonl in the run directory)",
                self.total,
                what,
                dict(self.counts),
                self.examples[:3],
            )

    def extend(self, other: SkipReport, what: str = "") -> None:
        """Add another report's rows (tagged with ``what``, e.g. ``train`` or ``eval:dev``)."""
        self.counts.update(other.counts)
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])
        self.rows.extend({**row, "what": row.get("what") or what} if what else row for row in other.rows)

    def write(self, path: str | Path) -> Path:
        """Write every dropped row as JSON lines (an empty file when nothing was dropped), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows), encoding="utf-8")
        os.replace(tmp, path)
        return path


@dataclass
class RowChecks:
    """What a row must satisfy (from the data config)."""

    languages: LanguageTable
    max_duration: float = 1200.0
    min_duration: float = 0.0
    check_audio: bool = True


def open_lines(path: Path) -> Iterator[bytes]:
    """Raw lines: each is decoded on its own so one bad byte costs one row, not the manifest."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        yield from handle


def decode_line(raw: bytes, where: str) -> str:
    """A manifest line as text; a non-UTF-8 byte is a :class:`ManifestError` (``bad_encoding``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)",
            "bad_encoding",
        ) from None


HEADER_CHECK_THREADS = 8
"""Threads reading audio headers at start (the reads wait on the disk, not the GIL)."""

PARALLEL_ROWS = 64
"""Manifests with at least this many rows have their headers read in parallel."""


def json_line(raw: bytes, where: str, line_no: int) -> Any:
    """The JSON value of one manifest line (a UTF-8 BOM on line 1 is dropped); errors name ``where``."""
    line = decode_line(raw, where)
    if line_no == 1:
        line = line.removeprefix("\ufeff")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})", "malformed_json") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """Every JSON value of a small JSONL file (a manifest to copy, an evaluation's ``results-<set>.jsonl``),
    blank lines skipped; a bad line is a :class:`ManifestError` naming ``path:line``.

    Why one reader: recipes' report scripts and re-scoring read these files too, and each hand-written
    ``json.loads`` loop reported a broken line without its place. Training data goes through the manifest
    readers instead (validation, skip policy, lazy streaming).
    """
    path = Path(path)
    return [json_line(raw, f"{path}:{n}", n) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]


def parse_row(row: Any, where: str, base_dir: Path, checks: RowChecks, index: int) -> Utterance:
    """Validate one decoded JSON row; raise :class:`ManifestError` (prefixed with ``where``) if unusable."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}", "not_an_object")
    audio = row.get("audio")
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: missing or non-string 'audio'", "no_audio_field")
    text = row.get("text", "")
    if not isinstance(text, str):
        raise ManifestError(f"{where}: 'text' must be a string", "bad_text")
    context = row.get("context", row.get("prompt", "")) or ""
    if not isinstance(context, str):
        raise ManifestError(f"{where}: 'context'/'prompt' must be a string", "bad_context")

    label = row.get("language")
    if ASR_TEXT in text:
        prefix, text = text.split(ASR_TEXT, 1)
        if not prefix.startswith("language "):
            raise ManifestError(
                f"{where}: upstream-format text must start with 'language <Name><asr_text>'", "bad_text"
            )
        prefixed = prefix[len("language ") :].strip()
        if label is not None and str(label).strip().lower() != prefixed.lower():
            try:
                same = label == prefixed or checks.languages.resolve(str(label)) == checks.languages.resolve(prefixed)
            except UnknownLanguageError:
                same = False
            if not same:
                raise ManifestError(
                    f"{where}: 'language' is {label!r} but the text's prefix says {prefixed!r}", "bad_text"
                )
        label = prefixed if label is None else label
    flag = row.get("no_speech", False)
    if not isinstance(flag, bool):
        raise ManifestError(f"{where}: 'no_speech' must be true or false, got {flag!r}", "bad_no_speech")
    no_speech = flag or label == NO_SPEECH
    language: str | None = None
    dialect: str | None = None
    if no_speech:
        if text.strip():
            raise ManifestError(f"{where}: a no-speech row must have empty text, got {text[:40]!r}", "bad_text")
        text = ""
    else:
        if label is None:
            raise ManifestError(
                f"{where}: no language (add 'language', or use 'language X<asr_text>' in 'text')", "no_language"
            )
        try:
            language, dialect = checks.languages.resolve(str(label))
        except UnknownLanguageError as exc:
            raise ManifestError(f"{where}: {exc}", "unknown_language") from None
        if not text.strip():
            raise ManifestError(
                f'{where}: empty text on a row not marked as no-speech (set "no_speech": true)', "empty_text"
            )

    is_hf = audio.startswith("hf://")
    path = Path(audio) if os.path.isabs(audio) or is_hf else base_dir / audio
    offset = _number(row.get("offset", 0.0), "offset", where)
    duration = row.get("duration")
    if duration is not None:
        duration = _number(duration, "duration", where)
    length: float | None = None
    if checks.check_audio and not is_hf:
        if not path.is_file():
            raise ManifestError(f"{where}: audio file not found: {path}", "audio_missing")
        try:
            frames, rate = audio_info(path)
        except AudioError as exc:
            raise ManifestError(f"{where}: {exc}", "audio_unreadable") from None
        if frames <= 0:
            raise ManifestError(f"{where}: {path} holds no samples (header only)", "audio_empty")
        length = frames / rate
        if offset >= length:
            raise ManifestError(f"{where}: offset={offset}s is past the end of {path} ({length:.3f}s)", "bad_segment")
        if duration is None:
            duration = length - offset
    if duration is None:
        raise ManifestError(f"{where}: no 'duration' and the audio header was not read", "no_duration")
    if offset < 0 or duration <= 0:
        raise ManifestError(f"{where}: bad segment (offset={offset}, duration={duration})", "bad_segment")
    if duration > checks.max_duration:
        raise ManifestError(
            f"{where}: audio is {duration:.1f}s, longer than the limit data.max_duration={checks.max_duration:g}s "
            f"(Qwen3-ASR accepts at most 1200 s; split long recordings into segments with offset/duration)",
            "audio_too_long",
        )
    if duration < checks.min_duration:
        raise ManifestError(
            f"{where}: audio is {duration:.3f}s, shorter than data.min_duration={checks.min_duration}s",
            "audio_too_short",
        )
    if length is not None and offset + duration > length + DURATION_SLACK_SECONDS:
        raise ManifestError(
            f"{where}: segment offset={offset}s duration={duration}s runs past the end of {path} ({length:.3f}s)",
            "bad_segment",
        )

    words = None
    if row.get("words") is not None:
        words = _parse_words(row["words"], duration, where)
    return Utterance(
        id=str(row["id"]) if row.get("id") is not None else where,
        audio=audio if is_hf else str(path),
        duration=duration,
        text=text,
        language=language,
        offset=offset,
        context=context,
        dialect=dialect,
        words=words,
        source=where,
    )


def _number(value: Any, key: str, where: str) -> float:
    """A finite float from a manifest field, or a ManifestError naming the field."""
    try:
        number = float(0.0 if value is None else value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: '{key}' must be a number of seconds, got {value!r}", "bad_segment") from None
    if not math.isfinite(number):
        raise ManifestError(f"{where}: '{key}' must be finite, got {value!r}", "bad_segment")
    return number


def _parse_words(raw: Any, duration: float, where: str) -> list[AlignedWord]:
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: 'words' must be a list", "bad_words")
    words = []
    previous_end = 0.0
    for k, item in enumerate(raw):
        try:
            word = AlignedWord(str(item["word"]), float(item["start"]), float(item["end"]))
        except (KeyError, TypeError, ValueError):
            raise ManifestError(f"{where}: words[{k}] needs 'word', 'start', 'end'", "bad_words") from None
        if not (0.0 <= word.start <= word.end <= duration + 1e-3):
            raise ManifestError(f"{where}: words[{k}] {word} outside [0, {duration:.3f}]s or start > end", "bad_words")
        if word.start < previous_end - 1e-3:
            raise ManifestError(
                f"{where}: words[{k}] starts before the previous word ends (times must be monotonic)", "bad_words"
            )
        previous_end = word.end
        words.append(word)
    return words


def read_manifest(
    path: str | Path, checks: RowChecks, policy: str = "error", report: SkipReport | None = None
) -> list[Utterance]:
    """Read and validate a JSONL(.gz) manifest (see the module docstring for shapes and policy).

    Rows are decoded and parsed as JSON in order, then validated (audio headers included) in threads
    when the manifest is large; results and the first error under ``policy="error"`` keep file order.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found", "manifest_missing")
    report = report if report is not None else SkipReport()

    def parse(item: tuple[int, bytes]) -> Utterance | ManifestError:
        line_no, raw = item
        where = f"{path}:{line_no}"
        try:
            return parse_row(json_line(raw, where, line_no), where, path.parent, checks, line_no)
        except ManifestError as exc:
            return exc

    lines = [(n, raw) for n, raw in enumerate(open_lines(path), start=1) if raw.strip()]
    if len(lines) >= PARALLEL_ROWS and checks.check_audio:
        with ThreadPoolExecutor(HEADER_CHECK_THREADS) as pool:
            results = list(pool.map(parse, lines, chunksize=16))
    else:
        results = [parse(item) for item in lines]
    items: list[Utterance] = []
    for (line_no, _), result in zip(lines, results, strict=True):
        if isinstance(result, ManifestError):
            if policy == "error":
                raise result
            report.add(result.reason, str(result), f"{path}:{line_no}")
            continue
        items.append(result)
    if not items:
        raise ManifestError(f"{path}: no usable rows", "empty_manifest")
    log.info("%s: %d utterances, %.2f h", path, len(items), sum(u.duration for u in items) / 3600)
    return items


def read_manifests(
    paths: str | Path | Iterable[str | Path],
    checks: RowChecks,
    policy: str = "error",
    report: SkipReport | None = None,
) -> list[Utterance]:
    """Read several manifests; log (and return nothing silently) what the skip policy dropped.

    ``report``: collects the dropped rows (for ``rejects.jsonl``); a fresh one when omitted.
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    report = report if report is not None else SkipReport()
    local = SkipReport()
    items: list[Utterance] = []
    for path in paths:
        items.extend(read_manifest(path, checks, policy, local))
    local.log(", ".join(str(p) for p in paths))
    report.extend(local)
    ids = Counter(u.id for u in items)
    duplicated = [i for i, n in ids.items() if n > 1]
    if duplicated:
        raise ManifestError(f"duplicate utterance ids across manifests, e.g. {duplicated[:5]}")
    return items
