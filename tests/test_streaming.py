"""Streaming: upstream's chunked decoder on our model, its report next to offline WER, and the streaming SFT cut."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3asr_train.checkpoints import load_for_inference
from qwen3asr_train.config.recipes import DecodeConfig, StreamingConfig
from qwen3asr_train.data.collate import IGNORE_INDEX, SFTCollator, SFTOptions, row_rng, streaming_cut
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, RowChecks, Utterance
from qwen3asr_train.data.prompts import asr_prompt
from qwen3asr_train.eval.decode import decode
from qwen3asr_train.eval.hook import load_eval_sets
from qwen3asr_train.eval.report import rescore_recogs
from qwen3asr_train.eval.streaming import Generation, decode_streaming, hf_generate, rollback_prefix, run_streams
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.model.export import save_native
from qwen3asr_train.stages import evaluate as eval_stage
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config

SR = 16000


# ------------------------------------------------------------------------------ prefix logic (fake model)


class ByteTokenizer:
    """One token per UTF-8 byte: a cut inside a multi-byte character decodes to U+FFFD, as with byte BPE."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_prefix_rollback_and_refeeding_follow_a_hand_worked_stream():
    """3.5 s at 1 s chunks = 3 full chunks + a 0.5 s tail; prefixes worked out by hand from the canned outputs."""
    opts = StreamingConfig(chunk_seconds=1.0, unfixed_chunks=2, unfixed_tokens=3)
    canned = iter(["abc", "abcdef", "dXYZ", "efg"])
    calls: list[tuple[str, int]] = []

    def generate(prompts: list[str], audios: list[np.ndarray]) -> list[Generation]:
        (prompt,), (audio,) = prompts, audios
        calls.append((prompt, len(audio)))
        text = next(canned)
        return [Generation(text=text, readable=text, finished=True)]

    (state,) = run_streams([np.zeros(56000, np.float32)], ["P|"], generate, ByteTokenizer(), opts)
    assert calls == [
        ("P|", 16000),  # chunk 0: no prefix (unfixed chunk)
        ("P|", 32000),  # chunk 1: still unfixed, audio re-fed from the start
        ("P|abc", 48000),  # chunk 2: "abcdef" minus its last 3 tokens
        ("P|abcd", 56000),  # tail flush: "abcdXYZ" minus 3
    ]
    assert state.outputs == ["abc", "abcdef", "abcdXYZ", "abcdefg"]
    assert state.hypothesis == "abcdefg" and not state.truncated and state.done


def test_prefix_never_ends_inside_a_character():
    tok, opts = ByteTokenizer(), StreamingConfig(unfixed_chunks=0, unfixed_tokens=1)
    # "abé" = a b 0xC3 0xA9: dropping one byte leaves "ab\ufffd", so a second one goes too.
    assert rollback_prefix(tok, "abé", 0, opts) == "ab"
    assert rollback_prefix(tok, "abc", 0, opts) == "ab"
    assert rollback_prefix(tok, "é", 0, opts) == ""  # nothing whole is left
    assert rollback_prefix(tok, "abc", 1, replace(opts, unfixed_chunks=2)) == ""  # still an unfixed chunk
    assert rollback_prefix(tok, "abc", 0, replace(opts, unfixed_tokens=0)) == "abc"


def test_empty_audio_is_refused():
    with pytest.raises(ValueError, match="streaming needs audio"):
        run_streams([np.zeros(0, np.float32)], ["P"], lambda p, a: [], ByteTokenizer(), StreamingConfig())


# ------------------------------------------------------------------------------ the real tiny model


@pytest.fixture(scope="module")
def exported(tiny_model_and_processor, tmp_path_factory) -> Path:
    model, processor = tiny_model_and_processor
    return save_native(model, processor, tmp_path_factory.mktemp("stream_export") / "native")


@pytest.fixture(scope="module")
def tone_set(tmp_path_factory) -> Path:
    return write_tone_corpus(tmp_path_factory.mktemp("stream_tones"), num=3, seed=5, words_per_clip=(3, 5))


def _samples(manifest: Path) -> list[Sample]:
    return load_eval_sets({"dev": str(manifest)}, RowChecks(languages=LanguageTable()), "error")["dev"]


