"""The data layer keeps its optional dependencies lazy."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_data_layer_and_the_cli_loads_no_optional_dependency():
    code = (
        "import sys, refdecoder, refdecoder.data, refdecoder.cli; refdecoder.cli.build_parser(); "
        "print(sorted(m for m in ('av', 'webdataset', 'skvideo', 'braceexpand') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
