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


# ------------------------------------------------------------------ checkpoints as upstream writes them
UPSTREAM = Path(__file__).parent / "fixtures" / "upstream_qwen_asr_0.0.6"
"""Written by qwen-asr 0.0.6's classes under transformers 4.57.6 (see its README): the released file layout."""


def _clips(seconds=(0.93, 1.37, 2.61), seed=3):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


@pytest.mark.parametrize("kind", ["asr", "aligner"])
def test_upstream_written_checkpoint_loads_with_the_qwen3asr_processor(kind):
    from transformers import Qwen3ASRFeatureExtractor

    from qwen3asr_train.data.prompts import aligner_input

    assert json.loads((UPSTREAM / kind / "preprocessor_config.json").read_text())["feature_extractor_type"] == (
        "WhisperFeatureExtractor"
    )
    model, processor = build_model(ModelConfig(source="pretrained", task=kind, path=str(UPSTREAM / kind)))
    assert isinstance(processor.feature_extractor, Qwen3ASRFeatureExtractor)
    assert processor.tokenizer.audio_token == "<|audio_pad|>"
    assert model.training, "loaded modules must start in train mode (stages switch to eval for evaluation)"
    prompt = asr_prompt() if kind == "asr" else aligner_input(["alpha", "bravo"])
    inputs = processor(text=[prompt] * 3, audio=_clips())
    assert inputs["input_features"].shape[-1] % 100 == 0  # what the encoder requires
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    assert torch.isfinite(logits).all()


def test_padded_rows_equal_the_clip_alone(tiny_model_and_processor):
    """A clip's logits must not depend on its batch-mates: upstream encodes each clip from its valid frames,
    zero-padding the last 1-s chunk. The clip alone gets the batch's own valid mel frames (the Whisper front end
    differs at the last frame between a padded and an unpadded waveform, upstream too), zeros after them."""
    model, processor = tiny_model_and_processor
    clips = _clips()
    batch = processor(text=[asr_prompt()] * 3, audio=clips)
    with torch.no_grad():
        batched = model(**batch).logits
        for row, clip in enumerate(clips):
            alone = processor(text=[asr_prompt()], audio=[clip])
            frames = int(alone["input_features_mask"].sum())
            assert frames == int(batch["input_features_mask"][row].sum())
            alone["input_features"] = torch.zeros_like(alone["input_features"])
            alone["input_features"][0, :, :frames] = batch["input_features"][row, :, :frames]
            got = batched[row][batch["attention_mask"][row].bool()]
            assert torch.allclose(got, model(**alone).logits[0], atol=1e-6), row


def test_native_export_of_an_upstream_checkpoint_loads_in_plain_transformers(tmp_path):
    """transformers 5.x reverses a load-time key mapping on save_pretrained (thinker.* names under a native config,
    then random weights on reload); our export writes native names itself."""
    from transformers import Qwen3ASRForConditionalGeneration

    model, processor = build_model(ModelConfig(source="pretrained", path=str(UPSTREAM / "asr")))
    out = save_native(model, processor, tmp_path / "native")
    assert all(not k.startswith("thinker.") for k in load_file(str(out / "model.safetensors")))
    plain, info = Qwen3ASRForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    single = processor(text=[asr_prompt("hot words")], audio=_clips((1.37,)))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(**single).logits, model.eval()(**single).logits, atol=1e-6)