def test_one_chunk_longer_than_the_clip_is_offline_decoding(exported, tone_set):
    """Independent paths: eval/decode.py's batched greedy decoding vs the streaming decoder's single step."""
    model, processor = load_for_inference(exported)
    samples = _samples(tone_set)
    opts = DecodeConfig(max_batch_size=1)
    offline = decode(model, processor, samples, opts)
    streamed = decode_streaming(model, processor, samples, opts, StreamingConfig(chunk_seconds=10.0))
    assert [r.hypothesis for r in streamed] == [r.hypothesis for r in offline]
    assert [r.truncated for r in streamed] == [r.truncated for r in offline]
    assert all(r.hypothesis for r in offline)


def test_each_step_continues_from_its_prefix(exported, tone_set):
    model, processor = load_for_inference(exported)
    sample = _samples(tone_set)[0]
    opts = StreamingConfig(chunk_seconds=0.5, unfixed_chunks=1, unfixed_tokens=2)
    generate = hf_generate(model, processor, DecodeConfig())
    (state,) = run_streams([sample.audio], [asr_prompt()], generate, processor.tokenizer, opts)
    assert state.step == state.num_steps == int(np.ceil(len(sample.audio) / (0.5 * SR)))
    assert state.prefixes[0] == ""
    for prefix, output in zip(state.prefixes, state.outputs, strict=True):
        assert output.startswith(prefix)
    assert any(state.prefixes[1:]), "a later step should have had a prefix"


def test_eval_recipe_reports_streaming_next_to_offline(exported, tone_set, tmp_path):
    run_dir = tmp_path / "eval"
    summary = eval_stage.run(
        make_config(
            [
                "recipe=eval",
                f"recipe.model_path={exported}",
                f"+recipe.sets.dev={tone_set}",
                "recipe.streaming.enabled=true",
                "recipe.streaming.chunk_seconds=1.0",
                f"run_dir={run_dir}",
            ]
        )
    )
    payload = json.loads((run_dir / "streaming_summary.json").read_text())
    assert payload["streaming"] == {"chunk_seconds": 1.0, "unfixed_chunks": 2, "unfixed_tokens": 5}
    row = payload["sets"]["dev"]["languages"]["English"]
    assert row["metric"] == "wer" and row["utterances"] == 3
    assert row["offline"] == pytest.approx(summary["dev"]["corpus"]["rate"])
    rescored = rescore_recogs(run_dir / "streaming" / "recogs-dev.txt")["dev"]
    assert row["streaming"] == pytest.approx(rescored["corpus"]["rate"])
    table = (run_dir / "streaming_summary.md").read_text()
    assert "| offline % | streaming % |" in table
    assert f"| dev | English | wer | {100 * row['offline']:.2f} | {100 * row['streaming']:.2f} |" in table
    assert (run_dir / "summary.md").exists()  # the offline report is unchanged


def test_streaming_is_off_by_default(exported, tone_set, tmp_path):
    cfg = make_config(
        ["recipe=eval", f"recipe.model_path={exported}", f"+recipe.sets.dev={tone_set}", f"run_dir={tmp_path}"]
    )
    assert cfg.recipe.streaming.enabled is False


# ------------------------------------------------------------------------------ streaming SFT cut

WORDS = [("ba", 0.1, 0.5), ("de", 0.6, 1.9), ("gi", 1.95, 2.0), ("ko", 2.5, 3.9), ("mu", 4.1, 4.8)]


def _utt(language: str = "English", words=WORDS, duration: float = 5.0, timed: bool = True) -> Utterance:
    """A row whose text is its words; ``timed=False`` drops the word times (same text)."""
    aligned = [AlignedWord(w, s, e) for w, s, e in words] if timed else None
    text = ("" if language == "Chinese" else " ").join(w for w, _, _ in words)
    return Utterance(id="u", audio="u.wav", duration=duration, text=text, language=language, words=aligned)


class FixedK(random.Random):
    def __init__(self, k: int) -> None:
        super().__init__(0)
        self.k = k

    def randint(self, a: int, b: int) -> int:
        assert (a, b) == (1, 2)  # 5 s at 2 s chunks: boundaries at 2 s and 4 s only
        return self.k


