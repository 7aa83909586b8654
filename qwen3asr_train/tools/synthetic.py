"""Offline synthetic multilingual speech with exact word times (espeak-ng), plus a tone corpus for tests.

Why this exists: no speech corpus can be downloaded on our machines, yet every stage (ASR SFT, the
forced aligner, no-speech handling) needs audio whose transcript *and word times* are known. espeak-ng
(Debian package ``espeak-ng``) synthesises real speech in all the languages we demo and reports the exact
output sample at which every word starts, so word times here are ground truth for the audio actually
written, not an alignment guess.

How a clip is made (see :func:`render_clip`):

* A sentence is a random sequence of words from a small built-in vocabulary (Mandarin: hanzi paired with
  tone-numbered pinyin, because espeak 1.51 reads hanzi badly; one word event per syllable = per character).
* espeak synthesises it synchronously at 22,050 Hz through its C API (ctypes); WORD events give each
  word's start sample. A sentence is rejected and redrawn when espeak switched language (a ``(xx)`` phoneme),
  when the word events do not match the words one to one, or when a word is silent.
* Word times follow the *audible sound* convention: a word spans from the first to the last audible
  frame (frame RMS above ``-50 dB`` re the clip's loudest frame) between its own event and the next
  word's event. This puts stop closures and inter-word pauses outside words (espeak's event marks the
  closure, 30-60 ms before the burst, and comes *before* a ``word_gap`` pause); the audio before/after the first/last word is cut and replaced by a
  random pad of digital silence (or noise).
* The 22,050 Hz audio is resampled to 16 kHz with a Kaiser-windowed sinc (:func:`resample`); times are
  computed in seconds from the 22,050 Hz sample indices, so resampling cannot shift them.

Randomness comes from one seed: each clip draws words, voice variant, speed, pitch, word gap, pad, gain
and noise from ``SeedSequence([seed, split, index])``, so texts, ids and settings are identical for any
``workers`` count (the audio itself only for the same count; see below).

Generalisation splits (optional, all off by default; a corpus made without them is exactly what this module
made before they existed). ``unseen_voices`` reserves voices (``en``) and/or voice variants (``+f5``) and
``unseen_rate_wpm`` reserves speaking-rate ranges outside ``rate_wpm``: train and test never use them, and a
third split ``test_unseen`` (``num_unseen`` clips) uses only them, so its error rate measures how a model
does on voices and speaking rates it never heard. ``cased`` writes sentence-case transcripts with
punctuation (commas, ``.``/``?``/``!``), which espeak also reads (pauses, question intonation); the word
rows keep the case but not the punctuation, as the aligner's word units do. Rows of such corpora also carry
``synthesis`` (voice, rate, pitch, word gap), so a split's settings can be checked from its manifest.

Custom vocabularies (also off by default): ``vocabulary`` replaces the built-in word list of a one-language
corpus with the caller's words (e.g. general words plus a domain's terms, which a model trained on the built-in
list never saw), and ``context`` is written as every speech row's ``context`` (the system-turn text SFT and the
evaluation put in the prompt, e.g. the domain's hot words). espeak's own output depends on the calls made before in the same process (lengths
differ by tens, sometimes hundreds of samples; durations by up to ~30 ms), so audio differs between worker
counts; for one ``workers`` count it is bit-identical from run to run (each worker renders one fixed,
contiguous shard in a fresh process). Word times are always measured on the audio that is written.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import multiprocessing as mp
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from qwen3asr_train.languages import LANGUAGE_CODE_TO_NAME, NO_SPEECH

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050
GENERATOR_VERSION = 1
"""Bumped whenever the output of a given config changes, so cached corpora are regenerated."""

# fmt: off
_EN = """apple baby ball bird black blue boat book bread bright brown car cat chair child city clean cloud
cold dark day dog door dream drink eat fast fish flower friend garden girl give good green happy hat horse
house jump king lamp light little milk moon morning mother music night ocean old open orange paper party
pencil quiet rain river road run sleep small snow soft song star stone summer sun table tall tree walk
warm water white window winter yellow young"""
_FR = """chat chien maison pomme rouge bleu vert petit grand soleil lune arbre fleur livre porte fenêtre voiture
ville jardin oiseau pain lait eau nuit jour matin soir mer montagne rivière enfant ami femme homme musique
chanson manger dormir courir chanter heureux froid chaud"""
_DE = """Hund Katze Haus Baum Blume Buch Tisch Stuhl Fenster Garten Sonne Mond Stern Wasser Milch Brot Apfel rot
blau grün klein groß schnell langsam Stadt Straße Kind Freund Mutter Vater Morgen Abend Nacht Sommer Regen
Schnee singen laufen schlafen essen trinken"""
_ES = """perro gato casa árbol flor libro mesa silla ventana jardín sol luna estrella agua leche pan manzana rojo
azul verde pequeño grande rápido lento ciudad calle niño amigo madre padre mañana noche invierno verano
lluvia nieve música cantar correr dormir comer beber"""
_IT = """cane gatto casa albero fiore libro tavolo sedia finestra giardino sole luna stella acqua latte pane mela
rosso azzurro verde piccolo grande veloce lento città strada bambino amico madre padre mattina notte
inverno estate pioggia neve musica cantare correre dormire mangiare bere"""
_PT = """cachorro gato casa árvore flor livro mesa cadeira janela jardim sol lua estrela água leite pão maçã
vermelho azul verde pequeno grande rápido devagar cidade rua criança amigo mãe pai manhã noite inverno verão
chuva neve música cantar correr dormir comer beber"""
_RU = """собака кошка дом дерево цветок книга стол стул окно сад солнце луна звезда вода молоко хлеб яблоко
красный синий зелёный маленький большой быстро медленно город улица ребёнок друг мать отец утро ночь зима
лето дождь снег музыка петь бежать спать пить"""
_ZH = """我:wo3 你:ni3 他:ta1 我们:wo3,men5 猫:mao1 狗:gou3 鱼:yu2 鸟:niao3 花:hua1 树:shu4 山:shan1 水:shui3
火:huo3 天:tian1 月亮:yue4,liang4 太阳:tai4,yang2 星星:xing1,xing5 苹果:ping2,guo3 米饭:mi3,fan4
面包:mian4,bao1 牛奶:niu2,nai3 茶:cha2 红:hong2 白:bai2 黑:hei1 大:da4 小:xiao3 好:hao3 快:kuai4 慢:man4
吃:chi1 喝:he1 看:kan4 听:ting1 说:shuo1 走:zou3 跑:pao3 睡觉:shui4,jiao4 喜欢:xi3,huan1 朋友:peng2,you5
老师:lao3,shi1 学生:xue2,sheng1 书:shu1 学校:xue2,xiao4 城市:cheng2,shi4 今天:jin1,tian1 明天:ming2,tian1
早上:zao3,shang5 晚上:wan3,shang5 音乐:yin1,yue4 唱歌:chang4,ge1 门:men2 车:che1 家:jia1"""
# fmt: on


def _plain(words: str) -> tuple[tuple[str, str], ...]:
    return tuple((w, w) for w in words.split())


VOCABULARIES: dict[str, tuple[tuple[str, str], ...]] = {
    "en": _plain(_EN),
    "fr": _plain(_FR),
    "de": _plain(_DE),
    "es": _plain(_ES),
    "it": _plain(_IT),
    "pt": _plain(_PT),
    "ru": _plain(_RU),
    "zh": tuple((h, p.replace(",", " ")) for h, p in (e.split(":") for e in _ZH.split())),
}
"""ISO code -> ``(written word, what espeak is given)``; for Chinese the spoken form is one pinyin syllable
per character, so each character gets its own word event and becomes one word unit in the manifest."""

CHARACTER_LANGUAGES = frozenset({"zh"})
"""Languages written without spaces whose word units are single characters."""

VOICES: dict[str, tuple[str, ...]] = {
    "en": ("en-us", "en"),
    "fr": ("fr",),
    "de": ("de",),
    "es": ("es", "es-419"),
    "it": ("it",),
    "pt": ("pt-br", "pt"),
    "ru": ("ru",),
    "zh": ("cmn-latn-pinyin",),
}
"""espeak voice *file ids* (the C API rejects names such as ``fr-fr`` or ``zh``)."""

VARIANTS: tuple[str, ...] = ("",) + tuple(f"+m{i}" for i in range(1, 8)) + tuple(f"+f{i}" for i in range(1, 6))
"""Variant files that exist in espeak-ng-data (an unknown variant is accepted silently, so no others)."""

RATE_WPM = (130, 210)
"""Speaking-rate range in words per minute, half-open ``[low, high)`` as numpy draws it."""
PITCH = (30, 70)
WORD_GAP_10MS = (1, 15)
"""Inter-word pause in espeak units of 10 ms, used for half of the clips (the other half: no pause)."""
PAD_S = (0.1, 0.5)
PEAK_DBFS = (-9.0, -1.0)
_FRAME = 32  # 1.45 ms at 22,050 Hz: the resolution of the audible-sound trimming
_AUDIBLE_DB = -50.0
_MIN_WORD_S = 0.02


class EspeakUnavailableError(RuntimeError):
    """``libespeak-ng.so.1`` could not be loaded or initialised."""


class CorpusConfigError(ValueError):
    """Corpus options that contradict each other (held-out settings that training would use, or that leave a
    split nothing to draw from); raised before any audio is written."""


class _EspeakEvent(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _Id),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent))
_EV_WORD, _EV_PHONEME = 1, 7
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7


@dataclass
class Synthesis:
    """One espeak call: int16 audio at 22,050 Hz, word events and whether espeak switched language."""

    audio: np.ndarray
    word_samples: list[int]
    word_positions: list[int]
    switched_language: bool


class Espeak:
    """Process-wide espeak-ng handle (synchronous mode, word and phoneme events).

    Why a singleton: espeak keeps global state, and a second ``espeak_Terminate`` in one process hangs, so
    the library is initialised once per process and never terminated. Use :meth:`get`.
    """

    _instance: Espeak | None = None

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libespeak-ng.so.1")
        except OSError as exc:
            raise EspeakUnavailableError(
                "cannot load libespeak-ng.so.1; install espeak-ng (apt-get install -y espeak-ng libespeak-ng1)"
            ) from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Info.restype = ctypes.c_char_p
        # AUDIO_OUTPUT_SYNCHRONOUS = 2, options = espeakINITIALIZE_PHONEME_EVENTS
        rate = lib.espeak_Initialize(2, 0, None, 1)
        if rate != ESPEAK_RATE:
            raise EspeakUnavailableError(f"espeak_Initialize failed ({rate}); is espeak-ng-data installed?")
        self.version: str = lib.espeak_Info(None).decode()
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, bytes]] = []
        self._callback = _CALLBACK(self._on_synth)  # keep a reference: espeak calls it later
        lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _on_synth(self, wav: Any, n: int, events: Any) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
            e = events[i]
            name = bytes(e.id.string).split(b"\0")[0] if e.type == _EV_PHONEME else b""
            self._events.append((e.type, e.text_position, e.length, e.sample, name))
            i += 1
        return 0

    def synthesize(self, text: str, voice: str, *, rate: int = 175, pitch: int = 50, word_gap: int = 0) -> Synthesis:
        """Synthesise ``text`` with every parameter set explicitly (espeak keeps them across voice changes)."""
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak voice {voice!r} not found (the C API wants voice file ids such as 'en-us')")
        for param, value in (
            (_PARAM_RATE, rate),
            (_PARAM_VOLUME, 100),
            (_PARAM_PITCH, pitch),
            (_PARAM_RANGE, 50),
            (_PARAM_WORDGAP, word_gap),
        ):
            lib.espeak_SetParameter(param, value, 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8")
        # position 0, POS_CHARACTER=1, end 0, espeakCHARS_UTF8=1
        if lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed for {text!r}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        # a zero-length word event (position 0) sometimes appears near the end of long sentences: ignore it
        words = [(pos, sample) for kind, pos, length, sample, _ in self._events if kind == _EV_WORD and length > 0]
        switched = any(name.startswith(b"(") for kind, *_, name in self._events if kind == _EV_PHONEME)
        return Synthesis(audio, [s for _, s in words], [p for p, _ in words], switched)


def espeak_available() -> bool:
    """True when espeak-ng can be loaded and initialised in this process."""
    try:
        Espeak.get()
    except EspeakUnavailableError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _sinc_kernel(orig: int, new: int, zero_crossings: int = 64) -> tuple[np.ndarray, int, int, int]:
    """Polyphase Kaiser-windowed sinc kernel, the formulation of ``torchaudio.functional.resample`` with
    librosa's ``kaiser_best`` settings (rolloff 0.9476, beta 14.77); returns ``(taps x phases, pad, orig, new)``."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    rolloff, beta = 0.9475937167399596, 14.769656459379492
    base = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / base)
    t = (np.arange(0, -new, -1)[:, None] / new + np.arange(-width, width + orig)[None, :] / orig) * base
    t = np.clip(t, -zero_crossings, zero_crossings)
    window = np.i0(beta * np.sqrt(1 - (t / zero_crossings) ** 2)) / np.i0(beta)
    return (np.sinc(t) * window * base / orig).T.astype(np.float32), width, orig, new


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Band-limited resampling in numpy (matches torchaudio to ~1e-6).

    Why not torchaudio: importing torch costs each worker ~1.3 s and 500 MB, and its oneDNN convolution
    caches one primitive per input length (~2.5 MB each, up to 1024) so a process grows by gigabytes over a
    corpus. ``einsum`` without BLAS also stays on one thread, which matters with one worker per core.
    """
    kernel, width, orig, new = _sinc_kernel(orig, new)
    padded = np.pad(np.asarray(x, np.float32), (width, width + orig))
    frames = sliding_window_view(padded, kernel.shape[0])[::orig]  # one input window per block of `new` outputs
    y = np.einsum("tk,kn->tn", frames, kernel, optimize=False).ravel()
    return y[: math.ceil(new * x.size / orig)]


def _noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """Unit-RMS white, pink (1/f) or brown (1/f^2) noise, shaped in the frequency domain."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.arange(spec.size), 1.0)
    spec *= {"white": 1.0, "pink": f**-0.5, "brown": 1.0 / f}[color]
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _frame_rms(audio: np.ndarray) -> np.ndarray:
    n = -(-audio.size // _FRAME) * _FRAME
    frames = np.pad(audio.astype(np.float64), (0, n - audio.size)).reshape(-1, _FRAME)
    return np.sqrt(np.mean(frames**2, axis=1))


def word_spans(audio: np.ndarray, starts: list[int]) -> list[tuple[int, int]] | None:
    """Audible ``[start, end)`` sample span of each word, or ``None`` when some word has no audible frame.

    Word ``i`` owns the samples from its event to the next word's event (the last word: to the end); its
    span is that interval trimmed to the first and last frame whose RMS is within 50 dB of the loudest frame
    of the clip. espeak writes digital silence in pauses and closures, so this is about 1 ms from sound.
    """
    threshold = _frame_rms(audio).max(initial=0.0) * 10 ** (_AUDIBLE_DB / 20)
    spans = []
    for i, a in enumerate(starts):
        b = starts[i + 1] if i + 1 < len(starts) else audio.size
        idx = np.flatnonzero(_frame_rms(audio[a:b]) > threshold)
        if idx.size == 0:
            return None
        s, e = a + idx[0] * _FRAME, min(b, a + (idx[-1] + 1) * _FRAME)
        if e - s < _MIN_WORD_S * ESPEAK_RATE:
            return None
        spans.append((s, e))
    return spans


@dataclass(frozen=True)
class CorpusConfig:
    """Everything that determines a corpus's content; stored in ``corpus_config.json`` for idempotence."""

    languages: tuple[str, ...]
    num_train: int
    num_test: int
    seed: int
    words_per_clip: tuple[int, int]
    num_no_speech: int
    noise_snr_db: tuple[float, float] | None
    vocabulary_size: int = 0
    """Use only the first N words of each vocabulary (0 = all): a smaller task for quick demos."""
    version: int = GENERATOR_VERSION
    rate_wpm: tuple[int, int] = RATE_WPM
    """Speaking rates of train and test, ``[low, high)`` words per minute."""
    num_unseen: int = 0
    """Clips in ``test_unseen``: voices from ``unseen_voices`` and/or rates from ``unseen_rate_wpm`` only."""
    unseen_voices: tuple[str, ...] = ()
    """Voice ids (``en``) or variants (``+f5``) used only by ``test_unseen``, never by train and test."""
    unseen_rate_wpm: tuple[tuple[int, int], ...] = ()
    """Rate ranges ``[low, high)`` used only by ``test_unseen``; each must lie outside ``rate_wpm``."""
    cased: bool = False
    """Sentence-case transcripts with punctuation (read by espeak too); word rows keep case, drop punctuation."""
    vocabulary: tuple[str, ...] = ()
    """Words drawn instead of the built-in vocabulary (one language, written with spaces); ``vocabulary_size``
    still takes the first N. Each word is written and spoken as given, so it must be letters only."""
    context: str = ""
    """Written as ``context`` into every speech row (the system turn of the prompt); empty: no such field."""

    @property
    def extended(self) -> bool:
        """True when an option added after version 1 is in use (rows then carry ``synthesis``)."""
        return any(getattr(self, name) != default for name, default in _EXTENDED_DEFAULTS.items())

    def record(self) -> dict[str, Any]:
        """The JSON record of ``corpus_config.json``. Options at their defaults are left out, so a corpus
        written before they existed is recognised as up to date (and left alone) by :func:`make_corpus`."""
        record = json.loads(json.dumps(asdict(self)))
        for name, default in _EXTENDED_DEFAULTS.items():
            if getattr(self, name) == default:
                del record[name]
        return record

    def validate(self) -> None:
        """Refuse held-out settings that would leak into training or leave a split nothing to draw from."""
        low, high = self.rate_wpm
        if not 0 < low < high:
            raise CorpusConfigError(f"rate_wpm must be [low, high) with 0 < low < high, got {self.rate_wpm}")
        for r_low, r_high in self.unseen_rate_wpm:
            if not 0 < r_low < r_high:
                raise CorpusConfigError(f"unseen rate range [{r_low}, {r_high}) must have 0 < low < high")
            if r_low < high and low < r_high:
                raise CorpusConfigError(
                    f"unseen rate range [{r_low}, {r_high}) overlaps the training rates [{low}, {high})"
                )
        for entry in self.unseen_voices:
            known = entry in VARIANTS or any(entry in VOICES[lang] for lang in self.languages)
            if not known or entry == "":
                raise CorpusConfigError(
                    f"unseen voice {entry!r} is neither a variant ({', '.join(VARIANTS[1:])}) nor a voice of "
                    f"{list(self.languages)} ({ {lang: VOICES[lang] for lang in self.languages} })"
                )
        if self.vocabulary:
            if len(self.languages) != 1 or self.languages[0] in CHARACTER_LANGUAGES:
                raise CorpusConfigError(
                    f"vocabulary needs exactly one language written with spaces, got {list(self.languages)}"
                )
            for word in self.vocabulary:
                if not word.isalpha():
                    raise CorpusConfigError(
                        f"vocabulary word {word!r} must be letters only (it is written and spoken as given)"
                    )
            repeated = sorted(w for w, n in Counter(self.vocabulary).items() if n > 1)
            if repeated:
                raise CorpusConfigError(f"vocabulary lists {repeated} more than once")
        if self.num_unseen and not (self.unseen_voices or self.unseen_rate_wpm):
            raise CorpusConfigError("num_unseen > 0 needs unseen_voices and/or unseen_rate_wpm (else it is just test)")
        for lang in self.languages:
            if not _voice_combinations(lang, self, unseen=False):
                raise CorpusConfigError(f"unseen_voices {self.unseen_voices} leave no {lang} voice for train/test")
            if self.num_unseen and self.unseen_voices and not _voice_combinations(lang, self, unseen=True):
                raise CorpusConfigError(f"unseen_voices {self.unseen_voices} name no {lang} voice for test_unseen")


_EXTENDED_DEFAULTS: dict[str, Any] = {
    "rate_wpm": RATE_WPM,
    "num_unseen": 0,
    "unseen_voices": (),
    "unseen_rate_wpm": (),
    "cased": False,
    "vocabulary": (),
    "context": "",
}


def _voice_combinations(lang: str, cfg: CorpusConfig, *, unseen: bool) -> list[str]:
    """Voice + variant strings of train/test (``unseen=False``) or of ``test_unseen``: a combination is
    held out when its voice or its variant is in ``cfg.unseen_voices``."""
    held = set(cfg.unseen_voices)
    return [
        voice + variant
        for voice in VOICES[lang]
        for variant in VARIANTS
        if ((voice in held) or (variant in held)) == unseen
    ]


def _draw_rate(rng: np.random.Generator, ranges: tuple[tuple[int, int], ...]) -> int:
    """A rate drawn uniformly over the union of half-open ``ranges`` (one draw, like ``rng.integers``)."""
    k = int(rng.integers(sum(high - low for low, high in ranges)))
    for low, high in ranges:
        if k < high - low:
            return low + k
        k -= high - low
    raise AssertionError("unreachable")


def _punctuate(
    rng: np.random.Generator, lang: str, units: list[str], tokens: list[str]
) -> tuple[list[str], list[str], str]:
    """Sentence case and punctuation: ``(units, spoken tokens, written text)``.

    The first letter is upper-cased (word rows keep it), a comma follows a word with probability 0.15 and the
    sentence ends in ``.``, ``?`` or ``!`` (0.6 / 0.25 / 0.15). espeak reads the punctuated tokens, so
    commas are pauses and questions rise, as in the audio a cased transcript would describe. Languages
    written in characters get only the end mark: their tokens are syllables, and a comma could split a word.
    """
    character = lang in CHARACTER_LANGUAGES
    commas = [bool(rng.random() < 0.15) and not character for _ in tokens[:-1]] + [False]
    end = (".", "?", "!")[int(rng.choice(3, p=(0.6, 0.25, 0.15)))]
    if not character:
        units = [units[0][:1].upper() + units[0][1:], *units[1:]]
        tokens = [units[0], *tokens[1:]]
    spoken = [t + ("," if c else "") for t, c in zip(tokens, commas, strict=True)]
    spoken[-1] += end
    if character:  # one spoken token per unit: punctuation after a unit, full-width as written Chinese has it
        marks = {",": "，", ".": "。", "?": "？", "!": "！"}
        text = "".join(u + (marks[","] if c else "") for u, c in zip(units, commas, strict=True)) + marks[end]
    else:
        text = " ".join(spoken)
    return units, spoken, text


def _draw_sentence(
    rng: np.random.Generator,
    lang: str,
    n_units: int,
    vocabulary_size: int = 0,
    vocabulary: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """Random word sequence with ``n_units`` word units: ``(units, spoken tokens)``, one token per unit.

    ``vocabulary``: the caller's words instead of ``VOCABULARIES[lang]`` (drawn the same way)."""
    words = _plain(" ".join(vocabulary)) if vocabulary else VOCABULARIES[lang]
    vocab = words[:vocabulary_size] if vocabulary_size > 0 else words
    units: list[str] = []
    tokens: list[str] = []
    while len(units) < n_units:
        fits = [w for w in vocab if len(w[1].split()) <= n_units - len(units)]
        written, spoken = fits[rng.integers(len(fits))]
        units += list(written) if lang in CHARACTER_LANGUAGES else [written]
        tokens += spoken.split()
    return units, tokens


def render_clip(
    lang: str, rng: np.random.Generator, cfg: CorpusConfig, *, unseen: bool = False
) -> tuple[np.ndarray, str, list[dict], Counter, dict[str, Any]]:
    """Synthesise one clip: ``(16 kHz float audio, text, word rows, rejection counts, settings)``.

    Sentences are redrawn (and counted) until espeak reads them in the intended language with one word event
    per word unit and every word audible. ``unseen``: draw from the held-out voices and rates
    (``test_unseen``); otherwise from the rest. ``settings``: the ``voice``, ``rate_wpm``, ``pitch`` and
    ``word_gap_10ms`` espeak was given.
    """
    engine = Espeak.get()
    rejected: Counter = Counter()
    voices = _voice_combinations(lang, cfg, unseen=unseen and bool(cfg.unseen_voices)) if cfg.unseen_voices else []
    rates = cfg.unseen_rate_wpm if unseen and cfg.unseen_rate_wpm else (cfg.rate_wpm,)
    for _ in range(100):
        n_units = int(rng.integers(cfg.words_per_clip[0], cfg.words_per_clip[1] + 1))
        units, tokens = _draw_sentence(rng, lang, n_units, cfg.vocabulary_size, cfg.vocabulary)
        if voices:
            voice = voices[rng.integers(len(voices))]
        else:  # the version-1 draws, kept so that existing corpora stay identical
            voice = VOICES[lang][rng.integers(len(VOICES[lang]))] + VARIANTS[rng.integers(len(VARIANTS))]
        gap = int(rng.integers(WORD_GAP_10MS[0], WORD_GAP_10MS[1] + 1)) if rng.random() < 0.5 else 0
        rate = int(rng.integers(*rates[0])) if len(rates) == 1 else _draw_rate(rng, rates)
        pitch = int(rng.integers(*PITCH))
        if cfg.cased:
            units, tokens, written = _punctuate(rng, lang, units, tokens)
        else:
            written = ("" if lang in CHARACTER_LANGUAGES else " ").join(units)
        text = " ".join(tokens)
        syn = engine.synthesize(text, voice, rate=rate, pitch=pitch, word_gap=gap)
        expected = np.cumsum([0] + [len(t) + 1 for t in tokens[:-1]]) + 1  # 1-based code-point positions
        if syn.switched_language:
            rejected["language_switch"] += 1
        elif syn.word_positions != expected.tolist():
            rejected["word_events"] += 1
        elif (spans := word_spans(syn.audio, syn.word_samples)) is None:
            rejected["silent_word"] += 1
        else:
            break
    else:
        raise RuntimeError(f"could not synthesise a clean {lang} sentence in 100 tries: {dict(rejected)}")
    s0, e0 = spans[0][0], spans[-1][1]
    speech = resample(syn.audio[s0:e0] / 32768.0, ESPEAK_RATE, SAMPLE_RATE)
    speech *= 10 ** (rng.uniform(*PEAK_DBFS) / 20) / (np.abs(speech).max() + 1e-9)
    lead, trail = (int(rng.uniform(*PAD_S) * SAMPLE_RATE) for _ in range(2))
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    if cfg.noise_snr_db is not None:
        snr = rng.uniform(*cfg.noise_snr_db)
        color = ("white", "pink", "brown")[rng.integers(3)]
        audio += _noise(rng, audio.size, color) * np.sqrt(np.mean(speech**2) / 10 ** (snr / 10))
    duration = audio.size / SAMPLE_RATE

    def sec(sample: int) -> float:
        return min(round((sample - s0) / ESPEAK_RATE + lead / SAMPLE_RATE, 3), duration)

    words = [{"word": u, "start": sec(s), "end": sec(e)} for u, (s, e) in zip(units, spans, strict=True)]
    settings = {"voice": voice, "rate_wpm": rate, "pitch": pitch, "word_gap_10ms": gap}
    return np.clip(audio, -1.0, 1.0).astype(np.float32), written, words, rejected, settings


def _clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_KEYS[split], index]))