def _broken_copy(tmp_path: Path, kind: str = "asr") -> Path:
    target = tmp_path / f"broken_{kind}"
    shutil.copytree(UPSTREAM / kind, target)
    return target


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_preprocessor", r"preprocessor_config\.json"),
        ("feature_size", r"preprocessor_config\.json: feature_size=80"),
        ("extractor_type", r"preprocessor_config\.json: feature_extractor_type='SpeechT5FeatureExtractor'"),
        ("no_audio_config", r"config\.json: thinker_config: missing key 'audio_config'"),
        ("no_vocab_size", r"config\.json: thinker_config\.text_config: missing key 'vocab_size'"),
        ("no_classify_num", r"config\.json: thinker_config: missing key 'classify_num'"),
        (
            "audio_token",
            r"tokenizer_config\.json: the tokenizer has \d+ tokens but config\.json's text_config\.vocab_size",
        ),
        ("no_chat_template_key", r"chat_template\.json: key 'chat_template' missing"),
    ],
)
def test_upstream_directory_with_a_wrong_or_missing_key_fails_clearly(tmp_path, damage, message):
    kind = "aligner" if damage == "no_classify_num" else "asr"
    d = _broken_copy(tmp_path, kind)
    if damage == "no_preprocessor":
        (d / "preprocessor_config.json").unlink()
    elif damage == "feature_size":
        _edit_json(d / "preprocessor_config.json", lambda c: c.update(feature_size=80))
    elif damage == "extractor_type":
        _edit_json(
            d / "preprocessor_config.json", lambda c: c.update(feature_extractor_type="SpeechT5FeatureExtractor")
        )
    elif damage == "no_audio_config":
        _edit_json(d / "config.json", lambda c: c["thinker_config"].pop("audio_config"))
    elif damage == "no_vocab_size":
        _edit_json(d / "config.json", lambda c: c["thinker_config"]["text_config"].pop("vocab_size"))
    elif damage == "no_classify_num":
        _edit_json(d / "config.json", lambda c: c["thinker_config"].pop("classify_num"))
    elif damage == "audio_token":

        def bad_token(c):
            c["audio_token"] = "<|nothing|>"
            c["extra_special_tokens"]["audio_token"] = "<|nothing|>"

        _edit_json(d / "tokenizer_config.json", bad_token)
        (d / "special_tokens_map.json").unlink()
    else:
        _edit_json(d / "chat_template.json", lambda c: c.pop("chat_template"))
    with pytest.raises(CheckpointLayoutError, match=message):
        build_model(ModelConfig(source="pretrained", task=kind, path=str(d)))


def test_original_export_carries_the_files_transformers_4_57_reads(layouts):
    """qwen-asr 0.0.6 sets tokenizer.audio_token only from ``extra_special_tokens``; 4.57 reads the slow files too."""
    from tokenizers import Tokenizer, models

    _, original = layouts
    names = {p.name for p in original.iterdir()}
    assert {"vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "chat_template.json"} <= names
    assert "processor_config.json" not in names and "chat_template.jinja" not in names
    config = json.loads((original / "tokenizer_config.json").read_text())
    assert config["extra_special_tokens"] == {
        "audio_token": "<|audio_pad|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
    }
    # the slow files rebuild the same BPE as tokenizer.json (an independent construction)
    fast = Tokenizer.from_file(str(original / "tokenizer.json"))
    slow = Tokenizer.from_str(fast.to_str())
    slow.model = models.BPE.from_file(str(original / "vocab.json"), str(original / "merges.txt"))
    text = "the quick brown fox language English<asr_text>hello world"
    assert slow.encode(text).ids == fast.encode(text).ids
    added = json.loads((original / "added_tokens.json").read_text())
    assert all(fast.token_to_id(t) == i for t, i in added.items())


def test_mistral_regex_condition_and_divergence():
    from qwen3asr_train.model.processor import mistral_regex_applies, regex_divergence
    from qwen3asr_train.model.tiny import build_tokenizer

    big = 151_643
    assert mistral_regex_applies({"transformers_version": "4.57.6"}, big)
    assert mistral_regex_applies({}, big)  # no version at all: 4.57 patches too
    assert not mistral_regex_applies({"transformers_version": "4.57.2"}, big)
    assert not mistral_regex_applies({"transformers_version": "5.23.0"}, big)
    assert not mistral_regex_applies({"transformers_version": "4.57.6"}, 384)  # small vocabularies are left alone
    tok = build_tokenizer(["McDonald McDonald bought an iPhone iPhone", "hello world"] * 3)
    assert regex_divergence(tok, ["McDonald bought an iPhone", "hello world"]) == (1, 2)


def test_loaded_modules_train_in_train_mode_and_evaluate_in_eval_mode():
    """from_pretrained returns eval mode; a loaded aligner must train with its head dropout active."""
    from qwen3asr_train.checkpoints import load_for_inference
    from qwen3asr_train.data.prompts import aligner_input

    model, processor = build_model(
        ModelConfig(source="pretrained", task="aligner", path=str(UPSTREAM / "aligner"), classifier_dropout=0.5)
    )
    assert model.training and all(m.training for m in model.modules())
    inputs = processor(text=[aligner_input(["alpha", "bravo"])], audio=_clips((1.37,)))
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(**inputs).logits
        second = model(**inputs).logits
        assert not torch.equal(first, second), "dropout must be active in training"
        model.eval()
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    evaluated, _ = load_for_inference(UPSTREAM / "aligner")
    assert not evaluated.training and not any(m.training for m in evaluated.modules())
