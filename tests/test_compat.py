"""Compatibility against the real upstream package, both directions (``make test-compat``).

The upstream side (qwen-asr 0.0.6 on transformers 4.57.6) runs in its own venv through
``tests/compat/upstream_tool.py``; files are the only thing the two sides share. Directions:

1. checkpoints written by upstream's classes -> our SFT / aligner / eval -> our exports -> upstream forward,
   logits within 1e-5 of upstream's forward on the checkpoint it wrote (clips of non-integer seconds in
   left-padded batches);
2. our exports of models we built -> upstream ``transcribe`` / ``align``, no warnings, no missing or
   unexpected weights;
3. the names and config fields vLLM's Qwen3-ASR loader reads (its prefix rules applied to our original export,
   loaded strictly into the transformers 4.57 classes vLLM's modules mirror);
4. the tokenizer-regex finding (what qwen-asr tokenises for a 4.57-era config vs our exports).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.prompts import aligner_input, asr_prompt
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.stages import aligner as aligner_stage
from qwen3asr_train.stages import evaluate as eval_stage
from qwen3asr_train.stages import export as export_stage
from qwen3asr_train.stages import sft
from qwen3asr_train.testing import write_manifest
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config

pytestmark = pytest.mark.compat
log = logging.getLogger(__name__)

TOOL = Path(__file__).parent / "compat" / "upstream_tool.py"
SECONDS = (0.93, 1.37, 2.61)
"""Clip lengths that are not whole seconds (nor whole 10-ms frames), so batches are left-padded."""
ATOL = 1e-5


@pytest.fixture(scope="module")
def upstream_python() -> str:
    python = os.environ.get("QWEN3ASR_COMPAT_PYTHON")
    if not python:
        pytest.skip("QWEN3ASR_COMPAT_PYTHON is not set: run `make test-compat` (it builds .venv-compat)")
    return python


def upstream(python: str, *args: str) -> dict:
    """Run one upstream-side command; its JSON answer (it fails the test on a non-zero exit)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def written(upstream_python, tmp_path_factory) -> dict[str, Path]:
    """Fresh tiny checkpoints written by upstream's own classes."""
    root = tmp_path_factory.mktemp("upstream")
    out = {}
    for kind in ("asr", "aligner"):
        answer = upstream(upstream_python, "write", "--kind", kind, "--out", root / kind)
        assert answer["transformers_version"] == "4.57.6" and not answer["warnings"], answer
        out[kind] = root / kind
    upstream(upstream_python, "write", "--kind", "aligner", "--out", root / "aligner_bug", "--keep-aligner-save-bug")
    out["aligner_bug"] = root / "aligner_bug"
    return out


def _audio(seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(round(s * 16000)))).astype(np.float32) for s in SECONDS]


def _inputs_file(directory: Path, prompts: list[str], texts: list[str] | None = None) -> Path:
    path = directory / "inputs.npz"
    audio = _audio()
    extra = {"texts": json.dumps(texts)} if texts is not None else {}
    np.savez(
        path, prompts=json.dumps(prompts), count=len(audio), **{f"audio_{i}": a for i, a in enumerate(audio)}, **extra
    )
    return path


def _prompts(kind: str) -> list[str]:
    if kind == "asr":
        return [asr_prompt(), asr_prompt("alpha bravo"), asr_prompt(forced_language="English")]
    return [aligner_input(["ba", "de"]), aligner_input(["gi"]), aligner_input(["ko", "mu", "pa"])]


def upstream_forward(python: str, model_dir: Path, kind: str, inputs: Path, out: Path) -> dict:
    answer = upstream(python, "forward", "--model", model_dir, "--kind", kind, "--inputs", inputs, "--out", out)
    answer["arrays"] = dict(np.load(out))
    return answer


def our_forward(model_dir: Path, kind: str, prompts: list[str]) -> dict[str, np.ndarray]:
    """Our loader (and its processor) on the same audio and prompts."""
    model, processor = build_model(ModelConfig(source="pretrained", task=kind, path=str(model_dir)))
    batch = processor(text=prompts, audio=_audio())
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    return {"logits": logits.numpy(), "input_ids": batch["input_ids"].numpy()}


