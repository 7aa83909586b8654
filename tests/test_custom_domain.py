"""The custom-domain recipe's pieces (recipes/custom_domain) on a tiny model and tone corpora: base export ->
replay sample and context-free test copy -> fine-tuning (a) domain only and (b) domain + replay with the recipe's
experiment configs -> the three-set evaluation -> the report, whose numbers are checked against independent
counts. The recipe's own command lines are composed by tests/test_configs.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from safetensors.torch import load_file

from qwen3asr_train.eval.metrics import ErrorCounts, score_utterance
from qwen3asr_train.stages import evaluate as eval_stage
from qwen3asr_train.stages import sft
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config, tiny_sft_overrides

REPO = Path(__file__).resolve().parents[1]
HOT = "ko, mu"
"""The tone domain's hot words (two of the tone corpus's eight pseudo-words)."""


def _load(name: str) -> ModuleType:
    path = REPO / "recipes" / "custom_domain" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"custom_domain_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_corpus = _load("make_corpus")
compare = _load("compare")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_replay_sample_is_seeded_subset_in_file_order(tmp_path: Path) -> None:
    general = _write(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": str(i)} for i in range(20)])
    assert make_corpus.write_replay(general, tmp_path / "replay.jsonl", 7) == 7
    rows = _rows(tmp_path / "replay.jsonl")
    ids = [r["id"].removeprefix("replay-") for r in rows]
    assert all(r["id"].startswith("replay-") for r in rows)  # no clash with the domain corpus's ids
    assert len(set(ids)) == 7 and set(ids) <= {f"g{i}" for i in range(20)}
    assert all(r["text"] == r["id"].removeprefix("replay-g") for r in rows)  # rows otherwise unchanged
    assert ids == sorted(ids, key=lambda s: int(s[1:]))  # file order kept
    make_corpus.write_replay(general, tmp_path / "again.jsonl", 7)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "replay.jsonl").read_text()
    with pytest.raises(ValueError, match="20 rows, fewer than the 21"):
        make_corpus.write_replay(general, tmp_path / "too_many.jsonl", 21)


def test_own_domain_manifests_replace_the_synthetic_corpus(tmp_path: Path) -> None:
    general = write_tone_corpus(tmp_path / "general", 6, seed=1, name="train")
    mine = {s: write_tone_corpus(tmp_path / s, 3, seed=n, name=s) for n, s in enumerate(("train", "test"), 2)}
    rows = _rows(mine["test"])
    _write(mine["test"], [{**r, "context": HOT} for r in rows])
    argv = [str(tmp_path / "out"), "--general-train", str(general), "--replay", "4"]
    assert make_corpus.main([*argv, "--domain-train", str(mine["train"]), "--domain-test", str(mine["test"])]) == 0
    out = tmp_path / "out"
    assert (out / "domain" / "train.jsonl").read_text() == mine["train"].read_text()
    assert _rows(out / "domain" / "test_nocontext.jsonl") == rows  # the rows as they were before the context
    assert len(_rows(out / "replay.jsonl")) == 4 and not (out / "domain" / "wavs").exists()  # nothing synthesised
    with pytest.raises(SystemExit):
        make_corpus.main([*argv, "--domain-train", str(mine["train"])])


def test_domain_vocabulary_is_new_to_the_general_corpus() -> None:
    assert len(make_corpus.GENERAL_WORDS) == 24 and not set(make_corpus.DOMAIN_WORDS) & set(make_corpus.GENERAL_WORDS)
    options = make_corpus.domain_corpus_options(10, 2)
    assert options["vocabulary"][24:] == make_corpus.DOMAIN_WORDS
    assert options["context"].split(", ") == list(make_corpus.DOMAIN_WORDS)


def test_term_recall_by_hand() -> None:
    rows = [
        {"id": "a", "language": "English", "reference": "Ko ba ko mu.", "text": "ko, ba mu mu"},  # ko 1/2, mu 1/1
        {"id": "b", "language": "English", "reference": "Mu tu!", "text": "tu"},  # mu 0/1
        {"id": "c", "language": "English", "reference": "Ko.", "text": "ko"},  # not in the contexts: not counted
    ]
    assert compare.term_recall(rows, {"a": HOT, "b": "Mu"}) == (2, 4)


@pytest.fixture(scope="module")
def recipe_exp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe's folder after stages 0-4, with a 2-step tiny SFT as the base and tone corpora as data."""
    root = tmp_path_factory.mktemp("custom_domain")
    general_train = write_tone_corpus(root / "general_train", 12, seed=1, name="train")
    general_test = write_tone_corpus(root / "general_test", 4, seed=2, name="test")
    base_run = root / "base_run"
    sft.run(
        make_config(
            tiny_sft_overrides(general_train.parent, base_run, f"data.train={general_train}", "trainer.max_steps=2")
        )
    )
    exp = root / "exp"
    shutil.copytree(base_run / "export", exp / "base")  # stage 0's snapshot
    shutil.copy(general_train, _write(exp / "general" / "train.jsonl", []))
    shutil.copy(general_test, exp / "general" / "test.jsonl")
    domain = exp / "corpus" / "domain"  # stage 1: rows with the hot words as context
    for split, num, seed in (("train", 8, 3), ("test", 4, 4)):
        rows = _rows(write_tone_corpus(root / f"domain_{split}", num, seed=seed, name=split))
        _write(domain / f"{split}.jsonl", [{**r, "context": HOT} for r in rows])
    make_corpus.write_without_context(domain / "test.jsonl", domain / "test_nocontext.jsonl")
    make_corpus.write_replay(exp / "general" / "train.jsonl", exp / "corpus" / "replay.jsonl", 8)
    fast = ["trainer.max_steps=2", "data.num_workers=0", "data.max_batch_seconds=6", f"model.path={exp / 'base'}"]
    sft.run(
        make_config(
            ["experiment=custom_domain", *fast, f"data.train={domain / 'train.jsonl'}", f"run_dir={exp / 'ft_domain'}"]
        )
    )
    replay = f"data.train=[{domain / 'train.jsonl'},{exp / 'corpus' / 'replay.jsonl'}]"
    sft.run(make_config(["experiment=custom_domain_replay", *fast, replay, f"run_dir={exp / 'ft_replay'}"]))
    for model, path in (
        ("base", exp / "base"),
        ("ft_domain", exp / "ft_domain" / "export"),
        ("ft_replay", exp / "ft_replay" / "export"),
    ):
        eval_stage.run(
            make_config(
                [
                    "experiment=custom_domain_eval",
                    f"recipe.model_path={path}",
                    f"recipe.sets.domain={domain / 'test.jsonl'}",
                    f"recipe.sets.domain_nocontext={domain / 'test_nocontext.jsonl'}",
                    f"recipe.sets.general={exp / 'general' / 'test.jsonl'}",
                    "recipe.decode.max_new_tokens_cap=24",
                    f"run_dir={exp / f'eval_{model}'}",
                ]
            )
        )
    return exp


