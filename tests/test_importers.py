"""Importers (``qwen3asr-data import-table|import-kaldi|segment|import-hf|import-lhotse|export-lhotse``) on inputs
built here: every good row comes out with the times/text the input gives (checked against the input, not the
importer), every bad row is in rejects.jsonl with its file, line and reason, reruns are byte-identical, and
each importer's output trains ``recipe=sft model=tiny`` for 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qwen3asr_train.testing import write_clip
from qwen3asr_train.tools.cli import main
from tests.conftest import make_config, tiny_sft_overrides

RATE = 16000


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, dict]:
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def _rejects(out_dir: Path) -> list[tuple[str, int | None, str]]:
    return [(Path(r["file"]).name, r["line"], r["reason"]) for r in _rows(out_dir / "rejects.jsonl")]


def _idempotent(argv: list[str], out_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = {p: p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}
    assert _run(argv, capsys)[0] == 0
    after = {p: p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}
    assert before == after


# ------------------------------------------------------------------------------------------ inputs
def csv_folder(root: Path) -> Path:
    """4 clips + transcripts.csv: 2 good rows, a quoted multi-line-free comma text, a missing file, an empty text."""
    for i in range(3):
        write_clip(root / "clips" / f"c{i}.wav", 0.8 + 0.2 * i, seed=i)
    lines = [
        "file,transcript,lang",
        "clips/c0.wav,hello world,en",
        '"clips/c1.wav","one, two three",English',
        "clips/missing.wav,gone,en",
        "clips/c2.wav,,en",
        "clips/c2.wav,again,xx",
    ]
    (root / "transcripts.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def kaldi_dir(root: Path) -> Path:
    """A long recording cut by segments, a plain-path recording, and a pipe command."""
    write_clip(root / "audio" / "long.wav", 6.0, seed=3)
    write_clip(root / "audio" / "short.wav", 1.2, seed=4)
    data = root / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(
        "long audio/long.wav\nshort audio/short.wav\npiped sox audio/x.flac -t wav - |\n", encoding="utf-8"
    )
    (data / "segments").write_text(
        "long-a long 0.50 2.25\nlong-b long 2.5 5.0\nshort-a short 0 -1\npiped-a piped 0 1\norphan long 5.1 5.9\n",
        encoding="utf-8",
    )
    (data / "text").write_text(
        "long-a alpha bravo\nlong-b charlie delta echo\nshort-a foxtrot\npiped-a golf\n", encoding="utf-8"
    )
    (data / "utt2lang").write_text("long-a en\nlong-b English\nshort-a en\npiped-a en\n", encoding="utf-8")
    return data


BURSTS = [(0.5, 2.0), (3.0, 5.5), (6.5, 8.0), (9.0, 11.5)]
"""Speech-like tone bursts in the synthetic long recording; silence elsewhere (12 s in all)."""


def long_recording(path: Path) -> Path:
    rng = np.random.default_rng(7)
    wav = 1e-4 * rng.standard_normal(12 * RATE)
    for k, (s, e) in enumerate(BURSTS):
        t = np.arange(int((e - s) * RATE)) / RATE
        wav[int(s * RATE) : int(s * RATE) + len(t)] += 0.3 * np.sin(2 * np.pi * (200 + 100 * k) * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.astype(np.float32), RATE, subtype="PCM_16")
    return path


def times_table(path: Path) -> Path:
    words = ["alpha bravo", "charlie delta", "echo foxtrot", "golf hotel"]
    lines = ["start\tend\ttext"] + [f"{s}\t{e}\t{w}" for (s, e), w in zip(BURSTS, words, strict=True)]
    lines.append("11.9\t11.2\tbackwards")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ table
def test_import_table(tmp_path: Path, capsys) -> None:
    folder = csv_folder(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["import-table", str(folder), "--audio-column", "file", "--text-column", "transcript",
            "--language-column", "lang", "--out-dir", str(out)]  # fmt: skip
    code, summary = _run(argv, capsys)
    assert code == 0 and summary["written"] == 2 and summary["rejected"] == 3
    rows = _rows(out / "manifest.jsonl")
    assert [(r["id"], r["text"], r["language"]) for r in rows] == [
        ("clips/c0", "hello world", "English"),
        ("clips/c1", "one, two three", "English"),
    ]
    assert rows[1]["duration"] == pytest.approx(1.0, abs=1e-3)
    assert Path(rows[0]["audio"]) == (folder / "clips" / "c0.wav").absolute()
    assert _rejects(out) == [
        ("transcripts.csv", 4, "audio_missing"),
        ("transcripts.csv", 5, "empty_text"),
        ("transcripts.csv", 6, "unknown_language"),
    ]
    _idempotent(argv, out, capsys)


def test_import_table_names_a_missing_column(tmp_path: Path, capsys, caplog) -> None:
    folder = csv_folder(tmp_path / "in")
    code, _ = _run(["import-table", str(folder), "--language", "en", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 1
    assert "transcripts.csv:1: --audio-column='audio' is not a column" in caplog.text


# ------------------------------------------------------------------------------------------ Kaldi
def test_import_kaldi(tmp_path: Path, capsys) -> None:
    data = kaldi_dir(tmp_path / "egs")
    out = tmp_path / "out"
    argv = ["import-kaldi", str(data), "--audio-root", str(tmp_path / "egs"), "--out-dir", str(out)]
    code, summary = _run(argv, capsys)
    assert code == 0 and summary["written"] == 3
    rows = {r["id"]: r for r in _rows(out / "manifest.jsonl")}
    assert (rows["long-a"]["offset"], rows["long-a"]["duration"]) == (0.5, 1.75)
    assert (rows["long-b"]["offset"], rows["long-b"]["duration"]) == (2.5, 2.5)
    assert "offset" not in rows["short-a"] and rows["short-a"]["duration"] == pytest.approx(1.2, abs=1e-3)
    assert rows["long-b"]["text"] == "charlie delta echo" and rows["long-b"]["language"] == "English"
    assert _rejects(out) == [("text", 4, "wav_scp_pipe"), ("segments", 5, "no_text")]
    pipe = _rows(out / "rejects.jsonl")[0]["message"]
    assert "wav.scp:3" in pipe and "pipe command" in pipe and "never runs shell commands" in pipe
    _idempotent(argv, out, capsys)


def test_kaldi_pipe_only_exits_1(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "wav.scp").write_text("a flac -c -d a.flac |\n")
    (data / "text").write_text("a hello\n")
    code, summary = _run(["import-kaldi", str(data), "--language", "en", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 1 and summary["written"] == 0 and summary["rejected_by_reason"] == {"wav_scp_pipe": 1}


# ---------------------------------------------------------------------------------------- segments
def test_segment_at_given_times(tmp_path: Path, capsys) -> None:
    rec = long_recording(tmp_path / "rec.wav")
    table = times_table(tmp_path / "rec.tsv")
    out = tmp_path / "out"
    argv = ["segment", str(rec), "--times", str(table), "--language", "en", "--out-dir", str(out)]
    code, summary = _run(argv, capsys)
    assert code == 0 and summary["segments"] == 4
    rows = _rows(out / "manifest.jsonl")
    assert [(r["offset"], round(r["offset"] + r["duration"], 6), r["text"]) for r in rows] == [
        (s, e, t)
        for (s, e), t in zip(BURSTS, ["alpha bravo", "charlie delta", "echo foxtrot", "golf hotel"], strict=True)
    ]
    assert _rejects(out) == [("rec.tsv", 6, "bad_segment")]
    _idempotent(argv, out, capsys)


def test_segment_merges_lines_and_cuts_in_silence(tmp_path: Path, capsys) -> None:
    rec = long_recording(tmp_path / "rec.wav")
    base = [
        "segment",
        str(rec),
        "--times",
        str(times_table(tmp_path / "rec.tsv")),
        "--max-seconds",
        "6",
        "--language",
        "en",
    ]
    assert _run([*base, "--out-dir", str(tmp_path / "ref")], capsys)[0] == 0
    rows = _rows(tmp_path / "ref" / "manifest.jsonl")
    # bursts 1+2 fit in 6 s, then 3+4; cuts lie in the silences: the 0-0.5 s lead, the 5.5-6.5 s gap, the tail
    assert [r["text"] for r in rows] == ["alpha bravo charlie delta", "echo foxtrot golf hotel"]
    first_end = rows[0]["offset"] + rows[0]["duration"]
    assert 0.0 <= rows[0]["offset"] <= 0.5 and 5.5 < first_end < 6.5
    assert rows[1]["offset"] == pytest.approx(first_end, abs=1e-6)
    assert 11.5 < rows[1]["offset"] + rows[1]["duration"] <= 12.0
    assert all(r["duration"] <= 6.0 for r in rows)
    # the same segments written as files: each file holds exactly its segment's samples
    assert _run([*base, "--write-wavs", "--out-dir", str(tmp_path / "wav")], capsys)[0] == 0
    source, _ = sf.read(str(rec), dtype="int16")
    for ref, row in zip(rows, _rows(tmp_path / "wav" / "manifest.jsonl"), strict=True):
        audio, _ = sf.read(str(tmp_path / "wav" / row["audio"]), dtype="int16")
        start = int(round(ref["offset"] * RATE))
        assert np.array_equal(audio, source[start : start + len(audio)])
        assert len(audio) / RATE == pytest.approx(ref["duration"], abs=1 / RATE)


def test_segment_energy_cuts_land_in_silence(tmp_path: Path, capsys) -> None:
    rec = long_recording(tmp_path / "noise.wav")
    out = tmp_path / "out"
    code, summary = _run(["segment", str(rec), "--max-seconds", "4", "--no-speech", "--out-dir", str(out)], capsys)
    assert code == 0
    rows = _rows(out / "manifest.jsonl")
    assert all(r["no_speech"] and r["text"] == "" and r["duration"] <= 4.0 for r in rows)
    bounds = [r.get("offset", 0.0) for r in rows][1:]
    assert bounds, "a 12 s recording under a 4 s limit must be cut"
    for b in bounds:  # no cut inside a burst
        assert not any(s <= b <= e for s, e in BURSTS), (b, bounds)
    assert rows[-1].get("offset", 0.0) + rows[-1]["duration"] == pytest.approx(12.0, abs=1e-3)


def test_segment_energy_without_transcript_needs_no_speech(tmp_path: Path, capsys, caplog) -> None:
    rec = long_recording(tmp_path / "rec.wav")
    code, _ = _run(["segment", str(rec), "--max-seconds", "4", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 1 and "--no-speech" in caplog.text


# ------------------------------------------------------------------------------------------- HF
def saved_hf(root: Path) -> tuple[Path, list[np.ndarray]]:
    datasets = pytest.importorskip("datasets")
    clips, cells = [], []
    for i in range(3):
        path = write_clip(root / "src" / f"h{i}.wav", 0.7 + 0.3 * i, seed=10 + i)
        clips.append(sf.read(str(path), dtype="int16")[0])
        cells.append({"bytes": path.read_bytes(), "path": None})
    ds = datasets.Dataset.from_dict(
        {
            "audio": cells,
            "sentence": ["kilo lima", "mike november", ""],
            "locale": ["en", "en", "en"],
            "uid": ["u0", "u1", "u2"],
        }
    ).cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "saved"))
    return root / "saved", clips


def test_import_hf_saved_to_disk_writes_wavs(tmp_path: Path, capsys) -> None:
    saved, clips = saved_hf(tmp_path)
    out = tmp_path / "out"
    argv = ["import-hf", str(saved), "--text-column", "sentence", "--language-column", "locale", "--id-column", "uid",
            "--out-dir", str(out)]  # fmt: skip
    code, summary = _run(argv, capsys)
    assert code == 0 and summary["written"] == 2
    rows = _rows(out / "manifest.jsonl")
    assert [(r["id"], r["audio"], r["text"]) for r in rows] == [
        ("u0", "wavs/u0.wav", "kilo lima"),
        ("u1", "wavs/u1.wav", "mike november"),
    ]
    for row, clip in zip(rows, clips, strict=False):
        written, rate = sf.read(str(out / row["audio"]), dtype="int16")
        assert rate == RATE and np.array_equal(written, clip)  # PCM16 in, PCM16 out: sample-exact
    assert _rejects(out) == [("saved[train]", 2, "empty_text")]
    _idempotent(argv, out, capsys)


def test_import_hf_local_folder_by_name_with_references(tmp_path: Path, capsys) -> None:
    """``load_dataset(<folder>)`` (the by-name path, offline on a local parquet folder), audio as file paths
    with offset/duration columns (segments of one long file)."""
    datasets = pytest.importorskip("datasets")
    rec = write_clip(tmp_path / "long.wav", 4.0, seed=2)
    ds = datasets.Dataset.from_dict(
        {"audio": [str(rec)] * 2, "text": ["papa quebec", "romeo sierra"], "start": [0.25, 2.0], "dur": [1.5, 1.75]}
    )
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    out = tmp_path / "out"
    argv = ["import-hf", str(tmp_path / "pq"), "--language-column", "", "--language", "de", "--audio-mode", "reference",
            "--offset-column", "start", "--duration-column", "dur", "--out-dir", str(out)]  # fmt: skip
    code, summary = _run(argv, capsys)
    assert code == 0 and summary["written"] == 2
    rows = _rows(out / "manifest.jsonl")
    assert [(r["audio"], r["offset"], r["duration"], r["language"]) for r in rows] == [
        (str(rec.absolute()), 0.25, 1.5, "German"),
        (str(rec.absolute()), 2.0, 1.75, "German"),
    ]


# ------------------------------------------------------------------------------------------ Lhotse
def test_lhotse_round_trip_is_lossless(tmp_path: Path, capsys) -> None:
    pytest.importorskip("lhotse")
    rec = write_clip(tmp_path / "a" / "rec.wav", 5.0, seed=1)
    short = write_clip(tmp_path / "a" / "short.wav", 1.0, seed=2)
    rows = [
        {"id": "r1", "audio": str(rec), "text": "alpha bravo", "language": "English", "duration": 1.5, "offset": 0.25,
         "context": "bravo", "words": [{"word": "alpha", "start": 0.1, "end": 0.5}, {"word": "bravo", "start": 0.6, "end": 1.2}]},
        {"id": "r2", "audio": str(rec), "text": "你好", "language": "Henan", "duration": 2.0, "offset": 2.5},
        {"id": "r3", "audio": str(short), "text": "", "no_speech": True, "duration": 1.0},
    ]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code, result = _run(["export-lhotse", str(manifest), "--out-dir", str(tmp_path / "lh")], capsys)
    assert code == 0 and result["recordings_count"] == 2 and result["supervisions"] == 3
    for inputs in (["cuts.jsonl.gz"], ["recordings.jsonl.gz", "supervisions.jsonl.gz"]):
        out = tmp_path / f"back-{len(inputs)}"
        code, _ = _run(["import-lhotse", *[str(tmp_path / "lh" / n) for n in inputs], "--out-dir", str(out)], capsys)
        assert code == 0
        back = _rows(out / "manifest.jsonl")
        assert back == [{k: r[k] for k in ("id", "audio", "text", "no_speech", "language", "duration", "offset",
                                             "context", "words") if k in r} for r in rows]  # fmt: skip


def test_lhotse_import_rejects_url_sources(tmp_path: Path, capsys) -> None:
    lhotse = pytest.importorskip("lhotse")
    from lhotse.audio import AudioSource

    good = write_clip(tmp_path / "g.wav", 1.0, seed=3)
    recs = lhotse.RecordingSet.from_recordings(
        [
            lhotse.Recording.from_file(good, recording_id="g"),
            lhotse.Recording(id="u", sources=[AudioSource("url", [0], "https://example.invalid/u.wav")],
                             sampling_rate=RATE, num_samples=RATE, duration=1.0),
        ]
    )  # fmt: skip
    sups = lhotse.SupervisionSet.from_segments(
        [
            lhotse.SupervisionSegment("s-g", "g", 0.0, 1.0, text="tango", language="en"),
            lhotse.SupervisionSegment("s-u", "u", 0.0, 1.0, text="uniform", language="en"),
        ]
    )
    recs.to_file(tmp_path / "recordings.jsonl")
    sups.to_file(tmp_path / "supervisions.jsonl")
    out = tmp_path / "out"
    code, summary = _run(["import-lhotse", str(tmp_path / "recordings.jsonl"), str(tmp_path / "supervisions.jsonl"),
                          "--out-dir", str(out)], capsys)  # fmt: skip
    assert code == 0 and summary["written"] == 1
    assert _rejects(out) == [("supervisions.jsonl", 2, "lhotse_source")]


# -------------------------------------------------------------------------------------- it trains
def _import_for_training(kind: str, root: Path) -> list[Path]:
    """Run one importer on its own input; return the manifest(s) to train on."""
    out = root / "out"
    if kind == "table":
        argv = ["import-table", str(csv_folder(root / "in")), "--audio-column", "file", "--text-column", "transcript",
                "--language-column", "lang"]  # fmt: skip
    elif kind == "kaldi":
        argv = ["import-kaldi", str(kaldi_dir(root / "egs")), "--audio-root", str(root / "egs")]
    elif kind == "segment":
        rec = long_recording(root / "rec.wav")
        argv = ["segment", str(rec), "--times", str(times_table(root / "rec.tsv")), "--language", "en"]
    elif kind == "hf":
        argv = ["import-hf", str(saved_hf(root)[0]), "--text-column", "sentence", "--language-column", "locale"]
    else:
        pytest.importorskip("lhotse")
        folder = csv_folder(root / "in")
        assert main(["import-table", str(folder), "--audio-column", "file", "--text-column", "transcript",
                     "--language-column", "lang", "--out-dir", str(root / "table")]) == 0  # fmt: skip
        assert main(["export-lhotse", str(root / "table" / "manifest.jsonl"), "--out-dir", str(root / "lh")]) == 0
        argv = ["import-lhotse", str(root / "lh" / "cuts.jsonl.gz")]
    assert main([*argv, "--out-dir", str(out)]) == 0
    return [out / "manifest.jsonl"]


@pytest.mark.parametrize("kind", ["table", "kaldi", "segment", "hf", "lhotse"])
def test_import_output_trains(kind: str, tmp_path: Path) -> None:
    from qwen3asr_train.stages import sft

    manifests = _import_for_training(kind, tmp_path)
    rows = _rows(manifests[0])
    assert rows
    run_dir = tmp_path / "run"
    cfg = make_config(
        tiny_sft_overrides(
            manifests[0].parent,
            run_dir,
            f"data.train={manifests[0]}",
            "trainer.max_steps=2",
            "data.max_batch_seconds=20",
        )  # fmt: skip
    )
    sft.run(cfg)
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert (run_dir / "rejects.jsonl").read_text() == ""  # training accepted every row the importer wrote


NEW_COMMANDS = (
    "import-table",
    "import-kaldi",
    "segment",
    "import-hf",
    "import-lhotse",
    "export-lhotse",
    "report",
    "import-noise",
)


@pytest.mark.parametrize("command", NEW_COMMANDS)
def test_help_shows_a_runnable_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qwen3asr-data {command}") and f"example: qwen3asr-data {command}" in out


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from qwen3asr_train.tools.cli import main\ntry: main(['import-hf', '--help'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules and 'datasets' not in sys.modules and 'lhotse' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
