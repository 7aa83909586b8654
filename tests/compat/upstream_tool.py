"""The upstream side of the compatibility suite: runs ONLY in the compat venv (qwen-asr 0.0.6, transformers 4.57.6).

Why a separate program: qwen-asr pins transformers 4.57.6 and does not import under the 5.x our package
needs, so the two cannot share a process. ``tests/test_compat.py`` calls this script with the compat
venv's Python and exchanges plain files (safetensors/npz/JSON) with it.

Commands (each prints one JSON object on stdout, with every warning seen while loading and running):

- ``write --kind asr|aligner --out DIR``: a tiny checkpoint written by upstream's own classes, the way the
  released repositories and the official SFT script lay it out (original "thinker" layout, Whisper
  feature-extractor config, 4.57 tokenizer files incl. vocab.json/merges.txt, ``chat_template.json``,
  tied head omitted by ``save_pretrained``).
- ``forward --model DIR --inputs NPZ --out NPZ``: load DIR with ``Qwen3ASRModel.from_pretrained`` (or
  ``Qwen3ForcedAligner.from_pretrained``), run the processor on the given audio and prompts and the thinker
  forward; writes logits, input ids and the attention mask; reports missing/unexpected weights.
- ``transcribe`` / ``align``: upstream's public inference calls on the given audio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

TOKENS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio_start": "<|audio_start|>",
    "audio_end": "<|audio_end|>",
    "audio_pad": "<|audio_pad|>",
    "timestamp": "<timestamp>",
}
ASR_TEXT = "<asr_text>"

# The ASR chat template as the released checkpoints' chat_template.json renders it: the system turn is
# always emitted, user text is dropped, only the audio item is kept.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}"
    "{%- if message.content is string -%}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>system\\n' -}}{%- for part in message.content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message.role == 'user' -%}{{- '<|im_start|>user\\n' -}}"
    "{%- if message.content is not string -%}{%- for part in message.content -%}"
    "{%- if part.type == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a small speech recognition test",
    "one two three four five six seven eight nine ten",
    "blue green red yellow river mountain",
    "system user assistant language English language German language None",
]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def captured_warnings():
    """Every Python warning and every WARNING+ log line (transformers logs through ``logging``)."""
    handler = _Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.messages
        finally:
            handler.messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
            root.removeHandler(handler)
            tf_logger.removeHandler(handler)


def build_tokenizer(workdir: Path, corpus: list[str] | None = None, pad_vocab_to: int = 0):
    """A byte-level BPE with Qwen's pre-tokenizer, saved as vocab.json/merges.txt and loaded as Qwen2TokenizerFast.

    ``pad_vocab_to`` appends unreachable entries to the base vocabulary (the 4.57 regex patch only looks at
    tokenizers of more than 100k tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus or CORPUS, trainer)
    workdir.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(workdir))  # vocab.json + merges.txt
    if pad_vocab_to:
        vocab = json.loads((workdir / "vocab.json").read_text())
        for i in range(len(vocab), pad_vocab_to):
            vocab[f"unused_{i}"] = i
        (workdir / "vocab.json").write_text(json.dumps(vocab))
    tok = Qwen2TokenizerFast(
        vocab_file=str(workdir / "vocab.json"),
        merges_file=str(workdir / "merges.txt"),
        unk_token=None,
        bos_token=None,
        eos_token=TOKENS["im_end"],
        pad_token=TOKENS["endoftext"],
        errors="replace",
        extra_special_tokens={
            "audio_token": TOKENS["audio_pad"],
            "audio_bos_token": TOKENS["audio_start"],
            "audio_eos_token": TOKENS["audio_end"],
        },
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in TOKENS.values()], special_tokens=True)
    tok.add_tokens([AddedToken(ASR_TEXT, special=False, normalized=False)])
    return tok


