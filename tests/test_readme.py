"""The README's commands run as written (tiny model, few steps), and no file refers to anything outside the repo."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3asr_train.__main__ import _recipes
from qwen3asr_train.config.load import check_paths, precheck_overrides
from qwen3asr_train.testing import write_clip, write_manifest
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = ".." + "/shared"
OUTSIDE_REFERENCE = "shared" + "/reference"
"""Written split so this file does not match itself."""
README = (REPO / "README.md").read_text(encoding="utf-8")

TINY = {
    "model.path=Qwen/Qwen3-ASR-0.6B": ["model=tiny"],
    "model.path=Qwen/Qwen3-ForcedAligner-0.6B": ["model=tiny", "model.num_labels=64"],
    "trainer=gpu": ["trainer=cpu"],
}
"""How a README command becomes a CPU-sized one: hub checkpoints -> a tiny model built in-process."""


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[list[str]]:
    """Every ``python -m qwen3asr_train`` command of the README's bash blocks, as argument lists."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if "-m qwen3asr_train " in line:
                commands.append(shlex.split(line.split("-m qwen3asr_train ", 1)[1], comments=True))
    return commands


def tiny(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg in TINY:
            out += TINY[arg]
        elif arg.startswith("trainer.max_steps="):
            out.append("trainer.max_steps=2")
        elif arg.startswith("evaluation.every_n_steps="):
            out.append("evaluation.every_n_steps=1")
        else:
            out.append(arg)
    return [*out, "data.num_workers=0", "trainer.enable_progress_bar=false"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """The files the README's commands name, made small, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    for name, seed in (("train", 1), ("dev", 2), ("speech", 3), ("nospeech", 4), ("test", 5)):
        write_manifest(tmp_path, num=6, seed=seed, name=f"{name}.jsonl")
    words = write_tone_corpus(tmp_path / "tones", 8, seed=6, name="words")
    (tmp_path / "words.jsonl").write_text(words.read_text())
    write_clip(tmp_path / "clips" / "a.wav", 1.3, seed=7)
    return tmp_path


def test_the_readme_has_the_commands_this_test_runs():
    recipes = [next(a.split("=", 1)[1] for a in c if a.startswith("recipe=")) for c in readme_commands()]
    assert recipes == ["sft", "gspo", "aligner", "export", "eval", "transcribe", "transcribe"]


def test_every_readme_command_runs_as_written(workdir):
    for args in readme_commands():
        precheck_overrides(args)  # what the CLI checks before Hydra composes
        overrides = tiny(args)
        run_dir = next((a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir=")), None)
        overrides = [a for a in overrides if not a.startswith("hydra.")]
        recipe = next(a.split("=", 1)[1] for a in overrides if a.startswith("recipe="))
        if recipe in {"eval", "export", "transcribe"}:
            overrides = [a for a in overrides if not a.startswith(("data.num_workers", "trainer.enable"))]
        cfg = make_config([*overrides, f"run_dir={run_dir or workdir / 'outputs' / recipe / 'other'}"])
        check_paths(cfg)
        _recipes()[cfg.recipe.name](cfg)
    assert (workdir / "outputs" / "sft" / "run1" / "exports").is_dir()
    transcripts = (workdir / "outputs" / "transcribe" / "other" / "transcripts.jsonl").read_text().splitlines()
    assert len(transcripts) == 7  # 6 manifest rows + clips/a.wav
    alignments = (workdir / "outputs" / "transcribe" / "other" / "alignments.jsonl").read_text().splitlines()
    assert (
        len(alignments) == 8 and len(list((workdir / "outputs" / "transcribe" / "other" / "textgrids").iterdir())) == 8
    )


def test_the_readme_python_snippet_runs(workdir):
    """The plain-transformers snippet, against an export of a tiny model."""
    cfg = make_config(
        tiny(["recipe=sft", "model.path=Qwen/Qwen3-ASR-0.6B", "data.train=train.jsonl"])
        + [
            "trainer.max_steps=2",
            f"run_dir={workdir / 'outputs' / 'sft' / 'run1'}",
        ]
    )
    _recipes()["sft"](cfg)
    (snippet,) = readme_blocks("python")
    proc = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_file_refers_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in tracked.splitlines():
        path = REPO / name
        if path.suffix in {".py", ".md", ".sh", ".yaml", ".toml", ".txt", ""} and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if OUTSIDE in text or OUTSIDE_REFERENCE in text:
                offenders.append(name)
    assert not offenders, f"files citing material outside the repository: {offenders}"
