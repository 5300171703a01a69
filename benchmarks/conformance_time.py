"""Run time of the whole conformance suite (``refdecoder.testing.check_backbone``) on a tiny adapter.

    python benchmarks/conformance_time.py [--repeats 3] [--out results.json]

The adapter is the walkthrough's of docs/backbones.md (diffusers ``AutoencoderKL`` decoded frame by frame, its
``build_tiny`` widths), built from the document's own code blocks as ``tests/test_backbone_walkthrough.py`` does.
Reports each check's time and the total of every run (one intra-op thread, the tests' setting), and the median.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import refdecoder  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from refdecoder.testing import Conformance, checks_for  # noqa: E402


def walkthrough_adapter() -> str:
    """Define and register the walkthrough's adapter (code blocks 1-5 and its registration); returns its name."""
    text = (ROOT / "docs" / "backbones.md").read_text()
    section = text[text.index("## Writing an adapter") : text.index("### The contract at a glance")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {"__name__": "walkthrough"}
    exec(compile("".join(blocks[:5]), "docs/backbones.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    refdecoder.register_backbone("sd-image", namespace["ImageVAEAdapter"])
    return "sd-image"


def time_suite(name: str) -> dict[str, float]:
    times, conformance = {}, Conformance(name)
    for check in checks_for(name):
        start = time.perf_counter()
        check(conformance)
        times[check.__name__] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = walkthrough_adapter()
    runs = [time_suite(name) for _ in range(args.repeats)]
    totals = [sum(run.values()) for run in runs]
    for check in runs[0]:
        print(f"{check:28s} {statistics.median(run[check] for run in runs):6.2f} s")
    print(f"{'total':28s} {statistics.median(totals):6.2f} s (runs: {', '.join(f'{t:.2f}' for t in totals)})")
    checks = {check: statistics.median(run[check] for run in runs) for check in runs[0]}
    payload = {"adapter": name, "threads": 1, "total_s": totals, "median_total_s": statistics.median(totals)}
    payload["median_check_s"] = checks
    print(write_json("conformance_time", payload, args.out))


if __name__ == "__main__":
    main()
