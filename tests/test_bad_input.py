"""Bad manifest rows of every kind: reported completely (rejects.jsonl with file, line, reason) under the
skip policy while every good row is trained; refused at start under the error policy; the same report from
``data_tools/validate.py``; a per-set skip policy for ``recipe=eval``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf

from qwen3asr_train.data.manifest import ManifestError
from qwen3asr_train.stages import sft
from qwen3asr_train.testing import write_clip
from tests.conftest import make_config, tiny_sft_overrides

GOOD = 6


def _row(i: int, **extra) -> dict:
    return {
        "id": f"good-{i}",
        "audio": f"wavs/good-{i}.wav",
        "text": "alpha bravo",
        "language": "en",
        "duration": 1.0,
        **extra,
    }


@pytest.fixture
def salted(tmp_path: Path) -> tuple[Path, set[tuple[int, str]], set[str]]:
    """A manifest with GOOD usable rows and one row of each bad kind; (path, {(line, reason)}, good ids)."""
    wavs = tmp_path / "wavs"
    for i in range(GOOD):
        write_clip(wavs / f"good-{i}.wav", 1.0, seed=i)
    (wavs / "zero.wav").write_bytes(b"")
    (wavs / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    sf.write(str(wavs / "header_only.wav"), np.zeros(0, dtype=np.float32), 16000)
    bad = [
        (
            b'{"id": "enc", "audio": "wavs/good-0.wav", "text": "caf\xe9", "language": "en", "duration": 1.0}',
            "bad_encoding",
        ),
        (b'{"id": "json", "audio": "wavs/good-0.wav", "text": ', "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (json.dumps({**_row(90), "id": "missing", "audio": "wavs/nope.wav"}).encode(), "audio_missing"),
        (json.dumps({**_row(91), "id": "zero", "audio": "wavs/zero.wav"}).encode(), "audio_unreadable"),
        (json.dumps({**_row(92), "id": "corrupt", "audio": "wavs/corrupt.wav"}).encode(), "audio_unreadable"),
        (json.dumps({**_row(93), "id": "empty", "audio": "wavs/header_only.wav"}).encode(), "audio_empty"),
        (json.dumps({**_row(0), "id": "past", "offset": 3.0, "duration": 0.5}).encode(), "bad_segment"),
        (json.dumps({**_row(0), "id": "overrun", "offset": 0.5, "duration": 1.0}).encode(), "bad_segment"),
        (json.dumps({**_row(0), "id": "lang", "language": "Klingon"}).encode(), "unknown_language"),
        (json.dumps({**_row(0), "id": "notext", "text": ""}).encode(), "empty_text"),
    ]
    lines: list[bytes] = []
    expected: set[tuple[int, str]] = set()
    for i in range(GOOD):  # good and bad rows interleaved
        lines.append(json.dumps(_row(i)).encode())
        if i < len(bad):
            lines.append(bad[i][0])
            expected.add((len(lines), bad[i][1]))
    for raw, reason in bad[GOOD:]:
        lines.append(raw)
        expected.add((len(lines), reason))
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected, {f"good-{i}" for i in range(GOOD)}


class SeenIds(L.Callback):
    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.extend(batch["ids"])


def _overrides(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_sft_overrides(
        manifest.parent,
        run_dir,
        f"data.train={manifest}",
        "trainer.max_steps=-1",
        "+trainer.max_epochs=1",
        "data.max_batch_seconds=2",
        "data.on_bad_row=skip",
        "recipe.export_on_end=false",
        *extra,
    )


def _rejects(path: Path) -> set[tuple[int, str]]:
    return {(r["line"], r["reason"]) for r in map(json.loads, path.read_text().splitlines())}


def test_skip_policy_reports_every_bad_row_and_trains_every_good_one(salted, tmp_path):
    manifest, expected, good = salted
    run_dir = tmp_path / "run"
    seen = SeenIds()
    cfg = make_config(_overrides(manifest, run_dir))
    module, datamodule, trainer, _ = sft.prepare(cfg, [seen])
    trainer.fit(module, datamodule=datamodule)
    rows = [json.loads(line) for line in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert all(r["file"] == str(manifest) and r["message"].startswith(f"{manifest}:{r['line']}:") for r in rows)
    assert _rejects(run_dir / "rejects.jsonl") == expected
    assert sorted(seen.ids) == sorted(good)  # one epoch: every good row exactly once


def test_error_policy_fails_at_start_naming_file_and_line(salted, tmp_path):
    manifest, expected, _ = salted
    run_dir = tmp_path / "run"
    first_line, first_reason = min(expected)
    with pytest.raises(ManifestError) as info:
        sft.prepare(make_config(_overrides(manifest, run_dir, "data.on_bad_row=error")))
    assert str(info.value).startswith(f"{manifest}:{first_line}:") and info.value.reason == first_reason
    assert not (run_dir / "model_init").exists()  # before the model was built, long before training


def test_every_bad_row_fails_at_start_under_the_error_policy(salted, tmp_path):
    """Each bad kind alone (good rows around it) stops the run at start, with its own reason."""
    manifest, expected, _ = salted
    lines = manifest.read_bytes().splitlines()
    bad_lines = {n for n, _ in expected}
    for line, reason in sorted(expected):
        only = tmp_path / f"only-{line}.jsonl"
        only.write_bytes(b"\n".join(raw for n, raw in enumerate(lines, 1) if n == line or n not in bad_lines) + b"\n")
        with pytest.raises(ManifestError) as info:
            sft.prepare(make_config(_overrides(only, tmp_path / f"run-{line}", "data.on_bad_row=error")))
        assert info.value.reason == reason, (line, str(info.value))


def test_validate_tool_writes_clean_manifest_rejects_and_summary(salted, tmp_path):
    from data_tools.validate import main

    manifest, expected, good = salted
    out = tmp_path / "checked"
    assert main([str(manifest), "--out-dir", str(out), "--decode"]) == 0
    assert main([str(manifest), "--out-dir", str(out), "--strict"]) == 1
    clean = [json.loads(line) for line in (out / "clean.jsonl").read_text().splitlines()]
    assert {r["id"] for r in clean} == good and all(Path(r["audio"]).is_absolute() for r in clean)
    assert _rejects(out / "rejects.jsonl") == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == GOOD + len(expected) and summary["kept"] == GOOD
    assert summary["rejected"] == len(expected) and summary["languages"] == {"English": GOOD}
    assert (out / "durations.png").stat().st_size > 0
    # the clean manifest is clean
    assert main([str(out / "clean.jsonl"), "--out-dir", str(tmp_path / "again"), "--strict"]) == 0


def test_eval_skip_policy_reports_per_set(salted, tmp_path, manifest_dir):
    from qwen3asr_train.stages import evaluate

    manifest, expected, good = salted
    run_dir = tmp_path / "trained"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, "trainer.max_steps=2")))
    out = tmp_path / "eval"
    base = [
        "recipe=eval",
        f"recipe.model_path={run_dir / 'export'}",
        f"+recipe.sets.salted={manifest}",
        f"+recipe.sets.dev={manifest_dir / 'dev.jsonl'}",
        "recipe.decode.max_new_tokens_cap=4",
        f"recipe.output_dir={out}",
        f"run_dir={out}",
    ]
    with pytest.raises(ManifestError):
        evaluate.run(make_config([*base, "data.on_bad_row=error"]))
    evaluate.run(make_config([*base, "data.on_bad_row=skip"]))
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped["salted"]["evaluated"] == GOOD and sum(skipped["salted"]["skipped"].values()) == len(expected)
    assert skipped["dev"] == {"evaluated": 4, "skipped": {}}
    assert _rejects(out / "rejects.jsonl") == expected
