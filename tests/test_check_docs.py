"""python -m refdecoder.tools.check_docs: the docs agree with the committed results and the code, and the checker
objects when a figure, a generated block or the module layout goes wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refdecoder.tools import check_docs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The docs, the results and the package's modules (no data files) of this checkout, to break."""
    for name in ("README.md", "docs", "benchmarks/README.md", "benchmarks/results", "recipes/results"):
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    shutil.copytree(
        ROOT / "refdecoder",
        tmp_path / "refdecoder",
        ignore=lambda folder, names: [n for n in names if not (n.endswith(".py") or (Path(folder) / n).is_dir())],
    )
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_docs_of_this_checkout_agree() -> None:
    assert check_docs.check() == []
    proc = subprocess.run(
        [sys.executable, "-m", "refdecoder.tools.check_docs"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_copy_agrees_before_it_is_broken(checkout: Path) -> None:
    assert check_docs.check(checkout) == []


def test_a_changed_figure_in_a_generated_block_is_caught(checkout: Path) -> None:
    doc = json.loads((ROOT / "benchmarks/results/quality_small.json").read_text())
    headline = doc["eval"]["models"][doc["headline"]]["motion"]["psnr"]
    _edit(checkout / "README.md", f"{headline:.2f}", f"{headline + 0.1:.2f}")
    assert any("README.md: a generated block differs" in p for p in check_docs.check(checkout))


def test_a_hand_edited_benchmark_record_is_caught(checkout: Path) -> None:
    _edit(checkout / "benchmarks/README.md", "| radius 2 |", "| radius 3 |")
    assert any("benchmarks/README.md differs" in p for p in check_docs.check(checkout))


def test_a_figure_the_cited_json_does_not_hold_is_caught(checkout: Path) -> None:
    paragraph = "\n\nThe plain decoder takes 58.6 TFLOP (`benchmarks/results/decode_overhead.json`).\n"
    with (checkout / "docs/inference.md").open("a") as f:
        f.write(paragraph)
    assert check_docs.check(checkout) == []  # the JSON holds 58.55... -> 58.6
    _edit(checkout / "docs/inference.md", "58.6 TFLOP", "57.9 TFLOP")
    assert check_docs.check(checkout) == [
        "docs/inference.md: figure 57.9 is not in benchmarks/results/decode_overhead.json"
    ]
    _edit(checkout / "docs/inference.md", "decode_overhead.json", "decode_overhed.json")
    assert "does not exist" in " ".join(check_docs.check(checkout))


def test_a_module_missing_from_the_layout_is_caught(checkout: Path) -> None:
    architecture = checkout / "docs/architecture.md"
    _edit(architecture, "  tiling.py ", "  tilings.py ")
    _edit(architecture, "locality_bias, transformer,", "transformer,")
    problems = check_docs.check(checkout)
    assert "docs/architecture.md: the layout misses refdecoder/tiling.py" in problems
    assert "docs/architecture.md: the layout of refdecoder/blocks/ misses locality_bias.py" in problems


def test_a_new_module_must_join_the_layout(checkout: Path) -> None:
    (checkout / "refdecoder/blocks/gating.py").write_text("")
    (checkout / "refdecoder/sampling_tools").mkdir()
    (checkout / "refdecoder/sampling_tools/__init__.py").write_text("")
    (checkout / "refdecoder/_private.py").write_text("")  # private modules are exempt
    assert set(check_docs.check(checkout)) == {
        "docs/architecture.md: the layout misses refdecoder/sampling_tools/",
        "docs/architecture.md: the layout of refdecoder/blocks/ misses gating.py",
    }
