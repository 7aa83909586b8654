"""Prompt and target strings: the single source for SFT, rollouts, evaluation and the aligner.

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

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_PAD = "<|audio_pad|>"
ASR_TEXT = "<asr_text>"
TIMESTAMP = "<timestamp>"

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
