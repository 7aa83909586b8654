"""Long recordings -> segments: at given times, or at low-energy points under a maximum length.

Three modes (``qwen3asr-data segment``):

* ``times``: a CSV/TSV of ``start,end,text`` (+ optional ``language``, ``id``, ``audio``) -> one row per line.
* ``times`` + ``max_seconds``: consecutive lines are merged into segments of at most ``max_seconds``; each
  cut lies in the gap between two lines, at the middle of its quietest stretch (subtitle-level times are
  short and imprecise; training wants longer segments that do not cut a word).
* energy only (no times): the recording is cut at low-energy points into segments of at most
  ``max_seconds``; without a transcript the segments are no-speech rows (``--no-speech``: noise or music
  corpora, e.g. as the noise manifest of the augmentation layer).

Segments reference the recording with ``offset``/``duration`` (nothing copied) unless ``write_wavs`` asks for
one file per segment (for tools that cannot seek).

Energy: mean square per 10 ms frame, read block by block (memory does not grow with the recording), in dB,
smoothed over 50 ms. A cut goes to the centre of the longest run of frames within 3 dB of the quietest frame
in the allowed window (later runs win ties, giving longer segments).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3asr_train.tools.importers import (
    CorpusImportError,
    ManifestWriter,
    audio_reference,
    read_table,
    safe_name,
    table_header,
)

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.01
"""Energy frame (and cut-point resolution)."""
SMOOTH_FRAMES = 5
"""Frames averaged before choosing a cut (50 ms)."""
QUIET_MARGIN_DB = 3.0
"""Frames within this much of the quietest frame count as one quiet stretch."""
NO_SPACE_LANGUAGES = frozenset({"Chinese", "Cantonese", "Japanese", "Thai"})
"""Texts of merged lines are joined without a space in these languages."""


def frame_energy_db(path: Path, frame_seconds: float = FRAME_SECONDS) -> tuple[np.ndarray, float]:
    """``(energy in dB per frame, file duration in s)``, channels averaged, read in blocks."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as handle:
        rate, total = handle.samplerate, handle.frames
        hop = max(1, int(round(frame_seconds * rate)))
        block = hop * 6000  # one minute at 10 ms frames
        energies = []
        for data in handle.blocks(blocksize=block, dtype="float32", always_2d=True):
            mono = data.mean(axis=1)
            usable = len(mono) // hop * hop
            if usable:
                energies.append((mono[:usable].reshape(-1, hop) ** 2).mean(axis=1))
            if len(mono) > usable:  # the file's last partial frame
                energies.append(np.array([(mono[usable:] ** 2).mean()]))
    power = np.concatenate(energies) if energies else np.zeros(0)
    return 10 * np.log10(power + 1e-10), total / rate


