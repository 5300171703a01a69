"""Check that the docs say what the code and the committed results say.

    python -m refdecoder.tools.check_docs        # from a repository checkout; exit 1 and one line per problem

1. ``benchmarks/README.md`` is exactly what ``python -m benchmarks.make_readme`` writes from ``benchmarks/results/``.
2. Every generated block of ``README.md`` and ``docs/*.md`` (``<!-- generated: NAME -->``) is current.
3. A paragraph of those files that cites a result file (``benchmarks/results/X.json``, ``recipes/results/X.json``)
   states no decimal figure that the file does not hold at the precision shown.
4. The module layout of ``docs/architecture.md`` names every module and package of ``refdecoder/`` and, for each
   package, every module in it (private ``_name`` modules are exempt).

Run ``python -m benchmarks.make_readme`` to rewrite 1 and 2 after a benchmark's JSON changed.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"(?:benchmarks|recipes)/results/[\w.-]+\.json")
# A decimal figure, not part of a version (``0.9.1``, ``Wan2.1``).
FIGURE = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])")
NAME_BEFORE = re.compile(r"[A-Z][\w-]*\s$")  # "HunyuanVideo 1.5": a name's version, not a figure


def check(root: Path = ROOT) -> list[str]:
    """Every problem found under ``root`` (a repository checkout), one line each; empty when the docs agree."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import make_readme
    except ImportError as err:
        return [f"cannot import benchmarks.make_readme ({err}); run from a repository checkout"]
    finally:
        sys.path.remove(str(ROOT))
    problems = []
    if (root / "benchmarks" / "README.md").read_text() != make_readme.readme():
        problems.append("benchmarks/README.md differs from its JSON; run python -m benchmarks.make_readme")
    for path in _docs(root):
        text, name = path.read_text(), path.relative_to(root)
        try:
            current = make_readme.fill_blocks(text) == text
        except KeyError as err:
            problems.append(f"{name}: {err.args[0]}")
            continue
        if not current:
            problems.append(f"{name}: a generated block differs from its source; run python -m benchmarks.make_readme")
        problems += [f"{name}: {p}" for p in cited_figures(make_readme.GENERATED.sub("", text), root)]
    return problems + layout_gaps(root)


def _docs(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def cited_figures(text: str, root: Path = ROOT) -> list[str]:
    """Decimal figures of paragraphs citing a result file that the file does not hold at the precision shown."""
    problems = []
    for paragraph in re.split(r"\n\s*\n", text):
        cited = sorted(set(CITED.findall(paragraph)))
        if not cited:
            continue
        values = [
            v for name in cited if (root / name).is_file() for v in _numbers(json.loads((root / name).read_text()))
        ]
        missing = [name for name in cited if not (root / name).is_file()]
        problems += [f"cites {name}, which does not exist" for name in missing]
        for match in FIGURE.finditer(paragraph):
            figure = match.group()
            if not NAME_BEFORE.search(paragraph[: match.start()]) and not _held(figure, values):
                problems.append(f"figure {figure} is not in {', '.join(cited)}")
    return problems


def _numbers(doc: Any) -> Iterator[float]:
    if isinstance(doc, dict):
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            yield from _numbers(item)
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield float(doc)


def _held(figure: str, values: list[float]) -> bool:
    decimals = len(figure.partition(".")[2])
    target = abs(float(figure))
    return any(abs(abs(v) - target) <= 0.5 * 10**-decimals + 1e-12 for v in values)


def layout_gaps(root: Path = ROOT) -> list[str]:
    """Modules and packages of ``refdecoder/`` that docs/architecture.md's layout does not name."""
    text = (root / "docs" / "architecture.md").read_text()
    match = re.search(r"```\nrefdecoder/\n(.*?)```", text, re.S)
    if match is None:
        return ["docs/architecture.md has no module layout (a ``` block starting with refdecoder/)"]
    entries = _entries(match.group(1))
    package = root / "refdecoder"
    problems = []
    for child in sorted(package.iterdir()):
        name = _module_name(child)
        if name is None:
            continue
        if name not in entries:
            problems.append(f"docs/architecture.md: the layout misses refdecoder/{name}")
        elif child.is_dir():
            for inner in sorted(child.iterdir()):
                inner_name = _module_name(inner)
                if inner_name and not re.search(
                    rf"\b{re.escape(inner_name.rstrip('/').removesuffix('.py'))}\b", entries[name]
                ):
                    problems.append(f"docs/architecture.md: the layout of refdecoder/{name} misses {inner_name}")
    return problems


def _module_name(path: Path) -> str | None:
    """``name.py`` or ``name/`` for a public module or package, else None."""
    if path.name.startswith(("_", ".")):
        return None
    if path.is_dir():
        return f"{path.name}/" if (path / "__init__.py").is_file() else None
    return path.name if path.suffix == ".py" else None


def _entries(layout: str) -> dict[str, str]:
    """``{"model.py": description, "blocks/": description with its continuation lines, ...}``."""
    entries: dict[str, str] = {}
    current = None
    for line in layout.splitlines():
        head = re.match(r"  (\S+)\s*(.*)", line)
        if head:
            current = head.group(1)
            entries[current] = head.group(2)
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries


def main() -> int:
    problems = check()
    for problem in problems:
        print(problem)
    print("docs agree with the code and the results" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
