"""``qwen3asr-data``: every subcommand's help, the MFA path from a manifest with relative audio paths, exit
status 1 whenever nothing is written, the ``data_tools/`` shortcuts, and the commands from a built wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytest.importorskip("praatio")

from praatio import textgrid  # noqa: E402

from qwen3asr_train.tools.cli import main  # noqa: E402
from qwen3asr_train.tools.synthetic import espeak_available, write_tone_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = (
    "synth",
    "mfa-layout",
    "textgrid-to-manifest",
    "validate",
    "import-table",
    "import-kaldi",
    "segment",
    "import-hf",
    "import-lhotse",
    "import-noise",
    "export-lhotse",
    "report",
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def relative_corpus(root: Path, num: int = 3, seed: int = 5) -> tuple[Path, list[dict]]:
    """A tone corpus whose manifest names its audio relative to the manifest's folder ("wavs/<id>.wav")."""
    manifest = write_tone_corpus(root, num, seed=seed)
    rows = _rows(manifest)
    for row in rows:
        row["audio"] = str(Path(row["audio"]).relative_to(manifest.parent))
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest, rows


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_every_subcommand_has_help(command: str | None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qwen3asr-data{' ' + command if command else ''}")
    if command is None:
        assert all(name in out for name in SUBCOMMANDS)
    else:
        assert "example: qwen3asr-data " + command in out  # every help page shows a command that runs


def test_mfa_path_from_relative_audio_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """manifest (relative audio) -> MFA layout -> TextGrids -> manifest: every row comes back with its words.

    The tools run from an unrelated current folder: the paths must be read against the manifest's folder,
    as the trainer reads them, or the links break and every utterance is dropped."""
    manifest, rows = relative_corpus(tmp_path / "corpus")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    mfa = tmp_path / "mfa"
    code = main(["mfa-layout", str(manifest), "--corpus-dir", str(mfa / "corpus"), "--alignments-dir", str(mfa / "tg")])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["written"] == len(rows)
    for row in rows:
        link = mfa / "corpus" / "synthetic" / f"{row['id']}.wav"
        assert link.is_symlink() and link.resolve() == (manifest.parent / row["audio"]).resolve()
        assert (mfa / "corpus" / "synthetic" / f"{row['id']}.lab").read_text(encoding="utf-8") == row["text"] + "\n"
        # the TextGrid, read back by praatio independently of our reader, holds exactly the manifest's words
        grid = textgrid.openTextgrid(
            str(mfa / "tg" / "synthetic" / f"{row['id']}.TextGrid"), includeEmptyIntervals=False
        )
        entries = grid.getTier("words").entries
        assert [(e.label, e.start, e.end) for e in entries] == [(w["word"], w["start"], w["end"]) for w in row["words"]]
        assert grid.maxTimestamp == pytest.approx(row["duration"])

    out = tmp_path / "manifests" / "train.jsonl"
    code = main(
        [
            "textgrid-to-manifest",
            "--corpus-dir",
            str(mfa / "corpus"),
            "--alignments-dir",
            str(mfa / "tg"),
            "--language",
            "en",
            "--out",
            str(out),
        ]
    )
    counts = json.loads(capsys.readouterr().out)
    assert code == 0 and counts["written"] == len(rows)
    assert not any(v for k, v in counts.items() if k.startswith("dropped_"))
    back = {r["id"]: r for r in _rows(out)}
    for row in rows:
        got = back[f"synthetic/{row['id']}"]
        assert Path(got["audio"]) == (manifest.parent / row["audio"]).resolve()
        assert got["text"] == row["text"] and got["duration"] == round(row["duration"], 3)
        assert [(w["word"], w["start"], w["end"]) for w in got["words"]] == [
            (w["word"], w["start"], w["end"]) for w in row["words"]
        ]


def test_mfa_layout_replaces_a_broken_link_from_an_earlier_run(tmp_path: Path, capsys) -> None:
    manifest, rows = relative_corpus(tmp_path / "corpus", num=1)
    speaker = tmp_path / "mfa" / "synthetic"
    speaker.mkdir(parents=True)
    os.symlink(tmp_path / "nowhere.wav", speaker / f"{rows[0]['id']}.wav")  # what the old tool left behind
    assert (
        main(
            [
                "mfa-layout",
                str(manifest),
                "--corpus-dir",
                str(tmp_path / "mfa"),
                "--alignments-dir",
                str(tmp_path / "tg"),
            ]
        )
        == 0
    )
    assert (speaker / f"{rows[0]['id']}.wav").resolve() == (manifest.parent / rows[0]["audio"]).resolve()


def test_mfa_layout_names_file_and_line_of_a_missing_audio_file(tmp_path: Path, capsys, caplog) -> None:
    manifest, rows = relative_corpus(tmp_path / "corpus")
    (manifest.parent / rows[1]["audio"]).unlink()
    code = main(
        ["mfa-layout", str(manifest), "--corpus-dir", str(tmp_path / "c"), "--alignments-dir", str(tmp_path / "a")]
    )
    assert code == 1
    assert f"{manifest}:2: audio file not found: {manifest.parent / rows[1]['audio']}" in caplog.text


def test_every_tool_exits_1_when_it_writes_nothing(tmp_path: Path, capsys, caplog) -> None:
    # mfa-layout: no row has word times
    manifest, rows = relative_corpus(tmp_path / "corpus", num=2)
    no_words = tmp_path / "no_words.jsonl"
    no_words.write_text("".join(json.dumps({**r, "words": []}) + "\n" for r in rows), encoding="utf-8")
    mfa = tmp_path / "mfa"
    assert main(["mfa-layout", str(no_words), "--corpus-dir", str(mfa / "c"), "--alignments-dir", str(mfa / "a")]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "written": 0,
        "skipped_no_words": 2,
        "corpus_dir": str(mfa / "c" / "synthetic"),
        "alignments_dir": str(mfa / "a" / "synthetic"),
    }

    # textgrid-to-manifest: the corpus links are broken (the failure of the old tool) -> no manifest, exit 1
    assert main(["mfa-layout", str(manifest), "--corpus-dir", str(mfa / "c"), "--alignments-dir", str(mfa / "a")]) == 0
    capsys.readouterr()
    for link in (mfa / "c" / "synthetic").glob("*.wav"):
        link.unlink()
        os.symlink(tmp_path / "nowhere.wav", link)
    out = tmp_path / "m.jsonl"
    argv = ["textgrid-to-manifest", "--corpus-dir", str(mfa / "c"), "--alignments-dir", str(mfa / "a")]
    assert main([*argv, "--language", "en", "--out", str(out)]) == 1
    counts = json.loads(capsys.readouterr().out)
    assert counts["written"] == 0 and counts["dropped_no_audio"] == 2
    assert not out.exists()
    assert "are the links in the corpus broken?" in caplog.text

    # validate: every row rejected
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "missing.wav", "text": "x", "language": "en"}) + "\n", encoding="utf-8")
    assert main(["validate", str(bad), "--out-dir", str(tmp_path / "checked")]) == 1
    assert json.loads(capsys.readouterr().out)["kept"] == 0


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_synth_with_no_clips_exits_1(tmp_path: Path, capsys) -> None:
    assert main(["synth", str(tmp_path / "c"), "--num-train", "0", "--num-test", "0", "--workers", "1"]) == 1
    assert json.loads(capsys.readouterr().out)["rows"] == {"train": 0, "test": 0}