def write(kind: str, out: Path, seed: int, keep_aligner_save_bug: bool) -> dict:
    import tempfile

    from qwen_asr.core.transformers_backend import (
        Qwen3ASRConfig,
        Qwen3ASRForConditionalGeneration,
        Qwen3ASRProcessor,
    )
    from transformers import GenerationConfig, WhisperFeatureExtractor

    aligner = kind == "aligner"
    with tempfile.TemporaryDirectory() as scratch:
        tok = build_tokenizer(Path(scratch))
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in TOKENS.items()}
    text_hidden = 16
    thinker = {
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "d_model": 16,
            "output_dim": text_hidden,
            "n_window": 50,
            "n_window_infer": 800,
            "conv_chunksize": 500,
            "downsample_hidden_size": 4,
            "max_source_positions": 1500,
        },
        "text_config": {
            "vocab_size": len(tok),
            "hidden_size": text_hidden,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            "rope_theta": 1000000.0,
            "rope_scaling": {
                "rope_type": "default",
                "type": "default",
                "mrope_section": [2, 1, 1],
                "interleaved": True,
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": not aligner,
        },
        "audio_token_id": ids["audio_pad"],
        "audio_start_token_id": ids["audio_start"],
        "audio_end_token_id": ids["audio_end"],
        "user_token_id": tok.convert_tokens_to_ids("user") if "user" in tok.get_vocab() else ids["im_start"],
    }
    top: dict = {"support_languages": ["English", "German", "Chinese"]}
    if aligner:
        thinker["model_type"] = "qwen3_forced_aligner"
        thinker["classify_num"] = 64
        top["timestamp_token_id"] = ids["timestamp"]
        top["timestamp_segment_time"] = 80
    config = Qwen3ASRConfig(thinker_config=thinker, **top)
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config)
    with torch.no_grad():  # weights visibly different from init defaults (the convs start tiny otherwise)
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "conv" in name:
                param.normal_(0.0, 0.3)
    if not aligner:
        model.generation_config = GenerationConfig(
            eos_token_id=[ids["im_end"], ids["endoftext"]], pad_token_id=ids["endoftext"], max_new_tokens=64
        )
    model.save_pretrained(out, safe_serialization=True)
    processor = Qwen3ASRProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    # The released repositories ship the template as chat_template.json.
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    if aligner and not keep_aligner_save_bug:
        # Upstream's config classes write thinker_config.model_type="qwen3_asr_thinker" for an aligner (their
        # to_dict uses the class attribute); the released aligner's config.json says qwen3_forced_aligner.
        cfg = json.loads((out / "config.json").read_text())
        cfg["thinker_config"]["model_type"] = "qwen3_forced_aligner"
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"files": sorted(p.name for p in out.iterdir()), "ids": ids}


def regex(out: Path, texts: list[str]) -> dict:
    """The same >100k-token tokenizer next to a config claiming 4.57.6 and one claiming 5.23.0, tokenised the way
    qwen-asr loads a processor (``fix_mistral_regex=True``, local directory)."""
    import tempfile

    from transformers import AutoTokenizer

    corpus = CORPUS + ["McDonald bought an iPhone at McDonald", "NASA's DNA tests"] * 5
    ids: dict[str, list[list[int]]] = {}
    patched: dict[str, bool] = {}
    for version in ("4.57.6", "5.23.0"):
        with tempfile.TemporaryDirectory() as scratch:
            tok = build_tokenizer(Path(scratch), corpus, pad_vocab_to=100_500)
        target = out / version
        tok.save_pretrained(target)
        (target / "config.json").write_text(json.dumps({"model_type": "qwen3_asr", "transformers_version": version}))
        loaded = AutoTokenizer.from_pretrained(target, fix_mistral_regex=True)
        patched[version] = bool(getattr(loaded, "fix_mistral_regex", False))
        ids[version] = [loaded.encode(t, add_special_tokens=False) for t in texts]
    return {"ids": ids, "patched": patched}


def vllm_check(model_dir: Path) -> dict:
    """Build what vLLM's Qwen3-ASR loader builds from ``config.json`` and load our weights into it, strictly.

    vLLM's config class is the same file as qwen-asr's (``thinker_config`` with audio/text configs); its audio
    tower mirrors transformers' ``Qwen3OmniMoeAudioEncoder`` (projector ``proj1``/``proj2`` inside), its LLM
    ``Qwen3ForCausalLM`` (the aligner: ``Qwen3Model`` + a bias-free ``classifier``); weight names go through
    ``thinker.lm_head. -> language_model.lm_head.`` (aligner ``classifier.``), ``thinker.model. ->
    language_model.model.``, ``thinker. -> ''``; a tied head is skipped and the embeddings used.
    """
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    problems: list[str] = []
    raw = json.loads((model_dir / "config.json").read_text())
    if "thinker_config" not in raw:
        return {"problems": ["config.json has no thinker_config"]}
    config = Qwen3ASRConfig(**raw)
    thinker = config.thinker_config
    aligner = "forced_aligner" in str(raw["thinker_config"].get("model_type", ""))
    head_prefix = "classifier." if aligner else "language_model.lm_head."
    rules = (("thinker.lm_head.", head_prefix), ("thinker.model.", "language_model.model."), ("thinker.", ""))
    mapped = {}
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        for old, new in rules:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        mapped[name] = tensor
    audio = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**thinker.audio_config.to_dict()))
    text = {k: v for k, v in thinker.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    text_config = Qwen3Config(**text)
    groups = {"audio_tower.": audio.state_dict()}
    if aligner:
        groups["language_model.model."] = Qwen3Model(text_config).state_dict()
        if mapped.get("classifier.weight") is None or tuple(mapped["classifier.weight"].shape) != (
            int(raw["thinker_config"]["classify_num"]),
            text_config.hidden_size,
        ):
            problems.append("classifier.weight missing or not [classify_num, hidden]")
    else:
        groups["language_model."] = Qwen3ForCausalLM(text_config).state_dict()
        if text_config.tie_word_embeddings and not torch.equal(
            mapped["language_model.lm_head.weight"], mapped["language_model.model.embed_tokens.weight"]
        ):
            problems.append("tied head differs from the embeddings (vLLM uses the embeddings)")
    claimed = set()
    for prefix, expected in groups.items():
        got = {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}
        claimed |= {prefix + k for k in got}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(got) & set(expected) if tuple(got[k].shape) != tuple(expected[k].shape))
        problems += [f"missing {prefix}{k}" for k in missing] + [f"unexpected {prefix}{k}" for k in unexpected]
        problems += [f"shape {prefix}{k}" for k in shapes]
    leftover = sorted(set(mapped) - claimed - {"classifier.weight"})
    problems += [f"unmapped {k}" for k in leftover]
    return {"problems": problems, "aligner": aligner, "weights": len(mapped)}


