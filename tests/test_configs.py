"""The Hydra tree: every option composes, every field is documented, configs ship in the wheel, loggers."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from qwen3asr_train.__main__ import _recipes
from qwen3asr_train.config.load import CONFIG_DIR
from qwen3asr_train.config.schema import ConfigError
from tests.conftest import make_config, tiny_sft_overrides

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {
    "sft": ["data.train=x.jsonl", "trainer.max_steps=2"],
    "gspo": ["data.train=x.jsonl", "trainer.max_steps=2"],
    "aligner": ["data.train=x.jsonl", "trainer.max_steps=2"],
    "export": ["recipe.checkpoint=x.ckpt"],
    "eval": ["recipe.model_path=x", "+recipe.sets.test=x.jsonl"],
    "transcribe": ["recipe.model_path=x", "recipe.inputs=[a.wav]"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_recipe_configs_match_the_entry_point():
    assert set(_options("recipe")) == set(_recipes()) == set(REQUIRED)


@pytest.mark.parametrize("recipe", sorted(REQUIRED))
@pytest.mark.parametrize("model", _options("model"))
def test_every_recipe_composes_with_every_model(recipe, model, tmp_path):
    overrides = [f"recipe={recipe}", f"model={model}", *REQUIRED[recipe], f"run_dir={tmp_path}"]
    if model == "checkpoint":
        overrides.append("model.path=some/dir")
    cfg = make_config(overrides)
    assert cfg.recipe.name == recipe
    assert cfg.model.task == ("aligner" if recipe == "aligner" else "asr")


@pytest.mark.parametrize("trainer", _options("trainer"))
@pytest.mark.parametrize("logger", _options("logger"))
def test_trainer_and_logger_options_compose(trainer, logger, tmp_path):
    cfg = make_config(
        ["recipe=sft", "model=tiny", f"trainer={trainer}", f"logger={logger}", *REQUIRED["sft"], f"run_dir={tmp_path}"]
    )
    assert cfg.trainer.strategy in {"auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.precision=bf16-true", "trainer.precision"),
        ("data.max_duration=1300", "data.max_duration"),
        ("recipe.no_speech_prob=1.5", "recipe.no_speech_prob"),
        ("trainer.strategy=fsdp", "trainer.strategy"),  # with trainer=cpu
        ("model.lora.enabled=true", "model.lora.enabled"),  # with freeze_llm below
        ("data.on_bad_row=ignore", "data.on_bad_row"),
    ],
)
def test_cross_field_errors_name_the_key(override, key, tmp_path):
    extra = ["model.freeze_llm=true"] if "lora" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config(
            ["recipe=sft", "model=tiny", "trainer=cpu", *REQUIRED["sft"], override, *extra, f"run_dir={tmp_path}"]
        )


def test_every_schema_field_has_a_docstring():
    missing = []
    nodes = [
        node
        for path in sorted((REPO / "qwen3asr_train" / "config").glob("*.py"))
        for node in ast.parse(path.read_text()).body
    ]
    for node in nodes:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "dataclass" for d in node.decorator_list):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)):
                        missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, missing


@pytest.mark.slow
def test_configs_ship_in_a_non_editable_wheel(tmp_path):
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(out)], check=True, timeout=300
    )
    wheel = next(out.glob("qwen3asr_train-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    for rel in ("config.yaml", "recipe/sft.yaml", "recipe/aligner.yaml", "model/tiny.yaml", "trainer/ddp.yaml"):
        assert f"qwen3asr_train/configs/{rel}" in names, rel
    probe = (
        "from hydra import compose, initialize_config_dir\n"
        "from qwen3asr_train.config.load import CONFIG_DIR, register_schemas\n"
        "assert 'site' in str(CONFIG_DIR), CONFIG_DIR\n"
        "register_schemas()\n"
        "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
        "    print(compose('config', overrides=['recipe=gspo', 'model=tiny']).recipe.name)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "gspo", proc.stderr[-2000:]


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_tensorboard_and_offline_wandb_loggers(logger, manifest_dir, tmp_path, monkeypatch):
    from qwen3asr_train.stages import sft

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    sft.run(
        make_config(
            tiny_sft_overrides(
                manifest_dir, run_dir, f"logger={logger}", "trainer.max_steps=2", "recipe.export_on_end=false"
            )
        )
    )
    if logger == "tensorboard":
        assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    else:
        assert list(tmp_path.rglob("offline-run-*")), "no offline wandb run written"


def test_distributed_strategies_construct(tiny_model_and_processor):
    """FSDP and DeepSpeed need GPUs to run; their strategy objects are built from config on any machine."""
    from qwen3asr_train.config.schema import TrainerConfig
    from qwen3asr_train.training import build_strategy

    model, _ = tiny_model_and_processor
    fsdp = build_strategy(TrainerConfig(strategy="fsdp", accelerator="gpu"), model)
    wrapped = {cls.__name__ for cls in fsdp.kwargs["auto_wrap_policy"]._module_classes}
    assert wrapped == {"Qwen3ASRAudioEncoderLayer", "Qwen3DecoderLayer"}
    for stage in (2, 3):
        ds = build_strategy(TrainerConfig(strategy=f"deepspeed_zero{stage}", accelerator="gpu"), model)
        assert ds.config["zero_optimization"]["stage"] == stage


def test_gspo_data_mix_from_the_command_line(tmp_path):
    cfg = make_config(
        [
            "recipe=gspo",
            "model=tiny",
            "trainer.max_steps=4",
            f"run_dir={tmp_path}",
            "+recipe.mix.speech.manifests=a.jsonl",
            "+recipe.mix.speech.weight=70",
            "+recipe.mix.functional.manifests=[b.jsonl,c.jsonl]",
            "+recipe.mix.functional.weight=30",
        ]
    )
    assert cfg.recipe.mix["speech"].manifests == ["a.jsonl"] and cfg.recipe.mix["speech"].weight == 70
    assert cfg.recipe.mix["functional"].manifests == ["b.jsonl", "c.jsonl"]
    with pytest.raises(ConfigError, match="recipe.mix.speech"):
        make_config(
            [
                "recipe=gspo",
                "model=tiny",
                "trainer.max_steps=4",
                f"run_dir={tmp_path}",
                "+recipe.mix.speech.manifest=a.jsonl",
            ]
        )


# ------------------------------------------------------------------ experiments, debug, recipe scripts
RECIPE_SCRIPTS = sorted((REPO / "recipes").glob("*/run.sh"))
SHELL_VALUES = {"$((steps / 2))": "600", "$((steps / 6))": "650", "$steps": "1200", "$sft_steps": "1200"}
SHELL_VALUES |= {"$gspo_steps": "200", "$model": "sft"}


def _script_invocations(script: Path) -> list[list[str]]:
    """The override lists of every ``python -m qwen3asr_train`` line of a recipe script, shell values filled in."""
    text = script.read_text()
    exp = re.search(r"exp=(\S+)", text).group(1)
    calls = []
    for line in text.replace("\\\n", " ").splitlines():
        if "-m qwen3asr_train " not in line:
            continue
        args = line.split("-m qwen3asr_train ", 1)[1]
        for key, value in SHELL_VALUES.items():
            args = args.replace(key, value)
        calls.append(args.replace("$exp", exp).split())
    return calls


@pytest.mark.parametrize("script", RECIPE_SCRIPTS, ids=lambda p: p.parent.name)
def test_every_recipe_script_uses_experiments_that_compose(script, tmp_path):
    calls = _script_invocations(script)
    assert calls, f"{script}: no qwen3asr_train invocation found"
    for overrides in calls:
        assert overrides[0].startswith("experiment="), f"{script}: {overrides} does not start from an experiment"
        plain = [o for o in overrides if not o.startswith("hydra.")]
        cfg = make_config([*plain, f"run_dir={tmp_path}"])
        assert cfg.recipe.name in {"sft", "gspo", "aligner", "eval", "export"}
        debug = make_config([overrides[0], "debug=default", f"run_dir={tmp_path}"])
        assert debug.trainer.max_steps in (4, -1) and debug.data.num_workers == 0


@pytest.mark.slow
def test_demo_experiment_debug_run_trains_and_exports(tmp_path):
    """``python -m qwen3asr_train experiment=demo_sft debug=default`` on a stand-in corpus where the demo keeps it.

    Its duration (~20 s alone on 2 cores) is logged, not asserted: timings belong in benchmarks, and a loaded CI
    machine must not fail a correct run."""
    from qwen3asr_train.tools.synthetic import write_tone_corpus

    corpus = tmp_path / "exp" / "demo_sft" / "corpus"
    write_tone_corpus(corpus, 40, seed=1, name="train")
    heldout = write_tone_corpus(corpus / "heldout", 8, seed=2, name="test")  # own wav folder; absolute paths
    heldout.rename(corpus / "test.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3asr_train", "experiment=demo_sft", "debug=default"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "debug" / "sft").iterdir())
    assert len(runs) == 1 and (runs[0] / "export" / "model.safetensors").exists()
    assert (runs[0] / "run_record.json").exists()
    logging.getLogger(__name__).info("demo debug run: %.0f s", seconds)