def test_cut_keeps_the_words_that_end_before_it():
    assert streaming_cut(_utt(), 2.0, FixedK(1)).text == "ba de gi"  # "gi" ends exactly at 2.0 s
    assert streaming_cut(_utt(), 2.0, FixedK(2)).text == "ba de gi ko"
    cut = streaming_cut(_utt("Chinese", [("你", 0.1, 0.5), ("好", 0.6, 2.2), ("吗", 2.3, 4.5)]), 2.0, FixedK(2))
    assert (cut.chunks, cut.seconds, cut.text) == (2, 4.0, "你好")
    assert streaming_cut(_utt(timed=False), 2.0, FixedK(1)) is None  # no word times: left whole
    assert streaming_cut(_utt(duration=2.0), 2.0, FixedK(1)) is None  # no boundary before the end
    assert streaming_cut(_utt(duration=4.0), 2.0, random.Random(0)).seconds == 2.0  # 4.0 is the end, not a cut


def _collate(processor, sample: Sample, epoch: int = 0, **options) -> dict:
    return SFTCollator(processor, SFTOptions(seed=3, **options))([sample], epoch)


def _target(processor, batch: dict) -> str:
    labels = batch["labels"][0]
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


def test_collator_cuts_audio_and_target_reproducibly(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    audio = np.random.default_rng(0).standard_normal(5 * SR).astype(np.float32) * 0.1
    sample = Sample(_utt(), audio, index=7)
    seen = set()
    for epoch in range(6):
        batch = _collate(processor, sample, epoch, streaming_prob=1.0)
        rng = row_rng(3, epoch, 7, "streaming")
        rng.random()
        k = rng.randint(1, 2)
        seen.add(k)
        assert batch["audio_seconds"] == 2.0 * k
        assert _target(processor, batch) == {1: "language English<asr_text>ba de gi<|im_end|>"}.get(
            k, "language English<asr_text>ba de gi ko<|im_end|>"
        )
        again = _collate(processor, sample, epoch, streaming_prob=1.0)
        assert all(torch.equal(batch[key], again[key]) for key in ("input_ids", "labels", "input_features"))
    assert seen == {1, 2}
    whole = _collate(processor, Sample(_utt(timed=False), audio, index=7), streaming_prob=1.0)
    assert whole["audio_seconds"] == 5.0 and _target(processor, whole).endswith("ba de gi ko mu<|im_end|>")


def test_off_by_default_and_other_draws_untouched(tiny_model_and_processor):
    """Default options leave every batch as before; turning streaming on changes no other augmentation's draw."""
    _, processor = tiny_model_and_processor
    assert SFTOptions().streaming_prob == 0.0
    audio = np.random.default_rng(1).standard_normal(5 * SR).astype(np.float32) * 0.1
    others = {"context_prob": 0.5, "forced_language_prob": 0.5, "distractors_max": 0}
    for index in range(4):
        with_words = Sample(_utt(), audio, index)
        without = Sample(_utt(timed=False), audio, index)
        off = _collate(processor, with_words, **others)
        # Without word times the cut never applies, so this is the pre-streaming batch under the same draws.
        on_nowords = _collate(processor, without, streaming_prob=1.0, **others)
        assert off["audio_seconds"] == 5.0
        for key in ("input_ids", "labels", "attention_mask", "input_features", "input_features_mask"):
            assert torch.equal(off[key], on_nowords[key]), key


def test_sft_trains_on_streaming_cuts(tmp_path):
    """``recipe.streaming_prob`` reaches the collator through the recipe, and a tiny run trains on cut rows."""
    from qwen3asr_train.stages import sft
    from tests.conftest import tiny_sft_overrides

    corpus = tmp_path / "corpus"
    write_tone_corpus(corpus, num=6, seed=9, words_per_clip=(3, 5), name="train")
    overrides = tiny_sft_overrides(
        corpus,
        tmp_path / "run",
        "recipe.streaming_prob=1.0",
        "recipe.streaming_chunk_seconds=1.0",
        "trainer.max_steps=2",
        "recipe.export_on_end=false",
    )
    cfg = make_config(overrides)
    assert SFTOptions.from_recipe(cfg.recipe, seed=0).streaming_chunk_seconds == 1.0
    sft.run(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_streaming_a_forced_aligner_is_refused(tone_set, tmp_path):
    from qwen3asr_train.config.schema import ModelConfig
    from qwen3asr_train.model.builder import build_model

    model, processor = build_model(ModelConfig(source="tiny", task="aligner"), seed=0)
    aligner = save_native(model, processor, tmp_path / "aligner")
    overrides = ["recipe=eval", f"recipe.model_path={aligner}", f"+recipe.sets.dev={tone_set}"]
    cfg = make_config([*overrides, "recipe.streaming.enabled=true", f"run_dir={tmp_path / 'eval'}"])
    with pytest.raises(ValueError, match="forced aligner, which has no transcripts"):
        eval_stage.run(cfg)


# ------------------------------------------------------------------------------ against upstream's own code

UPSTREAM_STREAM = r"""
import json, sys
import numpy as np
from qwen_asr.inference.qwen3_asr import Qwen3ASRModel

class ByteTokenizer:
    def encode(self, text):
        return list(text.encode("utf-8"))
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

spec = json.loads(sys.argv[1])
canned, calls = iter(spec["outputs"]), []

class Out:
    def __init__(self, text):
        self.outputs = [type("C", (), {"text": text})()]

class FakeLLM:
    def generate(self, inputs, sampling_params=None, use_tqdm=False):
        (inp,) = inputs
        calls.append([inp["prompt"], len(inp["multi_modal_data"]["audio"][0])])
        return [Out(next(canned))]

m = Qwen3ASRModel.__new__(Qwen3ASRModel)
m.backend, m.model, m.sampling_params = "vllm", FakeLLM(), None
m.processor = type("P", (), {"tokenizer": ByteTokenizer()})()
m._build_text_prompt = lambda context, force_language: "P|"
state = m.init_streaming_state(unfixed_chunk_num=spec["unfixed_chunks"], unfixed_token_num=spec["unfixed_tokens"],
                               chunk_size_sec=spec["chunk_seconds"])
audio = np.zeros(spec["samples"], np.float32)
for start in range(0, len(audio), 7000):  # audio arrives in pieces unrelated to the chunk size
    m.streaming_transcribe(audio[start : start + 7000], state)
m.finish_streaming_transcribe(state)
print(json.dumps({"calls": calls, "raw": state._raw_decoded}))
"""


@pytest.mark.compat
def test_same_prompts_and_audio_as_upstreams_streaming_decoder():
    """Upstream's ``streaming_transcribe``/``finish_streaming_transcribe`` (qwen-asr 0.0.6, vLLM replaced by canned
    outputs, the same byte tokenizer) issue exactly the prompts and audio lengths our decoder does."""
    import os
    import subprocess

    python = os.environ.get("QWEN3ASR_COMPAT_PYTHON")
    if not python:
        pytest.skip("QWEN3ASR_COMPAT_PYTHON is not set: run `make test-compat` (it builds .venv-compat)")
    outputs = ["language English<asr_text>ab", "language English<asr_text>abcd", "efgh", "ijk", "lmnop", "q"]
    spec = {"outputs": outputs, "unfixed_chunks": 2, "unfixed_tokens": 5, "chunk_seconds": 1.0, "samples": 89000}
    done = subprocess.run(
        [python, "-c", UPSTREAM_STREAM, json.dumps(spec)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    canned, ours = iter(outputs), []

    def generate(prompts: list[str], audios: list[np.ndarray]) -> list[Generation]:
        ours.append([prompts[0], len(audios[0])])
        text = next(canned)
        return [Generation(text, text, True)]

    opts = StreamingConfig(chunk_seconds=1.0, unfixed_chunks=2, unfixed_tokens=5)
    (state,) = run_streams([np.zeros(89000, np.float32)], ["P|"], generate, ByteTokenizer(), opts)
    assert len(ours) == 6  # 5 full chunks + the 0.56 s tail
    assert ours == theirs["calls"]
    assert state.raw == theirs["raw"]


def _stream_worker(rank: int, world: int, port: int, model_dir: str, manifest: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from qwen3asr_train.eval.streaming import decode_streaming_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, processor = load_for_inference(model_dir)
    opts = StreamingConfig(chunk_seconds=1.0)
    results = decode_streaming_distributed(
        model, processor, _samples(Path(manifest)), DecodeConfig(max_batch_size=1), opts
    )
    if rank == 0:
        Path(out).write_text(json.dumps([r.__dict__ for r in results]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_streaming_on_two_processes_equals_one(exported, tone_set, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.json"
    mp.spawn(_stream_worker, args=(2, port, str(exported), str(tone_set), str(out)), nprocs=2, join=True)
    model, processor = load_for_inference(exported)
    opts = StreamingConfig(chunk_seconds=1.0)
    one = decode_streaming(model, processor, _samples(tone_set), DecodeConfig(max_batch_size=1), opts)
    assert json.loads(out.read_text()) == [r.__dict__ for r in one]