def test_data_tools_shortcuts_run_the_same_commands(tmp_path: Path) -> None:
    """``python data_tools/<tool>.py`` from a checkout still works (recipes call it) and keeps the exit codes."""
    manifest, rows = relative_corpus(tmp_path / "corpus", num=2)
    mfa = tmp_path / "mfa"
    run = [sys.executable, str(REPO / "data_tools" / "manifest_to_mfa_layout.py"), str(manifest)]
    done = subprocess.run(
        [*run, "--corpus-dir", str(mfa / "c"), "--alignments-dir", str(mfa / "a")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["written"] == 2
    for tool in ("make_synthetic_corpus", "textgrid_to_manifest", "validate"):
        done = subprocess.run(
            [sys.executable, str(REPO / "data_tools" / f"{tool}.py"), "--help"], capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stdout.startswith("usage: qwen3asr-data "), (tool, done.stderr)


def _installed_venv(tmp_path: Path) -> Path:
    """A fresh venv holding only the wheel built from this checkout.

    Its dependencies come from ``.venv`` without downloading: the venv is created with
    ``--system-site-packages`` and a ``.pth`` line puts the running interpreter's site-packages after its own.
    A plain path line (not ``site.addsitedir``) does not run that folder's ``.pth`` files, so the checkout's
    editable install cannot leak in; the test checks where the package is imported from.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "configs", src / "configs", ignore=ignore)
    shutil.copytree(REPO / "qwen3asr_train", src / "qwen3asr_train", symlinks=True, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("qwen3asr_train-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps-from-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    return venv


@pytest.mark.slow  # ~30 s on 2 cores: wheel build, install, and three commands that import torch
def test_installed_wheel_provides_the_commands(tmp_path: Path) -> None:
    start = time.perf_counter()
    venv = _installed_venv(tmp_path)
    work = tmp_path / "work"  # not the checkout: nothing may be imported from it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    exe = str(venv / "bin" / "qwen3asr-data")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, cwd=work, env=env)

    where = run(str(venv / "bin" / "python"), "-c", "import qwen3asr_train.tools.cli as m; print(m.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    for command in ("", *SUBCOMMANDS):
        done = run(exe, *([command] if command else []), "--help")
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.startswith("usage: qwen3asr-data"), done.stdout

    # one conversion each way from the installed package: validate a 3-row manifest, then the MFA round trip
    manifest, rows = relative_corpus(tmp_path / "corpus", num=3)
    done = run(exe, "validate", str(manifest), "--out-dir", "checked", "--strict")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kept"] == 3
    clean = _rows(work / "checked" / "clean.jsonl")
    assert [Path(r["audio"]).resolve() for r in clean] == [(manifest.parent / r["audio"]).resolve() for r in rows]

    done = run(exe, "mfa-layout", str(manifest), "--corpus-dir", "mfa/c", "--alignments-dir", "mfa/a")
    assert done.returncode == 0 and json.loads(done.stdout)["written"] == 3, done.stderr
    done = run(
        exe,
        "textgrid-to-manifest",
        "--corpus-dir",
        "mfa/c",
        "--alignments-dir",
        "mfa/a",
        "--language",
        "English",
        "--out",
        "aligner.jsonl",
    )
    assert done.returncode == 0 and json.loads(done.stdout)["written"] == 3, done.stderr
    assert [r["words"] for r in _rows(work / "aligner.jsonl")] == [r["words"] for r in rows]
    print(f"wheel build + install + 8 commands: {time.perf_counter() - start:.1f} s")  # noqa: T201
