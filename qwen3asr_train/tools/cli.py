"""``qwen3asr-data``: corpus preparation commands installed with the package (``pip install .``).

Subcommands (each has ``--help``):

* ``synth``                 offline synthetic speech corpus (espeak-ng) with exact word times
* ``mfa-layout``            manifest with word times -> MFA-style corpus + TextGrids (plays ``mfa align``)
* ``textgrid-to-manifest``  MFA corpus + TextGrids -> aligner-training manifest in the aligner's word units
* ``validate``              check manifests the way training reads them; clean manifest, rejects, summary
* ``import-table``          folder of audio + CSV/TSV transcripts -> manifest + rejects
* ``import-kaldi``          Kaldi data dir (wav.scp, text, segments, utt2lang) -> manifest + rejects
* ``segment``               long recordings -> segments at given times or at low-energy points
* ``import-hf``             HF datasets (save_to_disk folder or hub name) -> manifest + rejects
* ``import-lhotse``         Lhotse cuts / recordings + supervisions -> manifest + rejects
* ``import-noise``          folder of noise recordings (MUSAN-style) -> noise manifest + rejects
* ``export-lhotse``         manifest -> Lhotse recordings, supervisions, cuts
* ``report``                hours per language, duration histogram, text lengths, unusual characters

Why one command: ``data_tools/`` and ``recipes/`` are not in the wheel, so a ``pip install`` user had the
library but no way to run the data steps the README describes. Every subcommand prints its result as JSON on
stdout and exits 0 when it wrote what was asked, 1 when it wrote nothing (an empty manifest is never a
success: the next stage would train on nothing) or failed on bad input (the message names file and line),
and 2 on a usage error. Also runnable as ``python -m qwen3asr_train.tools``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Only light modules here: `--help` must not pay for importing torch (data.manifest/data.audio import it).
from qwen3asr_train.config.schema import DataConfig
from qwen3asr_train.tools.import_cli import add_import_commands
from qwen3asr_train.tools.import_cli import user_errors as _import_user_errors
from qwen3asr_train.tools.mfa_layout import LayoutError, manifest_to_mfa_layout
from qwen3asr_train.tools.synthetic import (
    RATE_WPM,
    VOCABULARIES,
    CorpusConfigError,
    EspeakUnavailableError,
    make_corpus,
)
from qwen3asr_train.tools.textgrid import UNK_POLICIES, TextGridError, mfa_corpus_to_manifest

logger = logging.getLogger("qwen3asr_train.tools")

PROG = "qwen3asr-data"
EXIT_OK, EXIT_NOTHING_WRITTEN, EXIT_USAGE = 0, 1, 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Bad input the user can fix (reported in one line); anything else is a bug and keeps its traceback."""
    from qwen3asr_train.data.manifest import ManifestError

    return (
        LayoutError,
        TextGridError,
        ManifestError,
        EspeakUnavailableError,
        CorpusConfigError,
        FileNotFoundError,
        *_import_user_errors(),
    )


def _emit(result: dict[str, Any]) -> None:
    """The command's result, as JSON on stdout (the one thing a script parses)."""
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def _nothing_written(command: str, why: str) -> int:
    logger.error("%s %s: nothing written: %s", PROG, command, why)
    return EXIT_NOTHING_WRITTEN


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


# ------------------------------------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifests = make_corpus(
        args.out_dir,
        languages=tuple(args.languages),
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        words_per_clip=(args.min_words, args.max_words),
        num_no_speech=args.num_no_speech,
        noise_snr_db=tuple(args.snr_db) if args.snr_db else None,
        workers=args.workers,
        vocabulary_size=args.vocabulary_size,
        rate_wpm=tuple(args.rate_range),
        num_unseen=args.num_unseen,
        unseen_voices=tuple(args.heldout_voices),
        unseen_rate_wpm=tuple(args.heldout_rates),
        cased=args.cased,
    )
    rows = {split: _count_rows(path) for split, path in manifests.items()}
    _emit(
        {
            "manifests": {split: str(path) for split, path in manifests.items()},
            "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
        }
    )
    if not sum(rows.values()):
        return _nothing_written("synth", "every split has 0 rows (--num-train/--num-test/--num-no-speech)")
    return EXIT_OK


def _rate_range(text: str) -> tuple[int, int]:
    """``LOW-HIGH`` (words per minute, ``[LOW, HIGH)``) from ``--heldout-rates``."""
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit()):
        raise argparse.ArgumentTypeError(f"--heldout-rates wants LOW-HIGH ranges such as 115-135, got {text!r}")
    return int(low), int(high)