def assert_same_logits(ours: dict, theirs: dict, what: str) -> float:
    """Same token ids (left-padded batch), logits within ATOL at every real position; returns the max diff."""
    assert np.array_equal(ours["input_ids"], theirs["input_ids"]), f"{what}: token ids differ"
    mask = theirs["attention_mask"].astype(bool)
    diff = float(np.abs(ours["logits"] - theirs["logits"])[mask].max())
    assert diff <= ATOL, f"{what}: max |logit diff| {diff:.3g} > {ATOL}"
    log.info("%s: max |logit diff| %.2g over %d positions", what, diff, int(mask.sum()))
    return diff


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {
        "asr": write_manifest(root, num=6, seed=5, min_seconds=0.7, max_seconds=2.3, name="asr.jsonl"),
        "aligner": write_tone_corpus(root / "tones", 6, seed=5),
    }


def _train(kind: str, model_dir: Path, manifest: Path, run_dir: Path) -> None:
    """One optimizer step at a negligible learning rate (exercises the whole stage, leaves weights ~unchanged)."""
    overrides = [
        f"recipe={'sft' if kind == 'asr' else 'aligner'}",
        "model=checkpoint",
        f"model.path={model_dir}",
        f"data.train={manifest}",
        "data.num_workers=0",
        "data.max_batch_seconds=8",
        "trainer=cpu",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "recipe.optim.lr=1e-12",
        "recipe.optim.weight_decay=0.0",
        f"run_dir={run_dir}",
    ]
    (sft if kind == "asr" else aligner_stage).run(make_config(overrides))


@pytest.mark.parametrize("kind", ["asr", "aligner"])
def test_upstream_checkpoint_trains_evaluates_and_exports_to_upstream(upstream_python, written, corpus, kind, tmp_path):
    prompts = _prompts(kind)
    inputs = _inputs_file(tmp_path, prompts)
    reference = upstream_forward(upstream_python, written[kind], kind, inputs, tmp_path / "ref.npz")
    assert reference["feature_extractor"] == "WhisperFeatureExtractor" and not reference["regex_patched"]

    # our loader on the upstream directory computes upstream's logits
    assert_same_logits(our_forward(written[kind], kind, prompts), reference["arrays"], "our load of upstream dir")

    run_dir = tmp_path / "run"
    _train(kind, written[kind], corpus[kind], run_dir)
    native = run_dir / "export"
    assert all(not k.startswith("thinker.") for k in load_file(str(native / "model.safetensors")))
    assert_same_logits(our_forward(native, kind, prompts), reference["arrays"], "end-of-run native export")

    original = Path(
        export_stage.run(
            make_config(
                [
                    "recipe=export",
                    f"recipe.checkpoint={run_dir}",
                    "recipe.layout=original",
                    f"recipe.output_dir={tmp_path / 'original'}",
                    f"run_dir={tmp_path / 'export_run'}",
                ]
            )
        )["original"]
    )
    info = upstream(upstream_python, "loading-info", "--model", original)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    again = upstream_forward(upstream_python, original, kind, inputs, tmp_path / "again.npz")
    assert not again["warnings"], again["warnings"]
    assert_same_logits(
        {"logits": again["arrays"]["logits"], "input_ids": again["arrays"]["input_ids"]},
        reference["arrays"],
        "upstream forward of our original export",
    )

    metrics = eval_stage.run(
        make_config(
            [
                "recipe=eval",
                f"recipe.model_path={written[kind]}",
                f"+recipe.sets.test={corpus[kind]}",
                f"run_dir={tmp_path / 'eval'}",
            ]
        )
    )
    assert metrics, "evaluation of the upstream directory returned nothing"


