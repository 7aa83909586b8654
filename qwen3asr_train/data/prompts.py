"""The output format, both ways: prompts and targets (SFT, rollouts, evaluation, the aligner) and the parser
of what the model writes (evaluation and rewards). One module, so the tags are written once.

Why one module: training only transfers to inference when the model sees at training time exactly the
token sequence inference builds. Upstream (``qwen_asr/inference/qwen3_asr.py`` and the ``-hf`` chat
template) renders::

    <|im_start|>system\\n{context}<|im_end|>\\n<|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\\n<|im_start|>assistant\\n

with the system turn always present (empty when there is no context), and the model answers
``language {Name}<asr_text>{text}<|im_end|>`` (``language None<asr_text>`` for no speech). A forced
language is appended to the prompt (``...assistant\\nlanguage English<asr_text>``) and the model then
writes only the text.

Decision: the target ends at ``<|im_end|>``. The ``\\n`` the chat template writes after it is not
trained, because generation stops at ``<|im_end|>`` (an eos id) and never produces it.
"""

from __future__ import annotations

from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_PAD = "<|audio_pad|>"
ASR_TEXT = "<asr_text>"
TIMESTAMP = "<timestamp>"

ASR_TEXT_TAG = ASR_TEXT
END_TOKENS: tuple[str, ...] = (IM_END, ENDOFTEXT)
"""Tokens that may close a decoded output (generation stops at either)."""
MALFORMED = "<malformed>"
"""Predicted-language label of an output that failed to parse (used in LID confusions)."""

SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, AUDIO_START, AUDIO_END, AUDIO_PAD, TIMESTAMP)
"""Special tokens a Qwen3-ASR tokenizer must carry (``<asr_text>`` is a normal added token: it must survive
``skip_special_tokens=True`` so the language prefix can be parsed)."""

AUDIO_SLOT = AUDIO_START + AUDIO_PAD + AUDIO_END
"""One audio item in a prompt; the single ``<|audio_pad|>`` is expanded to the audio's token count."""


def asr_prompt(context: str = "", forced_language: str | None = None) -> str:
    """The ASR prompt up to where the model starts writing (see the module docstring)."""
    prompt = f"{IM_START}system\n{context}{IM_END}\n{IM_START}user\n{AUDIO_SLOT}{IM_END}\n{IM_START}assistant\n"
    if forced_language is not None:
        prompt += language_prefix(forced_language)
    return prompt


def language_prefix(language: str | None) -> str:
    """``language {Name}<asr_text>``; ``None`` gives the no-speech prefix ``language None<asr_text>``."""
    return f"language {language if language is not None else 'None'}{ASR_TEXT}"


def asr_target(language: str | None, text: str, forced_language: bool = False) -> str:
    """What the model must write after :func:`asr_prompt`: prefix (unless forced) + text + ``<|im_end|>``."""
    body = text if forced_language else language_prefix(language) + text
    return body + IM_END


def aligner_input(words: list[str], slotted: list[bool] | None = None) -> str:
    """Forced-aligner input: audio slot, then each word followed by its start and end ``<timestamp>`` slots.

    Upstream joins words without spaces and puts ``<timestamp><timestamp>`` after every word; with
    ``slotted`` only the marked words get their two slots (dynamic slot insertion in training).
    """
    if slotted is None:
        slotted = [True] * len(words)
    if len(slotted) != len(words):
        raise ValueError(f"slotted has {len(slotted)} entries for {len(words)} words")
    return AUDIO_SLOT + "".join(w + (TIMESTAMP * 2 if s else "") for w, s in zip(words, slotted, strict=True))