def _load(model_dir: str, kind: str):
    from qwen_asr import Qwen3ASRModel, Qwen3ForcedAligner

    if kind == "aligner":
        wrapper = Qwen3ForcedAligner.from_pretrained(model_dir, dtype=torch.float32)
    else:
        wrapper = Qwen3ASRModel.from_pretrained(model_dir, dtype=torch.float32)
    wrapper.model.eval()
    return wrapper


def loading_info(model_dir: str) -> dict:
    """Missing/unexpected weights as transformers 4.57 reports them for the upstream classes."""
    from qwen_asr.core.transformers_backend import Qwen3ASRForConditionalGeneration

    _, info = Qwen3ASRForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    return {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def forward(model_dir: str, kind: str, inputs_npz: str, out_npz: str) -> dict:
    data = np.load(inputs_npz, allow_pickle=False)
    prompts = json.loads(str(data["prompts"]))
    audio = [data[f"audio_{i}"].astype(np.float32) for i in range(len(prompts))]
    wrapper = _load(model_dir, kind)
    processor = wrapper.processor
    batch = processor(text=prompts, audio=audio, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = wrapper.model.thinker(**batch).logits
    np.savez(
        out_npz,
        logits=logits.float().numpy(),
        input_ids=batch["input_ids"].numpy(),
        attention_mask=batch["attention_mask"].numpy(),
    )
    tokenizer = processor.tokenizer
    return {
        "shape": list(logits.shape),
        "regex_patched": bool(getattr(tokenizer, "fix_mistral_regex", False)),
        "audio_token": getattr(tokenizer, "audio_token", None),
        "feature_extractor": type(processor.feature_extractor).__name__,
    }


def transcribe(model_dir: str, inputs_npz: str) -> dict:
    data = np.load(inputs_npz, allow_pickle=False)
    n = int(data["count"])
    wrapper = _load(model_dir, "asr")
    wrapper.max_new_tokens = 8
    results = wrapper.transcribe(audio=[(data[f"audio_{i}"].astype(np.float32), 16000) for i in range(n)])
    return {"results": [{"language": r.language, "text": r.text} for r in results]}


def align(model_dir: str, inputs_npz: str) -> dict:
    data = np.load(inputs_npz, allow_pickle=False)
    texts = json.loads(str(data["texts"]))
    wrapper = _load(model_dir, "aligner")
    audio = [(data[f"audio_{i}"].astype(np.float32), 16000) for i in range(len(texts))]
    results = wrapper.align(audio=audio, text=texts, language="English")
    return {
        "results": [[{"text": it.text, "start": it.start_time, "end": it.end_time} for it in r.items] for r in results]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--kind", choices=["asr", "aligner"], required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--keep-aligner-save-bug", action="store_true")
    f = sub.add_parser("forward")
    f.add_argument("--model", required=True)
    f.add_argument("--kind", choices=["asr", "aligner"], required=True)
    f.add_argument("--inputs", required=True)
    f.add_argument("--out", required=True)
    i = sub.add_parser("loading-info")
    i.add_argument("--model", required=True)
    t = sub.add_parser("transcribe")
    t.add_argument("--model", required=True)
    t.add_argument("--inputs", required=True)
    a = sub.add_parser("align")
    a.add_argument("--model", required=True)
    a.add_argument("--inputs", required=True)
    r = sub.add_parser("regex")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--texts", required=True, help="JSON list of strings")
    v = sub.add_parser("vllm-check")
    v.add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with captured_warnings() as seen:
        if args.command == "write":
            result = write(args.kind, args.out, args.seed, args.keep_aligner_save_bug)
        elif args.command == "forward":
            result = forward(args.model, args.kind, args.inputs, args.out)
        elif args.command == "loading-info":
            result = loading_info(args.model)
        elif args.command == "transcribe":
            result = transcribe(args.model, args.inputs)
        elif args.command == "regex":
            result = regex(args.out, json.loads(args.texts))
        elif args.command == "vllm-check":
            result = vllm_check(args.model)
        else:
            result = align(args.model, args.inputs)
    import transformers

    result["warnings"] = seen
    result["transformers_version"] = transformers.__version__
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
