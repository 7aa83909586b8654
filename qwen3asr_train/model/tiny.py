"""Tiny real-architecture Qwen3-ASR models built in-process: tokenizer, processor and model, offline.

Why: tests and the demo must run on a CPU with no model hub. The pieces are the real transformers
classes (``Qwen2Tokenizer``, ``Qwen3ASRFeatureExtractor``, ``Qwen3ASRProcessor``,
``Qwen3ASRForConditionalGeneration`` / ``...ForTokenClassification``) at toy sizes with random weights.
The tokenizer is a byte-level BPE trained locally with the Qwen pre-tokenizer regex; it carries the
real special tokens (``<|im_start|>``, ``<|audio_pad|>``, ``<timestamp>``...) and ``<asr_text>`` as a
non-special added token, so every prompt/target code path is the one used with real checkpoints.
Only the token *ids* differ from the real vocabulary; code must always read ids from the tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen3ASRConfig,
    Qwen3ASRFeatureExtractor,
    Qwen3ASRForConditionalGeneration,
    Qwen3ASRForTokenClassification,
    Qwen3ASRProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from qwen3asr_train.config.schema import TinyModelConfig
from qwen3asr_train.data.prompts import (
    ALIGNER_CHAT_TEMPLATE,
    ASR_CHAT_TEMPLATE,
    ASR_TEXT,
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    ENDOFTEXT,
    IM_END,
    SPECIAL_TOKENS,
    TIMESTAMP,
)
from qwen3asr_train.languages import SUPPORTED_LANGUAGES

log = logging.getLogger(__name__)

BUILTIN_TEXTS: tuple[str, ...] = (
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a small speech recognition test",
    "we release a family of speech models today",
    "language English<asr_text>one two three four five six seven eight nine ten",
    "system user assistant",
    "你好世界 今天天气很好",
)
"""Fallback BPE corpus when no training texts are given."""


def build_tokenizer(texts: Iterable[str] = (), vocab_size: int = 384, base_entries: int = 0) -> Qwen2Tokenizer:
    """Train a byte-level BPE on ``texts`` (+ the prompt vocabulary) and wrap it as a Qwen2 tokenizer.

    ``base_entries`` > 0 pads the base vocabulary with unreachable entries (no merge produces them) up to that
    size, so the special tokens get the ids they have in Qwen's tokenizer (``<|endoftext|>`` = 151,643 with
    151,643 entries) while real text keeps the small BPE's ids: the benchmarks use it for the real vocabulary.

    The pre-tokenizer is Qwen's (regex split, then byte-level), so merges never cross the boundaries
    the real tokenizer keeps (e.g. ``\\n`` before a word). eos = ``<|im_end|>``, pad = ``<|endoftext|>``
    (pad must not be ``<|im_end|>``, or padding-based masks would hide the target's end token).
    """
    corpus = list(texts) or list(BUILTIN_TEXTS)
    corpus += ["system", "user", "assistant", "language None"] + [f"language {name}" for name in SUPPORTED_LANGUAGES]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(len(vocab), base_entries):
        vocab[f"<unused_{i}>"] = i
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={"audio_token": AUDIO_PAD, "audio_bos_token": AUDIO_START, "audio_eos_token": AUDIO_END},
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(ASR_TEXT, special=False, normalized=False)])
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer, aligner: bool = False) -> Qwen3ASRProcessor:
    """Processor with the default 128-bin feature extractor and our ASR (or forced-aligner) chat template."""
    return Qwen3ASRProcessor(
        feature_extractor=Qwen3ASRFeatureExtractor(),
        tokenizer=tokenizer,
        chat_template=ALIGNER_CHAT_TEMPLATE if aligner else ASR_CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: Qwen2Tokenizer, sizes: TinyModelConfig, num_labels: int = 0, classifier_dropout: float = 0.0
) -> Qwen3ASRConfig:
    """A real Qwen3ASRConfig at toy size whose special ids come from ``tokenizer`` (an aligner if ``num_labels``)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_PAD, TIMESTAMP, IM_END, ENDOFTEXT)}
    extra = {}
    if num_labels > 0:
        extra = {"num_labels": num_labels, "classifier_dropout": classifier_dropout}
    return Qwen3ASRConfig(
        audio_config={
            "model_type": "qwen3_asr_encoder",
            "num_mel_bins": 128,
            "encoder_layers": sizes.audio_layers,
            "encoder_attention_heads": sizes.audio_heads,
            "encoder_ffn_dim": sizes.audio_ffn,
            "d_model": sizes.audio_d_model,
            "output_dim": sizes.text_hidden,
            "downsample_hidden_size": sizes.downsample_hidden_size,
            "n_window": 50,
            "n_window_infer": 800,
            "max_position_embeddings": 13,
        },
        text_config={
            "model_type": "qwen3",
            "vocab_size": len(tokenizer),
            "hidden_size": sizes.text_hidden,
            "intermediate_size": sizes.text_ffn,
            "num_hidden_layers": sizes.text_layers,
            "num_attention_heads": sizes.text_heads,
            "num_key_value_heads": sizes.text_kv_heads,
            "head_dim": sizes.text_head_dim,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": num_labels == 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        audio_token_id=ids[AUDIO_PAD],
        timestamp_token_id=ids[TIMESTAMP],
        pad_token_id=ids[IM_END],
        eos_token_id=[ids[ENDOFTEXT], ids[IM_END]],
        tie_word_embeddings=num_labels == 0,
        **extra,
    )


def he_init_audio_convs(model: torch.nn.Module) -> None:
    """He-normal init of the encoder's conv stack (zero bias) and N(0, 1/fan_in) for ``conv_out``.

    Why: with the default std-0.02 init the conv stack shrinks real features to std ~2e-4 while the
    per-chunk sinusoidal positions added after it have std ~0.5, so a model trained from scratch sees
    positions, not audio (docs/decisions.md). Only for models trained from scratch.
    """
    encoder = model.get_submodule("model.audio_tower")
    for name in ("conv2d1", "conv2d2", "conv2d3"):
        conv = getattr(encoder, name)
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    fan_in = encoder.conv_out.weight.shape[1]
    torch.nn.init.normal_(encoder.conv_out.weight, std=fan_in**-0.5)


def build_tiny(
    sizes: TinyModelConfig,
    texts: Iterable[str] = (),
    seed: int = 0,
    num_labels: int = 0,
    classifier_dropout: float = 0.0,
) -> tuple[Qwen3ASRForConditionalGeneration | Qwen3ASRForTokenClassification, Qwen3ASRProcessor]:
    """Tokenizer + processor + randomly initialised model (ASR, or the aligner when ``num_labels > 0``)."""
    tokenizer = build_tokenizer(texts, sizes.vocab_size)
    processor = build_processor(tokenizer, aligner=num_labels > 0)
    config = build_config(tokenizer, sizes, num_labels, classifier_dropout)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cls = Qwen3ASRForTokenClassification if num_labels > 0 else Qwen3ASRForConditionalGeneration
        model = cls(config)
        if sizes.init == "he_conv":
            he_init_audio_convs(model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny %s: %s parameters, vocabulary %d", cls.__name__, f"{n_params:,}", len(tokenizer))
    return model, processor