# A chat template that renders exactly :func:`asr_prompt` (+ an optional assistant turn wrapped in
# {% generation %} so ``return_assistant_tokens_mask`` works), for processors we build or export.
ASR_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', audio='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = ns.system + message.content -%}{%- endif -%}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if message.role == 'system' and part.type == 'text' -%}{%- set ns.system = ns.system + part.text -%}"
    "{%- elif part.type == 'audio' or 'audio' in part or 'audio_url' in part -%}"
    "{%- set ns.audio = ns.audio + '" + AUDIO_SLOT + "' -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '" + IM_START + "system\\n' + ns.system + '" + IM_END + "\\n' -}}"
    "{{- '" + IM_START + "user\\n' + ns.audio + '" + IM_END + "\\n' -}}"
    "{%- for message in messages if message.role == 'assistant' -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- if message.content is string -%}{%- set text.value = message.content -%}"
    "{%- else -%}{%- for part in message.content if part.type == 'text' -%}"
    "{%- set text.value = text.value + part.text -%}{%- endfor -%}{%- endif -%}"
    "{{- '" + IM_START + "assistant\\n' -}}"
    "{% generation %}{{- text.value + '" + IM_END + "\\n' -}}{% endgeneration %}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
)


# Renders exactly :func:`aligner_input` with every word slotted from the messages
# ``[{"role": "user", "content": [{"type": "audio", ...}, {"type": "text", "text": word}, ...]}]`` that the
# transformers processor's ``prepare_forced_aligner_inputs`` builds, so exported aligners decode with it.
ALIGNER_CHAT_TEMPLATE = (
    "{%- set ns = namespace(audio='', words=[]) -%}"
    "{%- for message in messages -%}{%- if message.content is not string -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'audio' or 'audio' in part or 'audio_url' in part -%}"
    "{%- set ns.audio = ns.audio + '" + AUDIO_SLOT + "' -%}"
    "{%- elif part.type == 'text' -%}{%- set ns.words = ns.words + [part.text] -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{{- ns.audio -}}"
    "{%- for word in ns.words -%}{{- word + '" + TIMESTAMP + TIMESTAMP + "' -}}{%- endfor -%}"
)


# ------------------------------------------------------------------------------------------ parsing
_NO_SPEECH = "None"
"""The language name of a no-speech answer (``language None<asr_text>``)."""


@dataclass(frozen=True)
class ParsedOutput:
    """A decoded model output split into language and text (text is raw: loops are kept).

    Attributes:
        language: the language the model wrote (or the forced one); ``None`` for no speech or malformed.
        text: the transcript, or the whole output when ``format_ok`` is False.
        no_speech: the model wrote ``language None``.
        format_ok: the output had the ``language X<asr_text>`` shape (always True when forced).
        language_forced: the language came from the prompt, so the output says nothing about LID.
    """

    language: str | None
    text: str
    no_speech: bool
    format_ok: bool
    language_forced: bool = False


def strip_end_tokens(raw: str) -> str:
    """Remove trailing ``<|im_end|>``/``<|endoftext|>`` tokens and whitespace (any number, any order)."""
    text = raw.rstrip()
    while True:
        for token in END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                break
        else:
            return text


def parse_asr_output(raw: str, forced_language: str | None = None) -> ParsedOutput:
    """Split ``language X<asr_text>text`` without touching the text.

    * ``language English<asr_text>hi`` -> ``("English", "hi")``.
    * ``language None<asr_text>...`` -> no speech (any text after the tag is kept, so it can be scored
      as a hallucination).
    * With ``forced_language`` (the prompt already ended in ``language X<asr_text>``) the whole output is
      text.
    * Anything else (no ``language `` prefix, no ``<asr_text>`` tag, empty language) is a format error:
      ``format_ok=False``, ``language=None``, ``text`` = the whole output.

    Unlike upstream ``qwen_asr`` parsing, repetitions are never removed: rewards and WER must see loops.
    """
    body = strip_end_tokens(raw)
    if forced_language is not None:
        return ParsedOutput(forced_language, body.strip(), no_speech=False, format_ok=True, language_forced=True)
    head, tag, text = body.partition(ASR_TEXT_TAG)
    language = head[len("language ") :].strip() if head.startswith("language ") else ""
    if not tag or not language or ASR_TEXT_TAG in text:  # a second tag (e.g. a tag loop) is malformed too
        return ParsedOutput(None, body.strip(), no_speech=False, format_ok=False)
    if language == _NO_SPEECH:
        return ParsedOutput(None, text.strip(), no_speech=True, format_ok=True)
    return ParsedOutput(language, text.strip(), no_speech=False, format_ok=True)