def test_pieces_run_and_train_what_they_should(recipe_exp: Path) -> None:
    base = load_file(recipe_exp / "base" / "model.safetensors")
    for run in ("ft_domain", "ft_replay"):
        tuned = load_file(recipe_exp / run / "export" / "model.safetensors")
        assert set(tuned) == set(base)
        assert any(not (tuned[k] == base[k]).all() for k in base), f"{run}: no weight changed"
        record = json.loads((recipe_exp / run / "run.json").read_text())
        assert json.dumps(record).count("replay.jsonl") == (1 if run == "ft_replay" else 0)
    assert "context" not in Counter(k for r in _rows(recipe_exp / "corpus/domain/test_nocontext.jsonl") for k in r)
    assert all(r["context"] == HOT for r in _rows(recipe_exp / "corpus/domain/test.jsonl"))


def test_report_matches_independent_counts(recipe_exp: Path, capsys: pytest.CaptureFixture) -> None:
    status = compare.main(recipe_exp)
    report = compare.collect(recipe_exp)
    assert list(report) == ["base", "ft_domain", "ft_replay"]
    for model, entry in report.items():
        summary = json.loads((recipe_exp / f"eval_{model}" / "summary.json").read_text())
        for name in compare.SETS:
            # the evaluation's own WER, and a CER counted here from the recogs' rows
            assert entry[name]["wer"] == pytest.approx(summary["sets"][name]["corpus"]["rate"], abs=1e-12)
            rows = _rows(recipe_exp / f"eval_{model}" / f"results-{name}.jsonl")
            chars = sum(
                (score_utterance(r["reference"], r["text"] or "", "English", unit="char").counts for r in rows),
                ErrorCounts(),
            )
            assert entry[name]["cer"] == pytest.approx(chars.rate)
        # recall by a second construction: words of each reference that are hot words, found in the hypothesis
        found = total = 0
        for r in _rows(recipe_exp / f"eval_{model}" / "results-domain.jsonl"):
            hyp = re.findall(r"\w+", (r["text"] or "").lower())
            for word in re.findall(r"\w+", r["reference"].lower()):
                if word in ("ko", "mu"):
                    total += 1
                    if word in hyp:
                        hyp.remove(word)
                        found += 1
        assert report[model]["recall"] == (found, total)
    table = (recipe_exp / "table.md").read_text()
    assert table.count("\n") == 5 and "(b) domain + replay" in table
    base_wer = report["base"]["domain"]["wer"]
    assert status == (0 if all(report[m]["domain"]["wer"] < base_wer for m in ("ft_domain", "ft_replay")) else 1)
    assert (recipe_exp / "comparison.png").stat().st_size > 0
    assert "fine-tuning steps: (a) domain only 2, (b) domain + replay 2" in capsys.readouterr().out
