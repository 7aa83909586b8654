"""``qwen3asr-data`` subcommands for corpus import and the data report (see ``tools/cli.py`` for the conventions).

Kept apart from ``cli.py`` so that file stays the list of conventions and the older commands; the handlers
import their modules on call, so ``--help`` never imports torch or datasets.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("qwen3asr_train.tools")

PROG = "qwen3asr-data"
EXIT_OK, EXIT_NOTHING_WRITTEN = 0, 1
TEXT = argparse.RawDescriptionHelpFormatter
LAYOUT = (
    "Writes OUT_DIR/manifest.jsonl (rows checked as training checks them), OUT_DIR/rejects.jsonl (file, line,\n"
    "reason, message of every input row not used) and, for audio it creates, OUT_DIR/wavs/. Rerunning gives\n"
    "identical files. Exit 1 when no row was written."
)


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def _finish(command: str, writer: Any, extra: dict[str, Any]) -> int:
    """Write the import, print its summary, exit 1 when nothing was written."""
    summary = writer.finish(**extra)
    _emit(summary)
    if not summary["written"]:
        logger.error("%s %s: nothing written: every row was rejected; see %s", PROG, command, summary["rejects"])
        return EXIT_NOTHING_WRITTEN
    return EXIT_OK


def _writer(args: argparse.Namespace) -> Any:
    from qwen3asr_train.tools.importers import ImportLimits, ManifestWriter

    limits = ImportLimits(args.max_duration, args.min_duration, list(args.extra_languages))
    return ManifestWriter(args.out_dir, limits)


def _common(p: argparse.ArgumentParser, log_default: str = "INFO") -> None:
    p.add_argument("--out-dir", required=True, help="where manifest.jsonl, rejects.jsonl (and wavs/) go")
    p.add_argument("--max-duration", type=float, default=1200.0, help="longest accepted row in s (default 1200)")
    p.add_argument("--min-duration", type=float, default=0.05, help="shortest accepted row in s (default 0.05)")
    p.add_argument("--extra-languages", nargs="*", default=[], help="languages to accept beyond the model's")
    p.add_argument("--log-level", default=log_default, help=f"logging level (default: {log_default})")


# ------------------------------------------------------------------------------------------ handlers
def cmd_import_table(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.importers import TableColumns, find_table, import_table

    folder = Path(args.folder)
    table = Path(args.transcripts) if args.transcripts else find_table(folder)
    if not table.is_absolute() and not table.exists():
        table = folder / table
    columns = TableColumns(
        args.audio_column, args.text_column, args.language_column, args.id_column, args.context_column
    )
    writer = _writer(args)
    extra = import_table(
        table, writer, columns, Path(args.audio_dir) if args.audio_dir else table.parent, args.language, args.delimiter
    )
    return _finish("import-table", writer, extra)


def cmd_import_kaldi(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.importers import import_kaldi

    writer = _writer(args)
    extra = import_kaldi(Path(args.data_dir), writer, Path(args.audio_root) if args.audio_root else None, args.language)
    return _finish("import-kaldi", writer, extra)


def cmd_segment(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.segment import segment_recordings

    writer = _writer(args)
    extra = segment_recordings(
        [Path(p) for p in args.recordings],
        writer,
        times=Path(args.times) if args.times else None,
        max_seconds=args.max_seconds,
        min_seconds=args.min_seconds,
        language=args.language,
        no_speech=args.no_speech,
        write_wavs=args.write_wavs,
    )
    return _finish("segment", writer, extra)


def cmd_import_noise(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.importers import import_noise

    writer = _writer(args)
    extra = import_noise(Path(args.folder), writer, args.max_seconds, list(args.exclude))
    return _finish("import-noise", writer, extra)


def cmd_import_hf(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.hf_import import HFColumns, import_hf

    columns = HFColumns(
        audio=args.audio_column,
        text=args.text_column,
        language=args.language_column,
        id=args.id_column,
        context=args.context_column,
        offset=args.offset_column,
        duration=args.duration_column,
    )
    writer = _writer(args)
    extra = import_hf(
        args.dataset,
        writer,
        columns,
        split=args.split,
        name=args.name,
        language=args.language,
        audio_mode=args.audio_mode,
    )
    return _finish("import-hf", writer, extra)


def cmd_import_lhotse(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.lhotse_io import import_lhotse

    writer = _writer(args)
    extra = import_lhotse([Path(p) for p in args.manifests], writer, language=args.language)
    return _finish("import-lhotse", writer, extra)


def cmd_export_lhotse(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.lhotse_io import export_lhotse

    result = export_lhotse(Path(args.manifest), Path(args.out_dir))
    _emit(result)
    if not result["supervisions"]:
        logger.error("%s export-lhotse: nothing written: %s has no rows", PROG, args.manifest)
        return EXIT_NOTHING_WRITTEN
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from qwen3asr_train.tools.report import data_report

    summary = data_report([Path(p) for p in args.manifests], Path(args.out_dir), bins=args.bins)
    _emit(summary)
    if not summary["rows"]:
        logger.error("%s report: nothing reported: no readable row in %s", PROG, args.manifests)
        return EXIT_NOTHING_WRITTEN
    return EXIT_OK


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors of these commands that are bad input (one line, exit 1), not bugs."""
    from qwen3asr_train.tools.importers import CorpusImportError

    return (CorpusImportError,)