_SPLIT_KEYS = {"train": 0, "test": 1, "no_speech": 2, "test_unseen": 3}


def _make_speech_rows(jobs: list[tuple[CorpusConfig, str, int, str]]) -> list[tuple[dict, Counter]]:
    """Worker entry point: one shard of clips, in order, in one fresh process (see ``make_corpus``)."""
    return [_make_speech_row(job) for job in jobs]


def _make_speech_row(job: tuple[CorpusConfig, str, int, str]) -> tuple[dict, Counter]:
    """Worker entry point: render and write one clip, return its manifest row and rejection counts."""
    cfg, split, index, wav_dir = job
    lang = cfg.languages[index % len(cfg.languages)]
    audio, text, words, rejected, settings = render_clip(
        lang, _clip_rng(cfg.seed, split, index), cfg, unseen=split == "test_unseen"
    )
    clip_id = f"syn-{split}-{index:06d}-{lang}"
    path = Path(wav_dir) / f"{clip_id}.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    row = {
        "id": clip_id,
        "audio": str(path),
        "text": text,
        "language": LANGUAGE_CODE_TO_NAME[lang],
        "duration": audio.size / SAMPLE_RATE,
        "words": words,
    }
    if cfg.context:
        row["context"] = cfg.context
    if cfg.extended:
        row["synthesis"] = settings
    return row, rejected


