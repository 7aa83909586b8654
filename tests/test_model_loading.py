"""Model loading: native and original ("thinker") layouts give the same logits; bad directories fail loudly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3asr_train.config.schema import LoraConfig, ModelConfig
from qwen3asr_train.data.prompts import asr_prompt
from qwen3asr_train.model.builder import build_model, set_trainable
from qwen3asr_train.model.convert import CheckpointLayoutError, original_to_native_state_dict
from qwen3asr_train.model.export import save_native, save_original


def _inputs(processor, seconds=(1.2, 2.6)):
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    return processor(text=[asr_prompt(), asr_prompt("some context")], audio=audio)


@pytest.fixture(scope="module")
def layouts(tiny_model_and_processor, tmp_path_factory):
    model, processor = tiny_model_and_processor
    root = tmp_path_factory.mktemp("layouts")
    return save_native(model, processor, root / "native"), save_original(model, processor, root / "original")


def test_original_layout_file_is_really_original(layouts):
    _, original = layouts
    config = json.loads((original / "config.json").read_text())
    assert "thinker_config" in config and "audio_config" not in config
    assert config["thinker_config"]["text_config"]["model_type"] == "qwen3_asr_text"
    keys = set(load_file(str(original / "model.safetensors")))
    assert all(k.startswith("thinker.") for k in keys)
    assert "thinker.lm_head.weight" in keys and "thinker.audio_tower.proj1.weight" in keys


def test_original_layout_with_tied_head_omitted_loads_to_same_logits(tiny_model_and_processor, layouts, tmp_path):
    model, processor = tiny_model_and_processor
    _, original = layouts
    # the official SFT saves checkpoints without the tied head: drop it
    omitted = tmp_path / "no_head"
    shutil.copytree(original, omitted)
    state = load_file(str(omitted / "model.safetensors"))
    del state["thinker.lm_head.weight"]
    save_file(state, str(omitted / "model.safetensors"))
    inputs = _inputs(processor)
    with torch.no_grad():
        ref = model(**inputs).logits
        for directory in (layouts[0], original, omitted):
            loaded, proc = build_model(ModelConfig(source="pretrained", path=str(directory)))
            loaded.eval()
            again = proc(text=[asr_prompt(), asr_prompt("some context")], audio=[a for a in _raw_audio()])
            assert torch.equal(again["input_ids"], inputs["input_ids"])
            assert torch.allclose(loaded(**inputs).logits, ref, atol=1e-6), directory.name


def _raw_audio(seconds=(1.2, 2.6)):
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


def test_key_renames_round_trip(tiny_model_and_processor, layouts):
    model, _ = tiny_model_and_processor
    state = load_file(str(layouts[1] / "model.safetensors"))
    native = original_to_native_state_dict(state, aligner=False)
    ours = model.state_dict()
    assert set(native) == set(ours)
    for key, value in native.items():
        assert torch.equal(value, ours[key]), key


@pytest.mark.parametrize("damage", ["missing", "unexpected", "renamed"])
def test_wrong_or_missing_keys_fail_clearly(layouts, tmp_path, damage):
    broken = tmp_path / damage
    shutil.copytree(layouts[1], broken)
    state = load_file(str(broken / "model.safetensors"))
    key = "thinker.model.layers.0.mlp.up_proj.weight"
    if damage == "missing":
        del state[key]
    elif damage == "unexpected":
        state["thinker.model.extra.weight"] = torch.zeros(2)
    else:
        state["thinker.model.layers.0.mlp.upproj.weight"] = state.pop(key)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointLayoutError, match="Refusing to train"):
        build_model(ModelConfig(source="pretrained", path=str(broken)))


def test_native_dir_with_missing_key_fails(layouts, tmp_path):
    broken = tmp_path / "native_broken"
    shutil.copytree(layouts[0], broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.audio_tower.conv2d1.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointLayoutError, match="missing_keys"):
        build_model(ModelConfig(source="pretrained", path=str(broken)))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointLayoutError, match="config.json"):
        build_model(ModelConfig(source="pretrained", path=str(tmp_path)))


def test_freezing_and_lora(tiny_model_and_processor):
    cfg = ModelConfig(source="tiny", freeze_audio_encoder=True, freeze_projector=True)
    model, _ = build_model(cfg)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(("model.language_model.", "lm_head.")), name
    lora = ModelConfig(source="tiny", freeze_audio_encoder=True, lora=LoraConfig(enabled=True, r=2, alpha=4))
    model, _ = build_model(lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or n.startswith("model.multi_modal_projector.") for n in trainable)
    set_trainable(model, ModelConfig(source="tiny"))  # unfreezing must not touch adapters' existence
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_tiny_tokenizer_carries_real_special_tokens(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    tok = processor.tokenizer
    for t in [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|audio_start|>",
        "<|audio_end|>",
        "<|audio_pad|>",
        "<asr_text>",
        "<timestamp>",
    ]:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    decoded = tok.decode(tok.encode("language English<asr_text>hi<|im_end|>"), skip_special_tokens=True)
    assert decoded == "language English<asr_text>hi"  # <asr_text> survives skip_special_tokens
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_tiny_aligner_builds(tmp_path):
    model, _ = build_model(ModelConfig(source="tiny", task="aligner", num_labels=50))
    assert model.score.out_features == 50 and model.config.num_labels == 50
    out = save_original(model, _, tmp_path / "aligner_original")
    config = json.loads((out / "config.json").read_text())
    assert config["thinker_config"]["model_type"] == "qwen3_forced_aligner"
    assert config["thinker_config"]["classify_num"] == 50
    reloaded, _ = build_model(ModelConfig(source="pretrained", task="aligner", path=str(out)))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(CheckpointLayoutError, match="forced aligner"):
        build_model(ModelConfig(source="pretrained", task="asr", path=str(out)))
    assert Path(out / "chat_template.json").exists()