def cmd_mfa_layout(args: argparse.Namespace) -> int:
    counts = manifest_to_mfa_layout(args.manifest, args.corpus_dir, args.alignments_dir, speaker=args.speaker)
    _emit(
        {
            **counts,
            "corpus_dir": str(Path(args.corpus_dir) / args.speaker),
            "alignments_dir": str(Path(args.alignments_dir) / args.speaker),
        }
    )
    if not counts["written"]:
        return _nothing_written("mfa-layout", f"no row of {args.manifest} has word times ('words')")
    return EXIT_OK


def cmd_textgrid_to_manifest(args: argparse.Namespace) -> int:
    counts = mfa_corpus_to_manifest(
        args.corpus_dir,
        args.alignments_dir,
        args.language,
        args.out,
        words_tier=args.words_tier,
        phones_tier=args.phones_tier,
        unk_policy=args.unk_policy,
    )
    _emit(dict(counts))
    if not counts["written"]:
        dropped = {k: v for k, v in counts.items() if k.startswith("dropped_") and v}
        hint = ""
        if "dropped_no_audio" in dropped:
            hint = " (no audio next to the .lab files: are the links in the corpus broken?)"
        Path(args.out).unlink(missing_ok=True)  # an empty manifest must not look like a result
        return _nothing_written("textgrid-to-manifest", f"every utterance was dropped: {dropped}{hint}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from qwen3asr_train.data.validate import validate_manifests

    data = DataConfig(
        max_duration=args.max_duration, min_duration=args.min_duration, extra_languages=list(args.extra_languages)
    )
    summary = validate_manifests(args.manifests, args.out_dir, data, aligner=args.aligner, decode=args.decode)
    _emit(summary)
    if not summary["kept"]:
        return _nothing_written("validate", f"no row was kept; see {Path(args.out_dir) / 'rejects.jsonl'}")
    if args.strict and summary["rejected"]:
        logger.error("%s validate: %d row(s) rejected (--strict)", PROG, summary["rejected"])
        return EXIT_NOTHING_WRITTEN
    return EXIT_OK


# --------------------------------------------------------------------------------------------- parser


def _log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", default=default, help=f"logging level (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    """The ``qwen3asr-data`` parser; each subparser carries its handler as ``func``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Corpus preparation for qwen3asr_train: synthetic speech, MFA layouts and TextGrid import, manifest\n"
            "validation. Each command prints its result as JSON; exit 1 when it wrote nothing or the input is bad."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `qwen3asr-data <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    text = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "synth",
        help="offline synthetic speech corpus (espeak-ng) with exact word times",
        formatter_class=text,
        description=(
            "Generate an offline synthetic speech corpus with espeak-ng and exact word times.\n\n"
            "Writes OUT_DIR/wavs/*.wav (16 kHz mono PCM16), OUT_DIR/{train,test}.jsonl (and no_speech.jsonl)\n"
            "and OUT_DIR/corpus_config.json; rerunning with the same arguments returns at once. Needs the\n"
            "Debian package espeak-ng (apt-get install -y espeak-ng libespeak-ng1).\n\n"
            "example: qwen3asr-data synth exp/corpus --languages en zh --num-train 2000 --num-test 100"
        ),
    )
    p.add_argument("out_dir", help="corpus folder to write")
    p.add_argument("--languages", nargs="+", default=["en"], help=f"ISO codes from {sorted(VOCABULARIES)}")
    p.add_argument("--num-train", type=int, default=2000, help="clips in train.jsonl (default: 2000)")
    p.add_argument("--num-test", type=int, default=200, help="clips in test.jsonl (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-words", type=int, default=4, help="word units per clip (characters for Chinese)")
    p.add_argument("--max-words", type=int, default=10)
    p.add_argument("--num-no-speech", type=int, default=0, help="silence/noise clips in no_speech.jsonl")
    p.add_argument("--snr-db", type=float, nargs=2, metavar=("LOW", "HIGH"), help="add noise at this SNR range")
    p.add_argument("--workers", type=int, default=2, help="processes (output does not depend on it)")
    p.add_argument("--vocabulary-size", type=int, default=0, help="use only the first N words (0 = all)")
    p.add_argument(
        "--rate-range",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(RATE_WPM),
        help="speaking rates of train/test in words per minute, [LOW, HIGH) (default: %(default)s)",
    )
    p.add_argument("--num-unseen", type=int, default=0, help="clips in test_unseen.jsonl (held-out voices/rates only)")
    p.add_argument(
        "--heldout-voices",
        nargs="+",
        default=[],
        metavar="VOICE",
        help="voice ids (en) or variants (+f3) kept out of train/test and used by test_unseen",
    )
    p.add_argument(
        "--heldout-rates",
        nargs="+",
        type=_rate_range,
        default=[],
        metavar="LOW-HIGH",
        help="rate ranges [LOW, HIGH) outside --rate-range kept for test_unseen, e.g. 115-135 205-225",
    )
    p.add_argument("--cased", action="store_true", help="sentence case and punctuation (espeak reads it too)")
    _log_level(p, "INFO")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "mfa-layout",
        help="manifest with word times -> MFA-style corpus + TextGrids",
        formatter_class=text,
        description=(
            "Write a manifest with word times out as an MFA-style corpus and alignments: per utterance a\n"
            "link to the audio and a .lab transcript in CORPUS_DIR/<speaker>/, and a TextGrid with a\n"
            "'words' tier in ALIGNMENTS_DIR/<speaker>/, as `mfa align` writes it. Relative audio paths are\n"
            "resolved against the manifest's folder, as the trainer does. Exit 1 when no row had word times.\n\n"
            "example: qwen3asr-data mfa-layout corpus/train.jsonl --corpus-dir mfa/corpus --alignments-dir mfa/aligned"
        ),
    )
    p.add_argument("manifest", help="JSONL manifest whose rows carry 'words' [{word, start, end}]")
    p.add_argument("--corpus-dir", required=True, help="MFA corpus to write (<speaker>/<utt>.wav + .lab)")
    p.add_argument("--alignments-dir", required=True, help="TextGrids to write (<speaker>/<utt>.TextGrid)")
    p.add_argument("--speaker", default="synthetic", help="speaker folder name (default: synthetic)")
    _log_level(p, "INFO")
    p.set_defaults(func=cmd_mfa_layout)

    p = sub.add_parser(
        "textgrid-to-manifest",
        help="MFA corpus + TextGrids -> aligner-training manifest",
        formatter_class=text,
        description=(
            "Turn Montreal Forced Aligner output into an aligner-training manifest (JSONL, one row per\n"
            "utterance). CORPUS_DIR is the MFA input (<speaker>/<utt>.wav + <utt>.lab or .txt), ALIGNMENTS_DIR\n"
            "what `mfa align` wrote (<speaker>/<utt>.TextGrid). Word times are re-cut into the forced aligner's\n"
            "word units. Prints the counts (written, dropped by reason, how characters inside MFA words were\n"
            "timed); exit 1 (and no manifest) when every utterance was dropped.\n\n"
            "example: qwen3asr-data textgrid-to-manifest --corpus-dir mfa/corpus --alignments-dir mfa/aligned \\\n"
            "    --language Chinese --out manifests/aligner_train.jsonl"
        ),
    )
    p.add_argument("--corpus-dir", required=True, help="MFA input corpus: <speaker>/<utt>.wav + .lab/.txt")
    p.add_argument("--alignments-dir", required=True, help="MFA output: <speaker>/<utt>.TextGrid")
    p.add_argument("--language", required=True, help="canonical name or ISO code, e.g. Chinese or zh")
    p.add_argument("--out", required=True, help="manifest to write (JSONL)")
    p.add_argument(
        "--unk-policy",
        choices=UNK_POLICIES,
        default="drop_utterance",
        help="words MFA could not align: drop the utterance, fail, or interpolate their times",
    )
    p.add_argument("--words-tier", default="words", help="word tier name (default: words)")
    p.add_argument("--phones-tier", default="phones", help="phone tier name (default: phones)")
    _log_level(p, "WARNING")
    p.set_defaults(func=cmd_textgrid_to_manifest)

    p = sub.add_parser(
        "validate",
        help="check manifests as training reads them; clean manifest + rejects + summary",
        formatter_class=text,
        description=(
            "Validate manifests the way training reads them. Writes OUT_DIR/clean.jsonl (accepted rows, audio\n"
            "paths absolute), OUT_DIR/rejects.jsonl (file, line, reason, message of every rejected row),\n"
            "OUT_DIR/summary.json and OUT_DIR/durations.png; prints the summary. Exit 1 when no row was kept,\n"
            "or with --strict when any row was rejected.\n\n"
            "example: qwen3asr-data validate train.jsonl --out-dir checked/ --aligner"
        ),
    )
    p.add_argument("manifests", nargs="+", help="JSONL(.gz) manifests")
    p.add_argument("--out-dir", required=True, help="where clean.jsonl, rejects.jsonl, summary.json go")
    p.add_argument("--aligner", action="store_true", help="check word times against the aligner's word units")
    p.add_argument("--decode", action="store_true", help="decode every segment, not only the header (slow)")
    p.add_argument("--max-duration", type=float, default=DataConfig.max_duration)
    p.add_argument("--min-duration", type=float, default=DataConfig.min_duration)
    p.add_argument("--extra-languages", nargs="*", default=[], help="languages to accept beyond the model's")
    p.add_argument("--strict", action="store_true", help="exit 1 when any row is rejected")
    _log_level(p, "INFO")
    p.set_defaults(func=cmd_validate)

    add_import_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` by default), run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        logger.error("%s %s: %s", PROG, args.command, err)
        return EXIT_NOTHING_WRITTEN


if __name__ == "__main__":
    raise SystemExit(main())