def _make_no_speech_row(cfg: CorpusConfig, index: int, wav_dir: Path) -> dict:
    """A no-speech clip: digital silence with faint white noise, or louder colored noise, 1-5 s.

    Rows use ``"language": "None"`` (the model's no-speech tag), ``"text": ""``, no words and
    ``"no_speech": true``.
    """
    rng = _clip_rng(cfg.seed, "no_speech", index)
    n = int(rng.uniform(1.0, 5.0) * SAMPLE_RATE)
    if rng.random() < 0.5:
        audio = _noise(rng, n, "white") * 10 ** (rng.uniform(-70, -50) / 20)
    else:
        audio = _noise(rng, n, ("white", "pink", "brown")[rng.integers(3)]) * 10 ** (rng.uniform(-40, -20) / 20)
    clip_id = f"syn-no_speech-{index:06d}"
    path = wav_dir / f"{clip_id}.wav"
    sf.write(path, np.clip(audio, -1, 1).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return {
        "id": clip_id,
        "audio": str(path),
        "text": "",
        "language": NO_SPEECH,
        "duration": n / SAMPLE_RATE,
        "words": [],
        "no_speech": True,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _language_code(label: str) -> str:
    names = {v.lower(): k for k, v in LANGUAGE_CODE_TO_NAME.items()}
    code = names.get(label.lower(), label.lower())
    if code not in VOCABULARIES:
        raise ValueError(f"no synthetic vocabulary for language {label!r}; choose from {sorted(VOCABULARIES)}")
    return code


def make_corpus(
    out_dir: str | os.PathLike,
    *,
    languages: tuple[str, ...] | list[str] = ("en",),
    num_train: int,
    num_test: int,
    seed: int,
    words_per_clip: tuple[int, int] = (4, 10),
    num_no_speech: int = 0,
    noise_snr_db: float | tuple[float, float] | None = None,
    workers: int = 1,
    vocabulary_size: int = 0,
    rate_wpm: tuple[int, int] = RATE_WPM,
    num_unseen: int = 0,
    unseen_voices: tuple[str, ...] | list[str] = (),
    unseen_rate_wpm: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    cased: bool = False,
    vocabulary: tuple[str, ...] | list[str] = (),
    context: str = "",
) -> dict[str, Path]:
    """Write an espeak-ng corpus under ``out_dir`` and return ``{"train"|"test"|"no_speech"|"test_unseen": manifest}``.

    Clip ``i`` of a split uses ``languages[i % len(languages)]`` (ISO codes or names); ``words_per_clip``
    counts word units (characters for Chinese); ``noise_snr_db`` is a fixed SNR or a ``(low, high)`` range of
    additive white/pink/brown noise. Idempotent: when ``corpus_config.json`` records the same config and the
    manifests exist, nothing is regenerated. ``workers`` > 1 uses spawned processes (each initialises espeak
    once); output order, ids and texts do not depend on it.

    Generalisation options (see the module docstring): ``rate_wpm`` is the ``[low, high)`` rate range of
    train/test; ``unseen_voices`` (voice ids or ``+variant`` names) and ``unseen_rate_wpm`` (ranges outside
    ``rate_wpm``) are kept out of train/test and make up ``test_unseen.jsonl`` (``num_unseen`` clips);
    ``cased`` writes sentence case and punctuation. ``vocabulary`` (one language) draws the caller's words
    instead of the built-in list; ``context`` goes into every speech row. Invalid combinations raise
    :class:`CorpusConfigError` (a ``ValueError``) before any audio is written.
    """
    out = Path(out_dir).resolve()
    snr = None if noise_snr_db is None else tuple(map(float, np.broadcast_to(noise_snr_db, 2)))
    cfg = CorpusConfig(
        tuple(_language_code(lang) for lang in languages),
        num_train,
        num_test,
        seed,
        (int(words_per_clip[0]), int(words_per_clip[1])),
        num_no_speech,
        snr,
        vocabulary_size,
        rate_wpm=(int(rate_wpm[0]), int(rate_wpm[1])),
        num_unseen=num_unseen,
        unseen_voices=tuple(unseen_voices),
        unseen_rate_wpm=tuple((int(low), int(high)) for low, high in unseen_rate_wpm),
        cased=cased,
        vocabulary=tuple(vocabulary),
        context=context,
    )
    cfg.validate()
    manifests = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    if num_no_speech:
        manifests["no_speech"] = out / "no_speech.jsonl"
    if num_unseen:
        manifests["test_unseen"] = out / "test_unseen.jsonl"
    config_path = out / "corpus_config.json"
    record = cfg.record()
    if config_path.exists() and all(p.exists() for p in manifests.values()):
        if json.loads(config_path.read_text()).get("config") == record:
            logger.info("synthetic corpus in %s is up to date", out)
            return manifests
    Espeak.get()  # fail early with the install hint, before spawning workers
    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    config_path.unlink(missing_ok=True)
    for stale in [*wav_dir.glob("syn-*.wav"), out / "no_speech.jsonl", out / "test_unseen.jsonl"]:  # old config
        stale.unlink(missing_ok=True)
    splits = (("train", num_train), ("test", num_test), ("test_unseen", num_unseen))
    jobs = [(cfg, split, i, str(wav_dir)) for split, n in splits for i in range(n)]
    if workers > 1:
        # spawn, not fork: a forked child would inherit this process's espeak state mid-use. One contiguous
        # shard per worker, each in a fresh process (max_tasks_per_child=1): espeak's output depends on the
        # calls made before in the same process, so a pool handing chunks to whichever process is free
        # made the audio differ between two runs with the same seed (up to 74 ms per clip, measured).
        bounds = np.linspace(0, len(jobs), workers + 1).round().astype(int)
        shards = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            results = [r for part in pool.map(_make_speech_rows, shards) for r in part]
    else:
        results = [_make_speech_row(job) for job in jobs]
    rejected: Counter = sum((r for _, r in results), Counter())
    rows = [row for row, _ in results]
    _write_jsonl(manifests["train"], rows[:num_train])
    _write_jsonl(manifests["test"], rows[num_train : num_train + num_test])
    if num_unseen:
        _write_jsonl(manifests["test_unseen"], rows[num_train + num_test :])
    if num_no_speech:
        _write_jsonl(manifests["no_speech"], [_make_no_speech_row(cfg, i, wav_dir) for i in range(num_no_speech)])
    hours = sum(r["duration"] for r in rows) / 3600
    stats = {"speech_hours": round(hours, 4), "rejected": dict(rejected), "espeak": Espeak.get().version}
    config_path.write_text(json.dumps({"config": record, "stats": stats}, indent=2) + "\n")
    logger.info("wrote %d speech clips (%.2f h) to %s; rejected sentences: %s", len(rows), hours, out, dict(rejected))
    return manifests


def write_tone_corpus(
    out_dir: str | os.PathLike,
    num: int,
    seed: int,
    *,
    words_per_clip: tuple[int, int] = (1, 4),
    language: str = "English",
    name: str = "tone",
) -> Path:
    """Write ``num`` tone "utterances" and ``out_dir/{name}.jsonl``; returns the manifest path.

    Why: tests elsewhere need audio with the corpus's manifest shape and exact word times without
    espeak-ng. Each of 8 pseudo-words is a fixed two-tone chord (faded in/out, 0.12-0.4 s) separated by
    silent gaps, so words are audible exactly inside their spans; clips last 0.5-3 s.
    """
    out = Path(out_dir).resolve()
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    lexicon = {w: (200.0 + 90 * i, 1300.0 + 240 * i) for i, w in enumerate("ba de gi ko mu pa si tu".split())}
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num):
        n_words = int(rng.integers(words_per_clip[0], words_per_clip[1] + 1))
        words = [list(lexicon)[k] for k in rng.integers(len(lexicon), size=n_words)]
        lengths = rng.uniform(0.12, 0.4, n_words)
        gaps = rng.uniform(0.03, 0.15, n_words + 1)
        budget = 2.9 / (lengths.sum() + gaps.sum())  # keep clips under 3 s
        lengths, gaps = lengths * min(1, budget), gaps * min(1, budget)
        pieces, spans, t = [], [], 0
        for word, length, gap in zip(words, lengths, gaps, strict=False):
            pieces.append(np.zeros(int(gap * SAMPLE_RATE)))
            t += pieces[-1].size
            n = int(length * SAMPLE_RATE)
            k = np.arange(n) / SAMPLE_RATE
            tone = (
                sum(np.sin(2 * np.pi * f * k) for f in lexicon[word])
                * 0.3
                * np.minimum(1, np.minimum(k, k[::-1]) / 0.01)
            )
            pieces.append(tone)
            spans.append((t, t + n))
            t += n
        pieces.append(np.zeros(max(int(gaps[-1] * SAMPLE_RATE), int(0.5 * SAMPLE_RATE) - t)))
        audio = np.concatenate(pieces).astype(np.float32)
        clip_id = f"tone-{index:06d}"
        path = out / "wavs" / f"{clip_id}.wav"
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        rows.append(
            {
                "id": clip_id,
                "audio": str(path),
                "text": " ".join(words),
                "language": language,
                "duration": audio.size / SAMPLE_RATE,
                "words": [
                    {"word": w, "start": round(s / SAMPLE_RATE, 3), "end": round(e / SAMPLE_RATE, 3)}
                    for w, (s, e) in zip(words, spans, strict=True)
                ],
            }
        )
    manifest = out / f"{name}.jsonl"
    _write_jsonl(manifest, rows)
    return manifest
