"""Corpus importers: other corpus layouts -> our JSONL manifest + a rejects file.

Every importer turns its input into candidate rows and hands them to one :class:`ManifestWriter`, which
checks each row with the training code's own row checks (:func:`~qwen3asr_train.data.manifest.parse_row`:
language, text, audio header, segment inside the file, duration limits). So a row the importer writes is
a row training accepts, and a row it cannot use is listed in ``rejects.jsonl`` with the *input* file and
line it came from and a reason — never dropped silently.

Layout of an import (``OUT_DIR``)::

    manifest.jsonl   one structured row per utterance (id, audio, text, language, duration, offset?, ...)
    rejects.jsonl    {"file", "line", "reason", "message"} for every input row that was not used
    wavs/            audio the importer wrote itself (HF datasets, cut segments); referenced relative to
                     the manifest, so the folder moves as one. Audio the importer only references is
                     written as an absolute path.

Idempotent: the output depends only on the input and the options (rows keep input order, files are
written to a temporary name and renamed), so running an import twice gives byte-identical files.

Importers here: a folder of audio + CSV/TSV transcripts (:func:`import_table`) and Kaldi data dirs
(:func:`import_kaldi`); long recordings are in ``tools/segment.py``, HF datasets in ``tools/hf_import.py``,
Lhotse manifests in ``tools/lhotse_io.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
REJECTS_NAME = "rejects.jsonl"
AUDIO_DIR = "wavs"


class CorpusImportError(ValueError):
    """The input as a whole cannot be imported (missing file, missing column); the message names the file."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (an interrupted run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class ImportLimits:
    """The row checks an import applies (the training defaults unless the user widens them)."""

    max_duration: float = 1200.0
    min_duration: float = 0.05
    extra_languages: list[str] = field(default_factory=list)


