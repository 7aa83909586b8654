"""HF ``datasets`` -> our manifest: a ``save_to_disk`` folder, a local data folder, or a hub name.

Why import instead of training from the dataset (``data.hf_train``): a manifest is what the other tools
read (validate, report, Lhotse export, MFA), and wav files on shared storage are read by every node without
the Arrow cache. Audio cells are read as encoded bytes (``Audio(decode=False)``) and decoded with soundfile,
so no torchcodec/FFmpeg is needed, exactly as the training loader does.

``audio_mode="wav"`` writes each row's audio to ``OUT_DIR/wavs/<id>.wav`` (original rate, PCM16).
``audio_mode="reference"`` keeps the cell's file path (it must exist here), with optional offset/duration
columns for datasets that index segments of long files.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3asr_train.tools.importers import CorpusImportError, ManifestWriter, audio_reference, safe_name

log = logging.getLogger(__name__)


@dataclass
class HFColumns:
    """Column mapping (``None`` or ``""``: not in the dataset)."""

    audio: str = "audio"
    text: str = "text"
    language: str | None = "language"
    id: str | None = None
    context: str | None = None
    offset: str | None = None
    duration: str | None = None


def load_hf(dataset: str, split: str, name: str | None = None) -> Any:
    """The split of a ``save_to_disk`` folder, a local data folder (``load_dataset(folder)``) or a hub name."""
    import datasets

    path = Path(dataset)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CorpusImportError(f"{dataset}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(dataset, name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise CorpusImportError(f"{dataset}: cannot load split {split!r} ({exc})") from exc


def _decode_cell(cell: Any, where: str) -> tuple[np.ndarray, int] | str:
    """``(samples (n, channels), rate)`` of an audio cell, or the file path for a path-only cell."""
    import soundfile as sf

    if isinstance(cell, dict) and cell.get("array") is not None:
        return np.asarray(cell["array"], dtype=np.float32).reshape(len(cell["array"]), -1), int(cell["sampling_rate"])
    raw = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
    if raw:
        data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
        return data, rate
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
    if path:
        return str(path)
    raise ValueError(f"{where}: unsupported audio cell {type(cell).__name__} (no bytes, path or array)")


def _write_wav(data: np.ndarray, rate: int, out: Path) -> None:
    """Write PCM16 atomically (rerunning an import rewrites the same bytes)."""
    import soundfile as sf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.tmp-{os.getpid()}.wav")
    sf.write(str(tmp), data, rate, subtype="PCM_16")
    os.replace(tmp, out)


def import_hf(
    dataset: str,
    writer: ManifestWriter,
    columns: HFColumns,
    split: str = "train",
    name: str | None = None,
    language: str | None = None,
    audio_mode: str = "wav",
) -> dict[str, Any]:
    """Rows of an HF dataset split -> manifest rows (see the module docstring); rejects name ``dataset[split]:row``."""
    import datasets
    import soundfile as sf

    if audio_mode not in {"wav", "reference"}:
        raise CorpusImportError(f"audio_mode must be wav or reference, got {audio_mode!r}")
    ds = load_hf(dataset, split, name)
    mapping = {
        "--audio-column": columns.audio,
        "--text-column": columns.text,
        "--language-column": columns.language or None,
        "--id-column": columns.id,
        "--context-column": columns.context,
        "--offset-column": columns.offset,
        "--duration-column": columns.duration,
    }
    for option, column in mapping.items():
        if column and column not in ds.column_names:
            hint = " (pass --language-column '' and --language <name>)" if option == "--language-column" else ""
            raise CorpusImportError(
                f"{dataset}[{split}]: {option}={column!r} is not a column of {ds.column_names}{hint}"
            )
    if not columns.language and language is None:
        raise CorpusImportError(f"{dataset}[{split}]: give --language-column or --language")
    if (columns.offset or columns.duration) and audio_mode != "reference":
        raise CorpusImportError("--offset-column/--duration-column need --audio-mode reference (segments of files)")
    if isinstance(ds.features[columns.audio], datasets.Audio):
        ds = ds.cast_column(columns.audio, datasets.Audio(decode=False))
    source = f"{dataset}[{split}]"
    for index, row in enumerate(ds):
        uid = str(row[columns.id]) if columns.id and row[columns.id] is not None else f"{split}-{index:07d}"
        label = (row[columns.language] if columns.language else None) or language
        record: dict[str, Any] = {"id": uid, "text": (row[columns.text] or "").strip(), "language": label}
        if columns.context and row[columns.context]:
            record["context"] = row[columns.context]
        try:
            cell = _decode_cell(row[columns.audio], f"{source}:{index}")
            if audio_mode == "reference":
                if not isinstance(cell, str):
                    writer.reject(
                        source, index, "no_file", "audio cell holds bytes/samples, no file path: use --audio-mode wav"
                    )
                    continue
                record["audio"] = audio_reference(Path(cell), writer.out_dir)
                if columns.offset:
                    record["offset"] = row[columns.offset]
                if columns.duration:
                    record["duration"] = row[columns.duration]
            else:
                if isinstance(cell, str):
                    if not Path(cell).is_file():
                        writer.reject(source, index, "audio_missing", f"audio file not found: {cell}")
                        continue
                    data, rate = sf.read(cell, dtype="float32", always_2d=True)
                else:
                    data, rate = cell
                out = writer.audio_dir / f"{safe_name(uid)}.wav"
                _write_wav(data, rate, out)
                record["audio"] = audio_reference(out, writer.out_dir)
        except (ValueError, RuntimeError, sf.LibsndfileError) as exc:
            writer.reject(source, index, "audio_unreadable", f"cannot read audio ({exc})")
            continue
        writer.add(record, source, index)
    return {"source": source, "rows_in_split": len(ds)}