def test_upstream_aligner_config_with_the_save_bug_loads_as_aligner(written):
    """qwen-asr's own config classes write thinker_config.model_type=qwen3_asr_thinker for an aligner; the
    ``classify_num`` key still identifies it, and the weights are the same as the correctly typed file's."""
    config = json.loads((written["aligner_bug"] / "config.json").read_text())
    assert config["thinker_config"]["model_type"] == "qwen3_asr_thinker"
    bug, _ = build_model(ModelConfig(source="pretrained", task="aligner", path=str(written["aligner_bug"])))
    good, _ = build_model(ModelConfig(source="pretrained", task="aligner", path=str(written["aligner"])))
    assert bug.score.out_features == config["thinker_config"]["classify_num"]
    for (name, a), (_, b) in zip(bug.state_dict().items(), good.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def our_exports(tmp_path_factory) -> dict[str, Path]:
    """Exports of models we built from scratch (our tokenizer, our configs), both layouts, ASR and aligner."""
    root = tmp_path_factory.mktemp("ours")
    corpus = write_tone_corpus(root / "tones", 8, seed=9)
    out = {}
    for kind, recipe in (("asr", "sft"), ("aligner", "aligner")):
        run_dir = root / kind
        overrides = [
            f"recipe={recipe}",
            "model=tiny",
            f"data.train={corpus}",
            "data.num_workers=0",
            "trainer=cpu",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            f"run_dir={run_dir}",
        ]
        if kind == "aligner":
            overrides.append("model.num_labels=64")
        (sft if kind == "asr" else aligner_stage).run(make_config(overrides))
        written = export_stage.run(
            make_config(
                [
                    "recipe=export",
                    f"recipe.checkpoint={run_dir}",
                    "recipe.layout=both",
                    f"recipe.output_dir={root / f'{kind}_export'}",
                    f"run_dir={root / f'{kind}_export_run'}",
                ]
            )
        )
        out[kind] = Path(written["original"])
        out[f"{kind}_native"] = Path(written["native"])
    return out


@pytest.mark.parametrize("kind", ["asr", "aligner"])
def test_our_original_export_loads_in_upstream_and_matches_our_native(upstream_python, our_exports, kind, tmp_path):
    info = upstream(upstream_python, "loading-info", "--model", our_exports[kind])
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    prompts = _prompts(kind)
    theirs = upstream_forward(
        upstream_python, our_exports[kind], kind, _inputs_file(tmp_path, prompts), tmp_path / "o.npz"
    )
    assert not theirs["warnings"], theirs["warnings"]
    assert theirs["audio_token"] == "<|audio_pad|>" and not theirs["regex_patched"]
    assert_same_logits(our_forward(our_exports[f"{kind}_native"], kind, prompts), theirs["arrays"], kind)


def test_upstream_transcribe_and_align_run_on_our_exports_without_warnings(upstream_python, our_exports, tmp_path):
    inputs = _inputs_file(tmp_path, _prompts("asr"), texts=["ba de", "gi", "ko mu pa"])
    asr = upstream(upstream_python, "transcribe", "--model", our_exports["asr"], "--inputs", inputs)
    assert not asr["warnings"], asr["warnings"]
    assert len(asr["results"]) == len(SECONDS)
    aligned = upstream(upstream_python, "align", "--model", our_exports["aligner"], "--inputs", inputs)
    assert not aligned["warnings"], aligned["warnings"]
    assert [[w["text"] for w in r] for r in aligned["results"]] == [["ba", "de"], ["gi"], ["ko", "mu", "pa"]]
    for words in aligned["results"]:
        assert all(0.0 <= w["start"] <= w["end"] for w in words)


@pytest.mark.parametrize("kind", ["asr", "aligner"])
def test_vllm_loader_names_and_config(upstream_python, our_exports, kind):
    """vLLM reads ``thinker_config`` and maps ``thinker.lm_head.`` -> ``language_model.lm_head.`` (aligner:
    ``classifier.``), ``thinker.model.`` -> ``language_model.model.``, ``thinker.`` -> ``""``; its audio tower
    mirrors transformers' Qwen3OmniMoeAudioEncoder and its LLM Qwen3ForCausalLM. The upstream side builds those
    from our config and loads the mapped weights strictly."""
    answer = upstream(upstream_python, "vllm-check", "--model", our_exports[kind])
    assert answer["problems"] == [], answer


def test_tokenizer_regex_finding(upstream_python, tmp_path):
    """qwen-asr (transformers 4.57.6, ``fix_mistral_regex=True``) swaps the pre-tokenizer regex of a >100k-token
    tokenizer in a local directory whose config claims 4.57.3-4.x; with a 5.x version it keeps Qwen's regex,
    which is what we train with."""
    from qwen3asr_train.model.processor import load_tokenizer, regex_divergence

    texts = ["McDonald bought an iPhone", "hello world", "NASA's DNA tests"]
    answer = upstream(upstream_python, "regex", "--out", tmp_path / "tok", "--texts", json.dumps(texts))
    for version, ids in answer["ids"].items():
        ours = load_tokenizer(tmp_path / "tok" / version)
        mine = [ours.encode(t, add_special_tokens=False) for t in texts]
        if version == "4.57.6":
            differ = [a != b for a, b in zip(mine, ids, strict=True)]
            assert differ[0] and not differ[1], differ
            assert regex_divergence(ours, texts)[0] == sum(differ)
        else:
            assert mine == ids, version


def test_compat_python_is_not_ours(upstream_python):
    out = subprocess.run(
        [upstream_python, "-c", "import transformers, qwen_asr; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "4.57.6" and sys.executable != upstream_python