# -------------------------------------------------------------------------------------------- parser
def add_import_commands(sub: Any) -> None:
    """Add the import, segment, Lhotse and report subcommands to the ``qwen3asr-data`` parser."""
    p = sub.add_parser(
        "import-table",
        help="folder of audio + CSV/TSV transcripts -> manifest",
        formatter_class=TEXT,
        description=(
            "Import a folder of audio files with a CSV/TSV transcript table (a header line naming the columns;\n"
            "tab-separated for .tsv). Audio paths in the table are read against --audio-dir (default: the\n"
            "table's folder); audio is referenced in place.\n\n" + LAYOUT + "\n\n"
            "example: qwen3asr-data import-table calls/ --transcripts calls/transcripts.csv --language en --out-dir data/calls\n"
            "Common Voice: qwen3asr-data import-table cv/en --transcripts validated.tsv --audio-dir cv/en/clips \\\n"
            "    --audio-column path --text-column sentence --language-column locale --out-dir data/cv-en"
        ),
    )
    p.add_argument("folder", help="folder with the audio and the transcript table")
    p.add_argument("--transcripts", help="the table (default: the one .csv/.tsv file in FOLDER)")
    p.add_argument("--audio-dir", help="folder the table's audio paths are relative to (default: the table's)")
    p.add_argument("--audio-column", default="audio", help="column with the audio file name (default: audio)")
    p.add_argument("--text-column", default="text", help="column with the transcript (default: text)")
    p.add_argument("--language-column", help="column with the language (name or ISO code)")
    p.add_argument("--language", help="language of every row (when there is no language column)")
    p.add_argument("--id-column", help="column with the utterance id (default: the audio path without suffix)")
    p.add_argument("--context-column", help="column with biasing context for the system turn")
    p.add_argument("--delimiter", help="field separator (default: tab for .tsv, comma otherwise)")
    _common(p)
    p.set_defaults(func=cmd_import_table)

    p = sub.add_parser(
        "import-kaldi",
        help="Kaldi data dir (wav.scp, text, segments, utt2lang) -> manifest",
        formatter_class=TEXT,
        description=(
            "Import a Kaldi data directory: wav.scp (plain paths; pipe commands and ark offsets are refused,\n"
            "one reject per utterance that needs them), text, optional segments (end -1 = to the end) and\n"
            "utt2lang. One row per line of text. Relative wav.scp paths are read against --audio-root\n"
            "(default: the current folder, where Kaldi recipes run).\n\n" + LAYOUT + "\n\n"
            "example: qwen3asr-data import-kaldi egs/data/train --audio-root egs --language en --out-dir data/train"
        ),
    )
    p.add_argument("data_dir", help="Kaldi data dir")
    p.add_argument("--audio-root", help="folder relative wav.scp paths are read against (default: current)")
    p.add_argument("--language", help="language of utterances without a utt2lang line")
    _common(p)
    p.set_defaults(func=cmd_import_kaldi)

    p = sub.add_parser(
        "segment",
        help="long recordings -> segments at given times or at low-energy points",
        formatter_class=TEXT,
        description=(
            "Cut long recordings into training segments. --times TABLE (CSV/TSV with start,end,text and optional\n"
            "language,id,audio columns): one segment per line; with --max-seconds as well, consecutive lines are\n"
            "merged into segments of at most that length, cut in the quietest part of the gap between lines.\n"
            "--max-seconds alone: cut at low-energy points into segments of at most that length; without a\n"
            "transcript these are no-speech rows (--no-speech; e.g. a noise manifest). Segments reference the\n"
            "recording with offset/duration, or are written as files with --write-wavs.\n\n" + LAYOUT + "\n\n"
            "example: qwen3asr-data segment lecture.wav --times lecture.tsv --max-seconds 30 --language en --out-dir data/lecture"
        ),
    )
    p.add_argument("recordings", nargs="+", help="long audio files")
    p.add_argument("--times", help="CSV/TSV of start,end,text (+ language, id, audio)")
    p.add_argument("--max-seconds", type=float, help="longest segment in s (energy cuts / merging lines)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest energy-cut segment in s (default 1)")
    p.add_argument("--language", help="language of lines without a language column")
    p.add_argument("--no-speech", action="store_true", help="energy cuts are no-speech rows (noise, music)")
    p.add_argument("--write-wavs", action="store_true", help="write each segment to OUT_DIR/wavs/ instead of offsets")
    _common(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "import-noise",
        help="folder of noise recordings (MUSAN-style) -> noise manifest for data.augment",
        formatter_class=TEXT,
        description=(
            "Import a folder of noise recordings (e.g. MUSAN: noise/, music/, speech/) as no-speech rows, the\n"
            "noise manifest data.augment.noise_manifests reads. Every audio file under FOLDER (recursively,\n"
            "sorted) is one row with id = its path under FOLDER without suffix; files longer than --max-seconds\n"
            "are referenced as equal pieces (offset/duration). --exclude PATTERN (repeatable, a glob on that\n"
            "path) leaves files out, e.g. MUSAN's speech. Unreadable and too-short files are rejects; other\n"
            "files (READMEs, LICENSE) are counted as ignored. Audio is referenced in place.\n\n" + LAYOUT + "\n\n"
            "example: qwen3asr-data import-noise musan --exclude 'speech/*' --max-seconds 60 --out-dir data/noise\n"
            "then:    data.augment.noise_prob=0.5 data.augment.noise_manifests=data/noise/manifest.jsonl"
        ),
    )
    p.add_argument("folder", help="folder of noise recordings (searched recursively)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="split longer files into pieces (0 = whole files)")
    p.add_argument("--exclude", action="append", default=[], help="glob on the path under FOLDER to leave out")
    _common(p)
    p.set_defaults(func=cmd_import_noise)

    p = sub.add_parser(
        "import-hf",
        help="HF datasets (save_to_disk folder or hub name) -> manifest",
        formatter_class=TEXT,
        description=(
            "Import a Hugging Face dataset: a save_to_disk folder, a local data folder, or a hub name (needs the\n"
            "hub). Columns are mapped with --*-column. --audio-mode wav (default) writes every row's audio to\n"
            "OUT_DIR/wavs/<id>.wav (decoded with soundfile, original rate, PCM16); --audio-mode reference keeps\n"
            "the cell's file path (optionally with --offset-column/--duration-column for segments of long files).\n\n"
            + LAYOUT
            + "\n\n"
            "example: qwen3asr-data import-hf saved/fleurs_en --split train --text-column transcription \\\n"
            "    --language en --language-column '' --out-dir data/fleurs-en"
        ),
    )
    p.add_argument("dataset", help="save_to_disk folder, local data folder, or hub dataset name")
    p.add_argument("--name", help="dataset configuration name (load_dataset)")
    p.add_argument("--split", default="train", help="split (default: train)")
    p.add_argument("--audio-column", default="audio", help="audio column (default: audio)")
    p.add_argument("--text-column", default="text", help="transcript column (default: text)")
    p.add_argument("--language-column", default="language", help="language column ('' = none; default: language)")
    p.add_argument("--language", help="language of every row (when there is no language column)")
    p.add_argument("--id-column", help="utterance id column (default: <split>-<row index>)")
    p.add_argument("--context-column", help="biasing context column")
    p.add_argument("--offset-column", help="segment start in s (reference mode)")
    p.add_argument("--duration-column", help="segment length in s (reference mode)")
    p.add_argument("--audio-mode", choices=("wav", "reference"), default="wav", help="write wavs or reference files")
    _common(p)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser(
        "import-lhotse",
        help="Lhotse manifests (cuts, or recordings + supervisions) -> manifest",
        formatter_class=TEXT,
        description=(
            "Import Lhotse manifests: a CutSet (cuts.jsonl[.gz]) or a RecordingSet and a SupervisionSet\n"
            "(recordings.jsonl[.gz] supervisions.jsonl[.gz]). One row per supervision, referencing the\n"
            "recording's file with offset/duration; word alignments become 'words'. Recordings that are not a\n"
            "single plain file (URLs, commands, in-memory audio) are rejected.\n\n" + LAYOUT + "\n\n"
            "example: qwen3asr-data import-lhotse data/cuts_train.jsonl.gz --out-dir data/train"
        ),
    )
    p.add_argument("manifests", nargs="+", help="cuts, or recordings + supervisions manifests")
    p.add_argument("--language", help="language of supervisions without one")
    _common(p)
    p.set_defaults(func=cmd_import_lhotse)

    p = sub.add_parser(
        "export-lhotse",
        help="manifest -> Lhotse recordings + supervisions + cuts",
        formatter_class=TEXT,
        description=(
            "Write a manifest as Lhotse manifests: OUT_DIR/recordings.jsonl.gz, supervisions.jsonl.gz and\n"
            "cuts.jsonl.gz (one cut per row). Context, no-speech and the row id are kept in custom fields, word\n"
            "times as a 'word' alignment, so import-lhotse gives the same rows back. Exit 1 for an empty manifest.\n\n"
            "example: qwen3asr-data export-lhotse data/train/manifest.jsonl --out-dir data/train-lhotse"
        ),
    )
    p.add_argument("manifest", help="JSONL manifest")
    p.add_argument("--out-dir", required=True, help="where the Lhotse manifests go")
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    p.set_defaults(func=cmd_export_lhotse)

    p = sub.add_parser(
        "report",
        help="hours per language, duration histogram, text lengths, unusual characters",
        formatter_class=TEXT,
        description=(
            "Describe manifests: hours and rows per language, a duration histogram (OUT_DIR/durations.png),\n"
            "text-length statistics per language, and characters outside the normal range of each row's\n"
            "script (see docs/data.md). Writes OUT_DIR/report.json and OUT_DIR/report.md; prints the summary.\n"
            "Rows are read as written (no audio is opened); rows without a duration are counted apart.\n\n"
            "example: qwen3asr-data report data/train/manifest.jsonl --out-dir reports/train"
        ),
    )
    p.add_argument("manifests", nargs="+", help="JSONL(.gz) manifests")
    p.add_argument("--out-dir", required=True, help="where report.json, report.md, durations.png go")
    p.add_argument("--bins", type=int, default=40, help="histogram bins (default 40)")
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    p.set_defaults(func=cmd_report)