class ManifestWriter:
    """Checks candidate rows as training will and writes ``manifest.jsonl`` + ``rejects.jsonl``.

    Why one writer for every importer: the checks, the reject format, the duplicate-id rule and the
    atomic, deterministic output are the same whatever the input layout is.
    """

    def __init__(self, out_dir: str | Path, limits: ImportLimits | None = None) -> None:
        from qwen3asr_train.data.manifest import RowChecks
        from qwen3asr_train.languages import LanguageTable

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        limits = limits or ImportLimits()
        self.checks = RowChecks(
            languages=LanguageTable(limits.extra_languages),
            max_duration=limits.max_duration,
            min_duration=limits.min_duration,
        )
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self._ids: dict[str, str] = {}

    @property
    def audio_dir(self) -> Path:
        """Where an importer writes audio it creates (``OUT_DIR/wavs``)."""
        return self.out_dir / AUDIO_DIR

    def reject(self, file: str | Path, line: int | None, reason: str, message: str) -> None:
        """Record an input row that is not used (``message`` is prefixed with ``file:line``)."""
        where = f"{file}:{line}" if line is not None else str(file)
        self.rejects.append({"file": str(file), "line": line, "reason": reason, "message": f"{where}: {message}"})

    def add(self, row: dict[str, Any], file: str | Path, line: int | None) -> bool:
        """Check ``row`` (structured manifest shape) with the training checks; keep it or reject it."""
        from qwen3asr_train.data.manifest import ManifestError, parse_row

        where = f"{file}:{line}" if line is not None else str(file)
        try:
            utt = parse_row(row, where, self.out_dir, self.checks, line or 0)
        except ManifestError as exc:
            message = str(exc)
            self.rejects.append({"file": str(file), "line": line, "reason": exc.reason, "message": message})
            return False
        uid = str(row.get("id") or "")
        if not uid:
            raise ValueError(f"{where}: importer produced a row without an id (bug)")
        if uid in self._ids:
            self.reject(file, line, "duplicate_id", f"utterance id {uid!r} was already used at {self._ids[uid]}")
            return False
        self._ids[uid] = where
        out: dict[str, Any] = {"id": uid, "audio": row["audio"], "text": utt.text}
        if utt.no_speech:
            out["no_speech"] = True
        else:
            out["language"] = utt.dialect or utt.language
        out["duration"] = round(utt.duration, 3)
        if utt.offset:
            out["offset"] = round(utt.offset, 3)
        if utt.context:
            out["context"] = utt.context
        if utt.words is not None:
            out["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in utt.words]
        self.rows.append(out)
        return True

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write both files and return the summary printed by the CLI (``written`` = rows kept)."""
        manifest = self.out_dir / MANIFEST_NAME
        rejects = self.out_dir / REJECTS_NAME
        atomic_write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))
        atomic_write_text(rejects, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejects))
        reasons: dict[str, int] = {}
        for item in self.rejects:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        hours = sum(r["duration"] for r in self.rows) / 3600
        if self.rejects:
            log.warning("%d row(s) rejected %s; every one in %s", len(self.rejects), reasons, rejects)
        return {
            "manifest": str(manifest),
            "rejects": str(rejects),
            "written": len(self.rows),
            "rejected": len(self.rejects),
            "rejected_by_reason": dict(sorted(reasons.items())),
            "hours": round(hours, 4),
            **extra,
        }


def audio_reference(path: Path, out_dir: Path) -> str:
    """How a manifest names an audio file: relative when the importer wrote it under ``out_dir``, else absolute."""
    path = path.absolute()
    try:
        return str(path.relative_to(out_dir.absolute()))
    except ValueError:
        return str(path)


def safe_name(uid: str) -> str:
    """A file name for an utterance id (ids may contain ``/`` or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", uid).strip("._") or "utt"


# ------------------------------------------------------------------------------------ CSV/TSV tables
TABLE_SUFFIXES = (".csv", ".tsv")


def find_table(folder: Path) -> Path:
    """The one CSV/TSV file in ``folder`` (an error names what was found when it is not exactly one)."""
    tables = sorted(p for p in folder.iterdir() if p.suffix.lower() in TABLE_SUFFIXES and p.is_file())
    if len(tables) != 1:
        raise CorpusImportError(
            f"{folder}: expected exactly one .csv/.tsv transcript table, found {[p.name for p in tables]} "
            f"(name it with --transcripts)"
        )
    return tables[0]


def read_table(path: Path, delimiter: str | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, row)`` for each record of a CSV/TSV file with a header; ``line`` is where the record ends.

    The delimiter is a tab for ``.tsv`` and a comma otherwise unless given. Quoted fields may span lines.
    """
    if not path.is_file():
        raise CorpusImportError(f"{path}: transcript table not found")
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        # TSV transcripts (Common Voice) carry bare quotes inside sentences: quoting off for tabs
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise CorpusImportError(f"{path}:1: empty table (a header line is required)")
        for row in reader:
            yield reader.line_num, row


def require_columns(path: Path, header: list[str] | None, needed: dict[str, str | None]) -> None:
    """Raise when a mapped column (option name -> column) is not in the table's header."""
    header = header or []
    for option, column in needed.items():
        if column is not None and column not in header:
            raise CorpusImportError(f"{path}:1: {option}={column!r} is not a column of the header {header}")


def table_header(path: Path, delimiter: str | None = None) -> list[str]:
    """The header of a CSV/TSV file."""
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        first = next(csv.reader(handle, delimiter=delimiter), None)
    if not first:
        raise CorpusImportError(f"{path}:1: empty table (a header line is required)")
    return first


@dataclass
class TableColumns:
    """Which table column holds what (``None``: not in the table)."""

    audio: str = "audio"
    text: str = "text"
    language: str | None = None
    id: str | None = None
    context: str | None = None


def import_table(
    table: Path,
    writer: ManifestWriter,
    columns: TableColumns,
    audio_dir: Path,
    language: str | None = None,
    delimiter: str | None = None,
) -> dict[str, Any]:
    """A folder of audio files + a CSV/TSV transcript table -> manifest rows (audio referenced in place).

    Audio paths in the table are read against ``audio_dir`` (the table's folder by default). The language
    comes from ``columns.language`` or, for every row, ``language``.
    """
    header = table_header(table, delimiter)
    require_columns(
        table,
        header,
        {
            "--audio-column": columns.audio,
            "--text-column": columns.text,
            "--language-column": columns.language,
            "--id-column": columns.id,
            "--context-column": columns.context,
        },
    )
    if columns.language is None and language is None:
        raise CorpusImportError(f"{table}: give --language-column or --language")
    for line, row in read_table(table, delimiter):
        if None in row:  # more fields than the header
            writer.reject(
                table, line, "bad_table_row", f"{len(header) + len(row[None])} fields, header has {len(header)}"
            )
            continue
        name = (row.get(columns.audio) or "").strip()
        if not name:
            writer.reject(table, line, "no_audio_field", f"empty {columns.audio!r} column")
            continue
        path = Path(name) if os.path.isabs(name) else audio_dir / name
        uid = (row.get(columns.id) or "").strip() if columns.id else ""
        record: dict[str, Any] = {
            "id": uid or Path(name).with_suffix("").as_posix(),
            "audio": audio_reference(path, writer.out_dir),
            "text": (row.get(columns.text) or "").strip(),
            "language": (row.get(columns.language) or "").strip() if columns.language else language,
        }
        if columns.context and row.get(columns.context):
            record["context"] = row[columns.context]
        writer.add(record, table, line)
    return {"source": str(table)}


# ------------------------------------------------------------------------------------------- Kaldi
_ARK_OFFSET = re.compile(r":\d+$")


def _kaldi_map(path: Path, writer: ManifestWriter, required: bool) -> dict[str, tuple[str, int]]:
    """``key -> (rest of line, line number)`` of a Kaldi table file; duplicate keys are rejected."""
    if not path.is_file():
        if required:
            raise CorpusImportError(f"{path}: not found (a Kaldi data dir needs wav.scp and text)")
        return {}
    table: dict[str, tuple[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for n, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            key, _, rest = line.strip().partition(" ")
            if key in table:
                writer.reject(path, n, "duplicate_key", f"{key!r} already defined at line {table[key][1]}")
                continue
            table[key] = (rest.strip(), n)
    return table


def _wav_path(spec: str, where: str, audio_root: Path) -> tuple[Path | None, str, str]:
    """``(path, reason, message)`` for a ``wav.scp`` entry; path is None when the entry is refused."""
    if spec.endswith("|"):
        return (
            None,
            "wav_scp_pipe",
            f"{where}: {spec!r} is a pipe command; qwen3asr-data never runs shell commands from a corpus. Run "
            f"the command yourself to write an audio file (e.g. `{spec.rstrip('|').strip()} > rec.wav`) and "
            f"list that path in wav.scp",
        )
    if " " in spec:
        return None, "wav_scp_unsupported", f"{where}: {spec!r} is not a plain path (spaces: a command?)"
    path = Path(spec) if os.path.isabs(spec) else audio_root / spec
    if _ARK_OFFSET.search(spec) and not path.is_file():
        return None, "wav_scp_ark", f"{where}: {spec!r} is an ark offset; extract the audio to files first"
    return path, "", ""


def import_kaldi(
    data_dir: Path, writer: ManifestWriter, audio_root: Path | None = None, language: str | None = None
) -> dict[str, Any]:
    """A Kaldi data dir (``wav.scp``, ``text``, optional ``segments``, ``utt2lang``) -> manifest rows.

    One row per line of ``text`` (the utterances Kaldi trains on). Relative ``wav.scp`` paths are read
    against ``audio_root`` (default: the current folder, as Kaldi scripts run from the recipe root).
    Pipe commands and ark offsets in ``wav.scp`` are refused (one reject per utterance that needs them).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CorpusImportError(f"{data_dir}: not a Kaldi data directory")
    audio_root = audio_root or Path.cwd()
    wav_scp = _kaldi_map(data_dir / "wav.scp", writer, required=True)
    texts = _kaldi_map(data_dir / "text", writer, required=True)
    segments = _kaldi_map(data_dir / "segments", writer, required=False)
    langs = _kaldi_map(data_dir / "utt2lang", writer, required=False)
    if not langs and language is None:
        raise CorpusImportError(f"{data_dir}: no utt2lang file; give --language")
    text_file = data_dir / "text"
    used_segments: set[str] = set()
    for uid, (text, line) in texts.items():
        if segments:
            if uid not in segments:
                writer.reject(text_file, line, "no_segment", f"utterance {uid!r} has no line in segments")
                continue
            used_segments.add(uid)
            seg, seg_line = segments[uid]
            parts = seg.split()
            where = f"{data_dir / 'segments'}:{seg_line}"
            if len(parts) != 3:
                writer.reject(data_dir / "segments", seg_line, "bad_segment", "expected '<utt> <rec> <start> <end>'")
                continue
            recording = parts[0]
            try:
                start, end = float(parts[1]), float(parts[2])
            except ValueError:
                writer.reject(data_dir / "segments", seg_line, "bad_segment", f"times {parts[1:]!r} are not numbers")
                continue
        else:
            recording, start, end, where, seg_line = uid, 0.0, -1.0, str(text_file), 0
        if recording not in wav_scp:
            writer.reject(text_file, line, "no_recording", f"recording {recording!r} (from {where}) is not in wav.scp")
            continue
        spec, scp_line = wav_scp[recording]
        path, reason, message = _wav_path(spec, f"{data_dir / 'wav.scp'}:{scp_line}", audio_root)
        if path is None:
            writer.reject(text_file, line, reason, f"utterance {uid!r}: {message}")
            continue
        if uid in langs:
            label: str | None = langs[uid][0]
        else:
            label = language
        if label is None:
            writer.reject(
                text_file, line, "no_language", f"utterance {uid!r} has no line in utt2lang (or give --language)"
            )
            continue
        record: dict[str, Any] = {
            "id": uid,
            "audio": audio_reference(path, writer.out_dir),
            "text": text,
            "language": label,
        }
        if start or end >= 0:
            record["offset"] = start
        if end >= 0:  # Kaldi: end -1 means "to the end of the recording"
            if end <= start:
                writer.reject(
                    data_dir / "segments", int(where.rsplit(":", 1)[1]), "bad_segment", f"end {end} <= start {start}"
                )
                continue
            record["duration"] = round(end - start, 6)
        writer.add(record, text_file, line)
    for uid, (_, seg_line) in segments.items():
        if uid not in used_segments:
            writer.reject(data_dir / "segments", seg_line, "no_text", f"segment {uid!r} has no transcript in text")
    return {"source": str(data_dir)}


# ------------------------------------------------------------------------------------------- noise
NOISE_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".sph", ".aiff", ".aif")
"""Audio files a noise import picks up (what soundfile reads); other files (MUSAN's READMEs, ANNOTATIONS,
LICENSE) are counted as ignored."""


def import_noise(
    folder: Path, writer: ManifestWriter, max_seconds: float = 0.0, exclude: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """A folder of noise recordings (MUSAN-style: ``noise/``, ``music/``, ``speech/`` subfolders) -> no-speech rows.

    Why an importer of its own: ``data.augment.noise_manifests`` reads rows with ``audio`` (+ ``offset``/
    ``duration``); a noise corpus is a tree of files with no transcript. Every audio file under ``folder``
    (recursively, in sorted path order) becomes one row, or — when longer than ``max_seconds`` (> 0) — equal
    consecutive pieces of at most ``max_seconds`` referenced by offset/duration. Ids are the path under
    ``folder`` without its suffix (``music/fma/music-fma-0001``), so the category stays visible. ``exclude``:
    glob patterns on that path (``speech/*`` leaves out MUSAN's speech, as Kaldi and Lhotse recipes do for
    additive noise). Unreadable or too-short files are rejects with the file and a reason.
    """
    import fnmatch
    import math

    from qwen3asr_train.data.audio import AudioError, audio_info

    if not folder.is_dir():
        raise CorpusImportError(f"{folder}: noise folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    audio = [p for p in files if p.suffix.lower() in NOISE_SUFFIXES]
    excluded = 0
    for path in audio:
        rel = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(rel, pattern) for pattern in exclude):
            excluded += 1
            continue
        try:
            frames, rate = audio_info(path)
        except AudioError as exc:
            writer.reject(path, None, "audio_unreadable", str(exc))
            continue
        seconds = frames / rate if rate else 0.0
        pieces = math.ceil(seconds / max_seconds - 1e-9) if max_seconds > 0 and seconds > max_seconds else 1
        length = seconds / pieces
        stem = rel.rsplit(".", 1)[0]
        for k in range(pieces):
            row: dict[str, Any] = {
                "id": stem if pieces == 1 else f"{stem}-{k:04d}",
                "audio": audio_reference(path, writer.out_dir),
                "text": "",
                "no_speech": True,
                "duration": round(length, 3) if pieces > 1 else seconds,
            }
            if k:
                row["offset"] = round(k * length, 3)
            writer.add(row, path, None)
    return {
        "folder": str(folder),
        "audio_files": len(audio),
        "excluded_files": excluded,
        "ignored_files": len(files) - len(audio),
    }
