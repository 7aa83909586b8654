"""Messages that lead to the fix: each case a new user tripped over names the right key and says what to do;
and every run directory records what produced it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3asr_train.config.load import check_paths, precheck_overrides
from qwen3asr_train.config.schema import ConfigError
from qwen3asr_train.stages import sft
from tests.conftest import make_config, tiny_sft_overrides

REPO = Path(__file__).resolve().parents[1]


def test_eval_without_sets_suggests_an_override_hydra_accepts(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.sets: .*\+recipe\.sets\.test=test\.jsonl"):
        make_config(["recipe=eval", "recipe.model_path=x", f"run_dir={tmp_path}"])


def test_export_without_checkpoint_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.checkpoint: is required"):
        make_config(["recipe=export", f"run_dir={tmp_path}"])


def test_wrong_model_path_is_named_before_any_work(tmp_path):
    cfg = make_config(
        ["recipe=eval", f"recipe.model_path={tmp_path / 'nope'}", "+recipe.sets.t=x.jsonl", f"run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"recipe\.model_path=.*nope: no such"):
        check_paths(cfg)


def test_typo_without_plus_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"trainer\.max_step: unknown key .*did you mean trainer\.max_steps\?"):
        precheck_overrides(["recipe=sft", "trainer.max_step=5"])


def test_unknown_plus_key_is_refused_not_dropped(manifest_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.max_step: unknown key .*did you mean trainer\.max_steps\?"):
        make_config(tiny_sft_overrides(manifest_dir, tmp_path, "+trainer.max_step=5"))
    # free-form sections stay free: a new eval set, a mix source, optimizer keyword arguments
    make_config(tiny_sft_overrides(manifest_dir, tmp_path, "+evaluation.sets.dev=x.jsonl"))
    make_config(tiny_sft_overrides(manifest_dir, tmp_path, "+recipe.optim.optimizer.amsgrad=true"))


def test_local_path_and_hub_id_are_told_apart(manifest_dir, tmp_path):
    cfg = make_config(
        tiny_sft_overrides(manifest_dir, tmp_path, "model=checkpoint", f"model.path={tmp_path / 'missing_model'}")
    )
    with pytest.raises(ConfigError, match=r"model\.path=.*missing_model: no such model directory"):
        check_paths(cfg)
    hub = make_config(tiny_sft_overrides(manifest_dir, tmp_path, "model=checkpoint", "model.path=Qwen/Qwen3-ASR-0.6B"))
    check_paths(hub)  # a hub id is not a local path: it is resolved (or refused offline) when the model loads


def test_model_init_of_a_run_from_a_checkpoint_points_at_the_starting_model(tmp_path):
    run = tmp_path / "run"
    (run / "model_init").mkdir(parents=True)
    (run / "model_init" / "config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"model": {"path": "/models/start"}}))
    cfg = make_config(
        ["recipe=eval", f"recipe.model_path={run / 'model_init'}", f"+recipe.sets.t={tmp_path}", f"run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"no weights .* this run started from /models/start"):
        check_paths(cfg)


def test_cli_reports_configuration_errors_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3asr_train", "recipe=sft", "trainer.max_step=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "configuration error: trainer.max_step: unknown key" in proc.stderr
    assert "To append to your config" not in proc.stderr  # Hydra's advice that used to drop the key


def test_run_directory_records_commit_versions_times_and_checkpoint_names_need_no_quoting(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, "trainer.checkpoint_every_n_steps=2")))
    (record,) = json.loads((run_dir / "run_record.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert record["git_commit"] == (head or None)
    assert record["packages"]["torch"] and record["packages"]["transformers"] and record["python"]
    assert record["started"] and record["ended"] and record["world_size"] == 1 and record["global_step"] == 4
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names and all("=" not in n for n in names), names


@pytest.mark.slow
def test_a_cli_run_prints_each_line_once_and_no_third_party_noise(manifest_dir, tmp_path):
    from qwen3asr_train.__main__ import THIRD_PARTY_NOISE

    args = [a for a in tiny_sft_overrides(manifest_dir, tmp_path / "run") if not a.startswith("run_dir=")]
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3asr_train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("] - ", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert not [n for n in THIRD_PARTY_NOISE if n in proc.stdout + proc.stderr]
    seed_lines = [line for line in lines if "Seed set to" in line]
    assert len(seed_lines) == 1, seed_lines  # Lightning's own handler used to print every line a second time
    assert any("step 4/4 (100.0%)" in line and "ETA" in line for line in lines)