def smooth(db: np.ndarray, frames: int = SMOOTH_FRAMES) -> np.ndarray:
    """Moving average over ``frames`` frames (same length)."""
    if len(db) < frames:
        return db.copy()
    kernel = np.ones(frames) / frames
    padded = np.pad(db, (frames // 2, frames - 1 - frames // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def quiet_point(db: np.ndarray, lo: int, hi: int) -> int:
    """Frame index in ``[lo, hi)`` at the centre of the longest stretch near the window's minimum."""
    window = db[lo:hi]
    if len(window) == 0:
        raise ValueError(f"empty window [{lo}, {hi})")
    quiet = window <= window.min() + QUIET_MARGIN_DB
    best_len, best_mid, run_start = -1, 0, None
    for i, q in enumerate([*quiet.tolist(), False]):
        if q and run_start is None:
            run_start = i
        elif not q and run_start is not None:
            length = i - run_start
            if length >= best_len:  # later runs win ties
                best_len, best_mid = length, (run_start + i - 1) // 2
            run_start = None
    return lo + best_mid


def energy_cuts(db: np.ndarray, duration: float, max_seconds: float, min_seconds: float) -> list[tuple[float, float]]:
    """Segments ``(start, end)`` covering the recording, each at most ``max_seconds``, cut at quiet points."""
    if max_seconds <= min_seconds:
        raise ValueError(f"max_seconds={max_seconds} must exceed min_seconds={min_seconds}")
    level = smooth(db)
    segments = []
    start = 0.0
    while duration - start > max_seconds:
        lo = int(np.ceil((start + min_seconds) / FRAME_SECONDS))
        hi = int(np.floor((start + max_seconds) / FRAME_SECONDS))  # a cut at frame centre <= start + max
        cut = (quiet_point(level, lo, hi) + 0.5) * FRAME_SECONDS
        cut = min(cut, start + max_seconds)
        segments.append((start, cut))
        start = cut
    segments.append((start, duration))
    return segments


@dataclass
class TimedLine:
    """One line of a times table."""

    start: float
    end: float
    text: str
    language: str | None
    id: str | None
    line: int


def _read_times(
    table: Path, recordings: list[Path], writer: ManifestWriter, language: str | None
) -> dict[Path, list[TimedLine]]:
    """Lines of a times table grouped by recording (an ``audio`` column is needed for several recordings)."""
    header = table_header(table)
    for column in ("start", "end", "text"):
        if column not in header:
            raise CorpusImportError(f"{table}:1: the times table needs a {column!r} column (header: {header})")
    if len(recordings) > 1 and "audio" not in header:
        raise CorpusImportError(f"{table}:1: several recordings need an 'audio' column naming each line's recording")
    by_name = {p.name: p for p in recordings} | {str(p): p for p in recordings}
    grouped: dict[Path, list[TimedLine]] = {p: [] for p in recordings}
    for line, row in read_table(table):
        try:
            start, end = float(row["start"]), float(row["end"])
        except (TypeError, ValueError):
            writer.reject(
                table, line, "bad_segment", f"start/end {row.get('start')!r}/{row.get('end')!r} are not numbers"
            )
            continue
        if not 0 <= start < end:
            writer.reject(table, line, "bad_segment", f"need 0 <= start < end, got start={start} end={end}")
            continue
        recording = recordings[0]
        if len(recordings) > 1 or row.get("audio"):
            name = (row.get("audio") or "").strip()
            if name not in by_name:
                writer.reject(table, line, "no_recording", f"audio {name!r} is not one of the recordings given")
                continue
            recording = by_name[name]
        label = (row.get("language") or "").strip() or language
        grouped[recording].append(
            TimedLine(start, end, (row["text"] or "").strip(), label, row.get("id") or None, line)
        )
    return grouped


def _join(texts: list[str], language: str | None) -> str:
    return ("" if language in NO_SPACE_LANGUAGES else " ").join(t for t in texts if t)


def _merge_lines(
    lines: list[TimedLine], db: np.ndarray, duration: float, max_seconds: float
) -> list[tuple[float, float, list[TimedLine]]]:
    """Group consecutive lines into segments <= ``max_seconds`` cut at the quiet point of each gap."""
    level = smooth(db)
    cuts = []  # cuts[k]: boundary before lines[k]; cuts[n]: after the last line
    edges = [0.0] + [line.end for line in lines]
    starts = [line.start for line in lines] + [duration]
    for gap_lo, gap_hi in zip(edges, starts, strict=True):
        lo, hi = int(np.floor(gap_lo / FRAME_SECONDS)), int(np.ceil(gap_hi / FRAME_SECONDS))
        if hi - lo < 1 or gap_hi <= gap_lo:
            cuts.append(min(max(gap_lo, 0.0), duration))  # touching or overlapping lines: cut at the end
        else:
            cut = (quiet_point(level, lo, min(hi, len(level))) + 0.5) * FRAME_SECONDS
            cuts.append(min(max(cut, gap_lo), gap_hi))
    groups: list[tuple[float, float, list[TimedLine]]] = []
    a = 0
    while a < len(lines):
        b = a + 1
        while b < len(lines) and cuts[b + 1] - cuts[a] <= max_seconds:
            b += 1
        if cuts[b] - cuts[a] <= max_seconds:
            groups.append((cuts[a], cuts[b], lines[a:b]))
        else:  # one line whose surrounding silence is too long: keep just the line's own times
            groups.append((lines[a].start, lines[a].end, lines[a : a + 1]))
        a = b
    return groups


def _write_segment(recording: Path, start: float, end: float, out: Path) -> None:
    """Copy ``[start, end)`` of ``recording`` to its own wav (original rate, PCM16), atomically."""
    import soundfile as sf

    with sf.SoundFile(str(recording)) as handle:
        rate = handle.samplerate
        handle.seek(int(round(start * rate)))
        data = handle.read(int(round((end - start) * rate)), dtype="float32", always_2d=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.tmp-{os.getpid()}.wav")
    sf.write(str(tmp), data, rate, subtype="PCM_16")
    os.replace(tmp, out)


def segment_recordings(
    recordings: list[Path],
    writer: ManifestWriter,
    times: Path | None = None,
    max_seconds: float | None = None,
    min_seconds: float = 1.0,
    language: str | None = None,
    no_speech: bool = False,
    write_wavs: bool = False,
) -> dict[str, Any]:
    """Cut ``recordings`` (see the module docstring for the modes) and add one row per segment."""
    if times is None and max_seconds is None:
        raise CorpusImportError("give --times (a start,end,text table) and/or --max-seconds")
    if times is None and not no_speech:
        raise CorpusImportError(
            "without --times the segments have no transcript: pass --no-speech for noise/music recordings"
        )
    for recording in recordings:
        if not recording.is_file():
            raise CorpusImportError(f"{recording}: recording not found")
    grouped = _read_times(times, recordings, writer, language) if times is not None else {}
    segments = 0
    for recording in recordings:
        stem = safe_name(recording.stem)
        db, duration = frame_energy_db(recording)
        plan: list[tuple[float, float, str, str | None, str | None, Path | str, int | None]] = []
        if times is None:
            assert max_seconds is not None
            for k, (s, e) in enumerate(energy_cuts(db, duration, max_seconds, min_seconds)):
                plan.append((s, e, "", None, f"{stem}-{k:05d}", recording, None))
        else:
            lines = sorted(grouped[recording], key=lambda t: (t.start, t.end))
            if max_seconds is None:
                for t in lines:
                    if t.end > duration + 0.02:
                        writer.reject(
                            times,
                            t.line,
                            "bad_segment",
                            f"end {t.end}s is past the end of {recording} ({duration:.3f}s)",
                        )
                        continue
                    plan.append((t.start, min(t.end, duration), t.text, t.language, t.id, times, t.line))
            else:
                for s, e, group in _merge_lines(lines, db, duration, max_seconds):
                    if e - s > max_seconds:
                        for t in group:
                            writer.reject(
                                times, t.line, "audio_too_long", f"line is {e - s:.2f}s > --max-seconds {max_seconds}"
                            )
                        continue
                    labels = {t.language for t in group}
                    if len(labels) > 1:
                        for t in group[1:]:
                            writer.reject(
                                times, t.line, "mixed_language", f"merged with line {group[0].line} of another language"
                            )
                        group = group[:1]
                        s, e = group[0].start, group[0].end
                    uid = group[0].id if len(group) == 1 and group[0].id else None
                    plan.append(
                        (
                            s,
                            e,
                            _join([t.text for t in group], group[0].language),
                            group[0].language,
                            uid,
                            times,
                            group[0].line,
                        )
                    )
        for k, (s, e, text, label, uid, file, line) in enumerate(plan):
            uid = uid or f"{stem}-{int(round(s * 1000)):08d}-{int(round(e * 1000)):08d}"
            record: dict[str, Any] = {"id": uid, "text": text}
            if no_speech and times is None:
                record["no_speech"] = True
            else:
                record["language"] = label
            if write_wavs:
                out = writer.audio_dir / stem / f"{safe_name(uid)}.wav"
                _write_segment(recording, s, e, out)
                record.update(audio=audio_reference(out, writer.out_dir), duration=round(e - s, 6))
            else:
                record.update(
                    audio=audio_reference(recording, writer.out_dir), offset=round(s, 6), duration=round(e - s, 6)
                )
            segments += writer.add(record, file if line is not None else recording, line if line is not None else k + 1)
    return {"recordings": len(recordings), "segments": segments}
