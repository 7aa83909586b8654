"""recipes/gspo_vs_sft scripts: the dev/heldout/unseen split and the compare report's pairs and numbers.

The report's WERs and differences are checked against sums done here from the result rows, and its CI against
a bootstrap written here with the same draw (numpy ``default_rng(seed).integers``), so a mix-up of systems,
pairs or sign shows.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    path = REPO / "recipes" / "gspo_vs_sft" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gspo_vs_sft_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write_results(path: Path, rows: dict[str, tuple[int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for uid, (errors, units) in rows.items():
            counts = {"substitutions": errors, "deletions": 0, "insertions": 0, "ref_units": units}
            f.write(json.dumps({"id": uid, "counts": counts}) + "\n")


def test_split_sets_partitions_the_test_split(tmp_path: Path) -> None:
    make_sets = _load("make_sets")
    test, unseen = tmp_path / "test.jsonl", tmp_path / "unseen.jsonl"
    test.write_text("".join(json.dumps({"id": f"t{i}"}) + "\n" for i in range(7)))
    unseen.write_text(json.dumps({"id": "u0"}) + "\n")
    paths = make_sets.split_sets(test, unseen, tmp_path / "sets", dev_clips=3)
    ids = {k: [json.loads(line)["id"] for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert ids == {"dev": ["t0", "t1", "t2"], "heldout": ["t3", "t4", "t5", "t6"], "unseen": ["u0"]}
    with pytest.raises(ValueError, match="dev clips"):
        make_sets.split_sets(test, unseen, tmp_path / "x", dev_clips=7)


def test_parse_pairs() -> None:
    compare = _load("compare")
    systems = ["start", "gspo_s1", "sft_s1"]
    assert compare.parse_pairs("", systems) == [("gspo_s1", "start"), ("sft_s1", "start"), ("sft_s1", "gspo_s1")]
    assert compare.parse_pairs("gspo_s1-sft_s1", systems) == [("gspo_s1", "sft_s1")]
    for bad in ("gspo_s1", "gspo_s1-gspo_s1", "gspo_s2-start"):
        with pytest.raises(SystemExit):
            compare.parse_pairs(bad, systems)


def test_report_numbers_match_an_independent_computation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    compare = _load("compare")
    rng = np.random.default_rng(3)
    n = 40
    units = rng.integers(1, 5, n)
    errs = {"start": rng.integers(0, 4, n), "a": rng.integers(0, 3, n), "b": rng.integers(0, 4, n)}
    for name, e in errs.items():
        _write_results(
            tmp_path / f"eval_{name}" / "results-dev.jsonl", {f"u{i:02d}": (int(e[i]), int(units[i])) for i in range(n)}
        )
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cpu_time.txt").write_text("100.2 4.6 300.0\n")
    compare.main([str(tmp_path), "--systems", "start,a,b", "--pairs", "a-b", "--resamples", "2000", "--seed", "7"])
    out = capsys.readouterr().out
    wer = {k: 100 * e.sum() / units.sum() for k, e in errs.items()}
    assert f"| dev | {n} | {wer['start']:.1f} | {wer['a']:.1f} | {wer['b']:.1f} |" in out
    assert "- a: 105 CPU-s (100 user + 5 system), 300 s wall" in out
    idx = np.random.default_rng(7).integers(0, n, size=(2000, n))
    diffs = 100 * (errs["a"][idx].sum(1) - errs["b"][idx].sum(1)) / units[idx].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    row = re.search(r"\| dev \| a − b \| ([+-][\d.]+) \| \[([+-][\d.]+), ([+-][\d.]+)\]", out)
    assert row is not None, out
    assert float(row.group(1)) == pytest.approx(wer["a"] - wer["b"], abs=0.051)
    assert float(row.group(2)) == pytest.approx(low, abs=0.051)
    assert float(row.group(3)) == pytest.approx(high, abs=0.051)
    assert out.count("| dev | ") == 2  # the WER row and the one requested pair
