"""The adapter walkthrough of docs/backbones.md runs as written, and its adapter passes the conformance suite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from refdecoder.backbones import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def _walkthrough_code() -> str:
    text = DOC.read_text()
    section = text[text.index("## Writing an adapter") : text.index("### The contract at a glance")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 6, f"expected the walkthrough's 6 python blocks, found {len(blocks)}"
    return "".join(blocks)


def test_walkthrough_adapter_registers_and_conforms(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace: dict = {"__name__": "walkthrough"}
    exec(compile(_walkthrough_code(), str(DOC), "exec"), namespace)  # noqa: S102 - the documentation's own code
    ran = namespace["ran"]
    assert ran[0] == "check_detection" and "check_tiling" not in ran
    contract = {"check_latent_conventions", "check_hook_shapes", "check_decoder_parameters", "check_reference_branch"}
    assert contract | {"check_identity_at_init", "check_output_clamp", "check_bad_inputs"} <= set(ran)
    assert registry.get_backbone("sd-image") is namespace["ImageVAEAdapter"]
    assert "check_detection" in capsys.readouterr().out
