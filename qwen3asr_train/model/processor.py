"""The Qwen3-ASR processor from any file set the models exist in, and the tokenizer-regex check.

Why not ``AutoProcessor.from_pretrained``: the released original-layout repositories and everything
qwen-asr 0.0.6 or the official SFT script writes describe the feature extractor as
``WhisperFeatureExtractor`` in ``preprocessor_config.json`` (no ``processor_config.json``). transformers
5.x then builds a Whisper extractor, which neither pads the mel axis to a multiple of 100 frames nor
returns tensors, and the Qwen3-ASR processor and encoder fail on it. The mel computation of the two
extractors is the same (128 bins, n_fft 400, hop 160, per-utterance log-mel clamp), so we always build
``Qwen3ASRFeatureExtractor`` from whichever description the directory has, check the fields that change
the features, and fail naming the file and key for anything we cannot map.

Tokenizer pre-tokenisation (see docs/layouts.md): transformers 4.57.3-4.x, which qwen-asr pins, swaps a
Mistral pre-tokenizer regex into any tokenizer of more than 100k tokens loaded from a local directory (or
in offline mode) whose ``config.json`` claims a ``transformers_version`` in (4.57.2, 5.0) or none at all,
and qwen-asr asks for the swap (``fix_mistral_regex=True``). transformers 5.x, vLLM and hub-id loads keep
Qwen's own regex, which is what we train with. :func:`regex_divergence` measures what the swap changes on
the training texts, and the builder warns with those numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version
from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers import AutoTokenizer, Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

from qwen3asr_train.data.prompts import AUDIO_END, AUDIO_PAD, AUDIO_START
from qwen3asr_train.model.convert import CheckpointLayoutError

log = logging.getLogger(__name__)

FEATURE_EXTRACTORS = ("Qwen3ASRFeatureExtractor", "WhisperFeatureExtractor")
"""Feature-extractor types whose mel features are the Qwen3-ASR ones (same math, different padding)."""

REQUIRED_FEATURES: dict[str, Any] = {"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400}
"""Fields that define the features the released encoders were trained on; any other value is refused."""

AUDIO_TOKEN_ATTRIBUTES = {"audio_token": AUDIO_PAD, "audio_bos_token": AUDIO_START, "audio_eos_token": AUDIO_END}
"""Tokenizer attributes the processor reads, and the token each must name."""

MISTRAL_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokenizer split pattern transformers 4.57.3-4.x substitutes (``_patch_mistral_regex``)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointLayoutError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointLayoutError(f"{path}: expected a JSON object")
    return data


def feature_extractor_fields(directory: Path) -> tuple[Path, dict[str, Any]]:
    """Where the directory describes its feature extractor, and the description.

    transformers 5.x nests it under ``feature_extractor`` in ``processor_config.json``; 4.57 and the released
    repositories write ``preprocessor_config.json``.
    """
    processor_config = directory / "processor_config.json"
    if processor_config.is_file():
        nested = _read_json(processor_config).get("feature_extractor")
        if isinstance(nested, dict):
            return processor_config, nested
    preprocessor = directory / "preprocessor_config.json"
    if preprocessor.is_file():
        return preprocessor, _read_json(preprocessor)
    raise CheckpointLayoutError(
        f"{directory}: no preprocessor_config.json (and no feature_extractor in processor_config.json): "
        f"cannot tell how this checkpoint computes its audio features"
    )


def build_feature_extractor(directory: Path, n_window: int) -> Qwen3ASRFeatureExtractor:
    """``Qwen3ASRFeatureExtractor`` from a Qwen3-ASR or Whisper description (module docstring).

    ``n_window`` comes from the model's audio config: the extractor pads the mel axis to ``2 * n_window``
    frames, which is what the encoder requires.
    """
    path, fields = feature_extractor_fields(directory)
    kind = fields.get("feature_extractor_type")
    if kind not in FEATURE_EXTRACTORS:
        raise CheckpointLayoutError(
            f"{path}: feature_extractor_type={kind!r} is not one of {list(FEATURE_EXTRACTORS)}; "
            f"Qwen3-ASR needs 128-bin Whisper-style log-mel features"
        )
    for key, expected in REQUIRED_FEATURES.items():
        if key not in fields:
            raise CheckpointLayoutError(f"{path}: missing key {key!r} (expected {expected})")
        if fields[key] != expected:
            raise CheckpointLayoutError(f"{path}: {key}={fields[key]!r}, but Qwen3-ASR models expect {expected}")
    stored_window = fields.get("n_window")
    if stored_window is not None and int(stored_window) != n_window:
        raise CheckpointLayoutError(
            f"{path}: n_window={stored_window} but the model's audio_config.n_window is {n_window}; the mel axis "
            f"would not be padded to what the encoder requires"
        )
    return Qwen3ASRFeatureExtractor(
        feature_size=fields["feature_size"],
        sampling_rate=fields["sampling_rate"],
        hop_length=fields["hop_length"],
        n_fft=fields["n_fft"],
        chunk_length=fields.get("chunk_length", 30),
        padding_value=fields.get("padding_value", 0.0),
        dither=fields.get("dither", 0.0),
        n_window=n_window,
    )


def read_chat_template(directory: Path) -> str | None:
    """``chat_template.jinja`` (transformers 5.x), ``chat_template.json`` (released repositories), or None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        template = _read_json(as_json).get("chat_template")
        if not isinstance(template, str):
            raise CheckpointLayoutError(f"{as_json}: key 'chat_template' missing or not a string")
        return template
    return None


