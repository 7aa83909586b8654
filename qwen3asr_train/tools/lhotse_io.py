"""Lhotse manifests <-> our manifest, losslessly for the fields we train on.

Mapping (one manifest row = one Lhotse supervision on one recording):

=====================  =====================================================================
manifest               Lhotse
=====================  =====================================================================
``audio``              ``Recording.sources[0]`` (type ``file``; one recording per audio file)
``offset``             ``SupervisionSegment.start`` (recording time; cut-relative in a cut,
                       plus the cut's start)
``duration``           ``SupervisionSegment.duration``
``id``                 ``SupervisionSegment.id``
``text``, ``language`` ``SupervisionSegment.text``, ``.language``
``words``              ``alignment["word"]`` (``AlignmentItem`` times in recording time, as
                       Lhotse keeps them also inside a trimmed cut; manifest word times are
                       relative to the utterance start)
``context``            ``custom["context"]``
``no_speech``          ``custom["no_speech"]`` (text ``""``, language ``None``)
=====================  =====================================================================

Import refuses what our loader would read differently (one reject each): recordings that are not one
plain file (URL, command, in-memory), recordings with transforms (speed/volume perturbation is the
augmentation layer's job here), supervisions on a subset of a multi-channel recording (our loader averages
all channels), and mixed cuts. Lhotse manifests are JSONL, so a reject's line is the item's line.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

from qwen3asr_train.tools.importers import CorpusImportError, ManifestWriter, audio_reference, safe_name

log = logging.getLogger(__name__)

TIME_DECIMALS = 6
"""Times are rounded to a microsecond on the way back (undoes float noise of offset arithmetic)."""


def _recording_id(path: Path) -> str:
    """A stable, readable recording id for an audio file (its stem plus a hash of the absolute path)."""
    return f"{safe_name(path.stem)}-{zlib.crc32(str(path).encode()):08x}"


def export_lhotse(manifest: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``recordings.jsonl.gz``, ``supervisions.jsonl.gz`` and ``cuts.jsonl.gz`` (a cut per row) to ``out_dir``."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.supervision import AlignmentItem

    from qwen3asr_train.data.manifest import RowChecks, read_manifest
    from qwen3asr_train.languages import LanguageTable

    utterances = read_manifest(manifest, RowChecks(LanguageTable()), "error")
    recordings: dict[str, Recording] = {}
    supervisions = []
    for utt in utterances:
        path = Path(utt.audio).absolute()
        rec_id = _recording_id(path)
        if rec_id not in recordings:
            recordings[rec_id] = Recording.from_file(path, recording_id=rec_id)
        custom: dict[str, Any] = {}
        if utt.context:
            custom["context"] = utt.context
        if utt.no_speech:
            custom["no_speech"] = True
        alignment = None
        if utt.words is not None:
            alignment = {"word": [AlignmentItem(w.word, utt.offset + w.start, w.end - w.start) for w in utt.words]}
        supervisions.append(
            SupervisionSegment(
                id=utt.id,
                recording_id=rec_id,
                start=utt.offset,
                duration=utt.duration,
                channel=recordings[rec_id].channel_ids if recordings[rec_id].num_channels > 1 else 0,
                text=utt.text,
                language=utt.dialect or utt.language,
                custom=custom or None,
                alignment=alignment,
            )
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_set = RecordingSet.from_recordings(recordings.values())
    sup_set = SupervisionSet.from_segments(supervisions)
    paths = {
        "recordings": out_dir / "recordings.jsonl.gz",
        "supervisions": out_dir / "supervisions.jsonl.gz",
        "cuts": out_dir / "cuts.jsonl.gz",
    }
    rec_set.to_file(paths["recordings"])
    sup_set.to_file(paths["supervisions"])
    cuts = CutSet.from_manifests(recordings=rec_set, supervisions=sup_set).trim_to_supervisions(
        keep_overlapping=False, keep_all_channels=True
    )
    cuts.to_file(paths["cuts"])
    return {
        **{k: str(v) for k, v in paths.items()},
        "recordings_count": len(recordings),
        "supervisions": len(supervisions),
    }


def _check_recording(rec: Any, sup: Any) -> tuple[str, str] | None:
    """``(reason, message)`` when our loader would not read this recording as Lhotse does; else None."""
    if len(rec.sources) != 1 or rec.sources[0].type != "file":
        kinds = [s.type for s in rec.sources]
        return "lhotse_source", f"recording {rec.id!r} has sources {kinds}; only one plain file is supported"
    if rec.transforms:
        return "lhotse_transform", f"recording {rec.id!r} has transforms {rec.transforms}; import the plain recording"
    channels = sup.channel if isinstance(sup.channel, list) else [sup.channel]
    if rec.num_channels > 1 and sorted(channels) != sorted(rec.channel_ids):
        return (
            "lhotse_channel",
            f"supervision {sup.id!r} is on channel(s) {channels} of a {rec.num_channels}-channel recording; "
            f"training averages all channels",
        )
    return None


def _row(sup: Any, rec: Any, start: float, out_dir: Path | None, language: str | None) -> dict[str, Any]:
    """A manifest row for supervision ``sup`` starting at ``start`` s into recording ``rec``.

    ``out_dir``: the audio path is written relative to it when the file lies under it (an import); ``None``
    writes it absolute, resolved as Lhotse resolves it (lazy training reads, :func:`cut_rows`)."""
    custom = sup.custom or {}
    source = Path(rec.sources[0].source)
    record: dict[str, Any] = {
        "id": sup.id,
        "audio": audio_reference(source, out_dir) if out_dir is not None else str(source.absolute()),
        "text": sup.text or "",
        "offset": round(start, TIME_DECIMALS),
        "duration": round(sup.duration, TIME_DECIMALS),
    }
    if custom.get("no_speech"):
        record["no_speech"] = True
    else:
        record["language"] = sup.language or language
    if custom.get("context"):
        record["context"] = custom["context"]
    if sup.alignment and "word" in sup.alignment:
        record["words"] = [
            {
                "word": item.symbol,
                "start": round(item.start - start, TIME_DECIMALS),
                "end": round(item.start - start + item.duration, TIME_DECIMALS),
            }
            for item in sup.alignment["word"]
        ]
    return record


def import_lhotse(manifests: list[Path], writer: ManifestWriter, language: str | None = None) -> dict[str, Any]:
    """Cuts, or recordings + supervisions manifests -> manifest rows (see the module docstring)."""
    from lhotse import CutSet, RecordingSet, SupervisionSet, load_manifest
    from lhotse.cut import MonoCut

    loaded = []
    for path in manifests:
        if not path.is_file():
            raise CorpusImportError(f"{path}: Lhotse manifest not found")
        try:
            loaded.append((path, load_manifest(path)))
        except Exception as exc:  # lhotse raises ValueError/KeyError/JSON errors for unknown content
            raise CorpusImportError(f"{path}: not a Lhotse manifest ({type(exc).__name__}: {exc})") from exc
    cut_sets = [(p, m) for p, m in loaded if isinstance(m, CutSet)]
    rec_sets = [(p, m) for p, m in loaded if isinstance(m, RecordingSet)]
    sup_sets = [(p, m) for p, m in loaded if isinstance(m, SupervisionSet)]
    if len(cut_sets) + len(rec_sets) + len(sup_sets) != len(loaded):
        raise CorpusImportError(f"{manifests}: only cuts, recordings and supervisions manifests can be imported")
    if sup_sets and len(rec_sets) != 1:
        raise CorpusImportError("supervisions need exactly one recordings manifest next to them")
    if rec_sets and not sup_sets:
        raise CorpusImportError(f"{rec_sets[0][0]}: recordings without supervisions have no transcripts")
    for path, cuts in cut_sets:
        for line, cut in enumerate(cuts, start=1):
            if not isinstance(cut, MonoCut) or cut.recording is None:
                writer.reject(
                    path, line, "lhotse_mixed_cut", f"cut {cut.id!r} is a {type(cut).__name__} without one recording"
                )
                continue
            if not cut.supervisions:
                writer.reject(path, line, "no_supervision", f"cut {cut.id!r} has no supervision (no transcript)")
                continue
            for sup in cut.supervisions:
                problem = _check_recording(cut.recording, sup)
                if problem:
                    writer.reject(path, line, *problem)
                    continue
                writer.add(_row(sup, cut.recording, cut.start + sup.start, writer.out_dir, language), path, line)
    if sup_sets:
        rec_path, recs = rec_sets[0]
        for path, sups in sup_sets:
            for line, sup in enumerate(sups, start=1):
                if sup.recording_id not in recs:
                    writer.reject(path, line, "no_recording", f"recording {sup.recording_id!r} is not in {rec_path}")
                    continue
                rec = recs[sup.recording_id]
                problem = _check_recording(rec, sup)
                if problem:
                    writer.reject(path, line, *problem)
                    continue
                writer.add(_row(sup, rec, sup.start, writer.out_dir, language), path, line)
    return {"sources": [str(p) for p in manifests]}


def is_cut_row(row: Any) -> bool:
    """Whether a decoded JSONL row is a serialised Lhotse cut (``MonoCut``/``MixedCut`` have a ``type``)."""
    return isinstance(row, dict) and row.get("type") in {"MonoCut", "MixedCut", "PaddingCut", "MultiCut"}


def cut_rows(row: dict[str, Any], language: str | None = None) -> list[dict[str, Any]] | tuple[str, str]:
    """The manifest rows of one serialised cut (one per supervision), or ``(reason, message)`` for a reject.

    Why: lazy training (``data.lazy``) reads Lhotse cut manifests line by line, so each cut goes through
    the same mapping as :func:`import_lhotse` and then the same row checks as our own manifests.
    """
    from lhotse.cut import MonoCut
    from lhotse.serialization import deserialize_item

    try:
        cut = deserialize_item(row)
    except Exception as exc:  # lhotse raises KeyError/TypeError/ValueError for malformed items
        return "lhotse_bad_cut", f"not a readable Lhotse cut ({type(exc).__name__}: {exc})"
    if not isinstance(cut, MonoCut) or cut.recording is None:
        return "lhotse_mixed_cut", f"cut {cut.id!r} is a {type(cut).__name__} without one recording"
    if not cut.supervisions:
        return "no_supervision", f"cut {cut.id!r} has no supervision (no transcript)"
    rows = []
    for sup in cut.supervisions:
        problem = _check_recording(cut.recording, sup)
        if problem:
            return problem
        rows.append(_row(sup, cut.recording, cut.start + sup.start, None, language))
    return rows