def load_tokenizer(directory: Path) -> Any:
    """The checkpoint's tokenizer with the audio-token attributes the processor needs.

    4.57-era files declare them under ``extra_special_tokens``; transformers 5.x reads both spellings. A
    tokenizer that lacks the attributes but has the tokens gets them set; one without the tokens is refused
    (:func:`check_token_ids` then checks the ids against the model config).
    """
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file() and not (directory / "tokenizer.json").is_file():
        raise CheckpointLayoutError(f"{directory}: no tokenizer_config.json or tokenizer.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointLayoutError(
            f"{config_path}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from exc
    vocab = tokenizer.get_vocab()
    for attribute, token in AUDIO_TOKEN_ATTRIBUTES.items():
        value = getattr(tokenizer, attribute, None)
        if value is None:
            if token not in vocab:
                raise CheckpointLayoutError(
                    f"{config_path}: key extra_special_tokens.{attribute} is missing and the vocabulary has no "
                    f"{token!r} token"
                )
            setattr(tokenizer, attribute, token)
            log.info("%s: %s not declared; using %s from the vocabulary", config_path, attribute, token)
    return tokenizer


def load_processor(directory: Path, model_config: Mapping[str, Any]) -> Qwen3ASRProcessor:
    """The Qwen3-ASR processor of a checkpoint directory in any layout (module docstring).

    ``model_config`` is the directory's ``config.json`` (native or original); it supplies ``n_window`` and,
    for aligners, ``timestamp_segment_time``.
    """
    audio = model_config.get("audio_config") or (model_config.get("thinker_config") or {}).get("audio_config") or {}
    if "n_window" not in audio:
        raise CheckpointLayoutError(f"{directory / 'config.json'}: audio_config has no key 'n_window'")
    tokenizer = load_tokenizer(directory)
    check_token_ids(directory, model_config, tokenizer)
    processor = Qwen3ASRProcessor(
        feature_extractor=build_feature_extractor(directory, int(audio["n_window"])),
        tokenizer=tokenizer,
        chat_template=read_chat_template(directory),
        timestamp_segment_time=model_config.get("timestamp_segment_time", 80),
    )
    return processor


def check_token_ids(directory: Path, model_config: Mapping[str, Any], tokenizer: Any) -> None:
    """The tokenizer must fit the model: every id inside the embedding table, the audio placeholder the config's.

    Why: transformers 5.x silently *appends* a declared special token that the vocabulary lacks, giving it an
    id past the model's embeddings; a mismatched ``audio_token_id`` would scatter audio into the wrong slots.
    """
    thinker = model_config.get("thinker_config") or {}
    text = model_config.get("text_config") or thinker.get("text_config") or {}
    vocab_size = text.get("vocab_size")
    audio_token_id = model_config.get("audio_token_id", thinker.get("audio_token_id"))
    tok_config = directory / "tokenizer_config.json"
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise CheckpointLayoutError(
            f"{tok_config}: the tokenizer has {len(tokenizer)} tokens but config.json's text_config.vocab_size is "
            f"{vocab_size} (a declared special token missing from the vocabulary is appended past the embeddings)"
        )
    got = tokenizer.convert_tokens_to_ids(tokenizer.audio_token)
    if audio_token_id is not None and got != audio_token_id:
        raise CheckpointLayoutError(
            f"{tok_config}: audio_token={tokenizer.audio_token!r} has id {got}, but config.json's audio_token_id is "
            f"{audio_token_id}"
        )


def mistral_regex_applies(model_config: Mapping[str, Any], vocab_size: int) -> bool:
    """Whether qwen-asr 0.0.6 (transformers 4.57.6) would swap in the Mistral regex loading this directory locally.

    Mirrors the conditions of 4.57.6 ``_patch_mistral_regex`` with ``fix_mistral_regex=True``: base vocabulary
    over 100k, and a ``transformers_version`` that is missing or in (4.57.2, 5.0).
    """
    if vocab_size <= 100_000:
        return False
    raw = model_config.get("transformers_version")
    if not raw:
        return True
    try:
        version = Version(str(raw))
    except InvalidVersion:
        return True
    return Version("4.57.2") < version < Version("5.0.0")


def with_mistral_regex(tokenizer: Any) -> Tokenizer:
    """A copy of the fast tokenizer's backend with the Mistral split pattern, as 4.57.6 builds it."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer[0] = pre_tokenizers.Split(pattern=Regex(MISTRAL_REGEX), behavior="isolated")
    return backend


def regex_divergence(tokenizer: Any, texts: Iterable[str]) -> tuple[int, int]:
    """``(texts tokenised differently under the Mistral regex, texts)``."""
    swapped = with_mistral_regex(tokenizer)
    plain = tokenizer.backend_tokenizer
    differ = total = 0
    for text in texts:
        total += 1
        if plain.encode(text, add_special_tokens=False).ids != swapped.encode(text, add_special_tokens=False).ids:
            differ += 1
    return differ, total


def warn_on_regex_mismatch(directory: Path, model_config: Mapping[str, Any], tokenizer: Any, texts: list[str]) -> None:
    """Log a warning, with numbers, when qwen-asr would tokenise this checkpoint differently from training."""
    if not mistral_regex_applies(model_config, int(tokenizer.vocab_size)):
        return
    differ, total = regex_divergence(tokenizer, texts[:5000]) if texts else (0, 0)
    log.warning(
        "%s: config.json says transformers_version=%r. qwen-asr 0.0.6 loading this directory from a local path "
        "tokenises with a Mistral pre-tokenizer regex (transformers 4.57 fix_mistral_regex), while we train with "
        "Qwen's own regex (transformers 5.x, vLLM, hub-id loads). On the training texts %d of %d differ (e.g. "
        "camel-case and capitalised words). Our exports write transformers_version 5.x, so qwen-asr loads them "
        "with the regex used in training. See docs/layouts.md.",
        directory,
        model_config.get("transformers_version"),
        differ,
        total,
    )
