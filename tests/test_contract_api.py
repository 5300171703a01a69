"""The adapter contract is visible and hard to misuse: registration is idempotent, loading uses the saved backbone,
the reference branch has one signature, no family imports another's private module, and docs/backbones.md's contract
table names every public member of ``BackboneAdapter``."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

import refdecoder
from refdecoder.backbones import registry
from refdecoder.backbones.base import BackboneAdapter
from refdecoder.backbones.wan.wan21 import WanAdapter
from refdecoder.errors import BackboneError
from refdecoder.model import CONFIG_NAME
from refdecoder.testing import Conformance, check_detection, check_save_load_unwrap

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ROOT / "refdecoder" / "backbones"


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


class _WanVariant(WanAdapter):
    """An author's variant beside the original: it fits the same VAEs."""


# --- registration and loading -------------------------------------------------------------------------------------
def test_registering_the_same_class_again_is_a_no_op(clean_registry):
    refdecoder.register_backbone("variant", _WanVariant)
    refdecoder.register_backbone("variant", _WanVariant)
    refdecoder.register_backbone("variant")(_WanVariant)
    assert refdecoder.get_backbone("variant") is _WanVariant
    with pytest.raises(BackboneError, match="already registered"):  # another class under the name still refuses
        refdecoder.register_backbone("variant", WanAdapter)


@pytest.mark.parametrize("entry_points_first", [True, False])
def test_import_time_registration_and_an_entry_point_of_the_same_class_agree(
    tmp_path, monkeypatch, clean_registry, caplog, entry_points_first
):
    (tmp_path / "both_ways.py").write_text(
        "import refdecoder\nfrom tests.test_contract_api import _WanVariant\n\n"
        '@refdecoder.register_backbone("both-ways")\nclass BothWays(_WanVariant):\n    pass\n'
    )
    dist = tmp_path / "both_ways-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: both-ways\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[refdecoder.backbones]\nboth-ways = both_ways:BothWays\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "both_ways", raising=False)
    monkeypatch.setattr(registry, "_entry_points_read", not entry_points_first)
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        if entry_points_first:
            assert "both-ways" in refdecoder.list_backbones()  # listed from the entry point, not imported
        import both_ways  # the decorator runs: first use of the documented walkthrough

        monkeypatch.setattr(registry, "_entry_points_read", False)
        assert refdecoder.get_backbone("both-ways") is both_ways.BothWays
    assert not caplog.records


def _saved(tmp_path: Path, backbone: str) -> Path:
    model = refdecoder.wrap(WanAdapter.build_tiny(), "tiny", backbone=backbone)
    model.save_pretrained(tmp_path)
    model.unwrap()
    return tmp_path


def test_load_uses_the_saved_backbone_when_two_adapters_fit(tmp_path, clean_registry):
    refdecoder.register_backbone("wan2.1-variant", _WanVariant)
    with pytest.raises(BackboneError, match="several backbones match"):
        refdecoder.wrap(WanAdapter.build_tiny(), "tiny")
    folder = _saved(tmp_path, "wan2.1-variant")
    loaded = refdecoder.load(WanAdapter.build_tiny(), folder)
    assert type(loaded.adapter) is _WanVariant and loaded.config.backbone == "wan2.1-variant"
    explicit = refdecoder.RefDecoder.from_pretrained(WanAdapter.build_tiny(), folder, backbone="wan2.1")
    assert type(explicit.adapter) is WanAdapter and explicit.config.backbone == "wan2.1"  # an explicit name wins
    check_detection(Conformance("wan2.1-variant"))  # the suite's checks on the variant
    check_save_load_unwrap(Conformance("wan2.1-variant"))


def test_weights_of_another_family_still_say_so(tmp_path):
    folder = _saved(tmp_path, "wan2.1")
    with pytest.raises(refdecoder.ConfigError, match="config was made for backbone 'wan2.1'"):
        refdecoder.load(refdecoder.get_backbone("qwen-image").build_tiny(), folder)


def test_a_saved_backbone_that_is_not_registered_names_what_to_install(tmp_path):
    folder = _saved(tmp_path, "wan2.1")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "backbone": "my-vae"}))
    with pytest.raises(BackboneError) as err:
        refdecoder.load(WanAdapter.build_tiny(), folder)
    message = str(err.value)
    assert "'my-vae'" in message and "'refdecoder.backbones'" in message and "\n" not in message
    assert type(refdecoder.load(WanAdapter.build_tiny(), folder, backbone="wan2.1").adapter) is WanAdapter


# --- one signature for the reference branch -----------------------------------------------------------------------
def test_no_builtin_adapter_widens_the_reference_branch():
    import inspect

    base = list(inspect.signature(BackboneAdapter.run_stage_on_reference).parameters)
    for name in refdecoder.list_backbones():
        method = refdecoder.get_backbone(name).run_stage_on_reference
        assert list(inspect.signature(method).parameters) == base, name
        assert not hasattr(refdecoder.get_backbone(name), "reference_stage"), name


def test_an_adapter_of_the_older_contract_keeps_working_or_says_what_to_rename():
    class TwoArguments(_WanVariant):
        def run_stage_on_reference(self, index, reference):  # before ctx was passed
            return WanAdapter.run_stage_on_reference(self, index, reference)

    adapter = TwoArguments(WanAdapter.build_tiny())
    features = torch.randn(1, adapter.stages()[0].channels, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.run_stage_on_reference(0, features, None), adapter.run_stage_on_reference(0, features)
        )

    with pytest.raises(BackboneError, match="rename it") as err:

        class OldHook(_WanVariant):
            def reference_stage(self, index, reference, ctx):
                return reference

    assert "run_stage_on_reference(index, reference, ctx=None)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BackboneError, match="replaced by exact_streaming = False"):

        class OneWindow(_WanVariant):
            one_window = True

    with pytest.raises(BackboneError, match="instead of adding parameters"):

        class Widened(_WanVariant):
            def run_stage_on_reference(self, index, reference, ctx=None, temb=None):
                return reference


def test_exact_streaming_false_decodes_one_window_in_the_base():
    class Whole(_WanVariant):
        exact_streaming = False

    assert Whole(WanAdapter.build_tiny()).plan_windows(7, 2) == [(0, 7)]
    assert _WanVariant(WanAdapter.build_tiny()).plan_windows(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_the_default_encode_is_the_posterior_mode_or_a_one_line_refusal():
    vae = WanAdapter.build_tiny().eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(_WanVariant(vae).encode(video), vae.encode(video).latent_dist.mode())

    class Plain(torch.nn.Module):
        def encode(self, video):
            return video

    adapter = _WanVariant.__new__(_WanVariant)
    BackboneAdapter.__init__(adapter, Plain())
    with pytest.raises(BackboneError, match="override encode") as err:
        adapter.encode(video)
    assert "\n" not in str(err.value)


# --- no family imports another family's private module -----------------------------------------------------------
SHARED = {"__init__", "base", "registry", "diffusers_video", "_diffusers"}  # refdecoder/backbones/*.py for all


def _family(parts: list[str]) -> str | None:
    """The family of module ``refdecoder.backbones.<parts>``: its subpackage or module; None for shared modules."""
    return None if not parts or parts[0] in SHARED else parts[0]


def private_imports(module: str, source: str) -> list[str]:
    """Imports in ``source`` (module ``refdecoder.backbones.<module>``) of another family's private module or name."""
    here = module.split(".")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = ["refdecoder", "backbones", *here][: -node.level]
                base = ".".join([*package, *([base] if base else [])])
            targets = [(base, alias.name) for alias in node.names]
        else:
            continue
        for target, name in targets:
            parts = target.split(".")
            if parts[:2] != ["refdecoder", "backbones"]:
                continue
            inner = parts[2:] + ([name] if name else [])
            family = _family(inner)
            if family is None or family == _family(here):
                continue
            if any(part.startswith("_") and part != "__init__" for part in inner):
                found.append(f"{module} imports {'.'.join(['refdecoder.backbones', *inner])}")
    return found


def test_no_family_imports_another_familys_private_module():
    violations = []
    for path in sorted(BACKBONES.rglob("*.py")):
        module = ".".join(path.relative_to(BACKBONES).with_suffix("").parts)
        violations += private_imports(module, path.read_text())
    assert violations == []


@pytest.mark.parametrize(
    "module, source, caught",
    [
        ("cogvideox", "from refdecoder.backbones.wan._diffusers import check_internals", True),
        ("ltx_video", "import refdecoder.backbones.wan._diffusers", True),
        ("hunyuan_video15", "from refdecoder.backbones.wan.family import _upsampler", True),
        ("wan.family", "from ..videovaeplus._private import x", True),
        ("wan.family", "from refdecoder.backbones.wan._diffusers import check_internals", False),  # its own
        ("cogvideox", "from refdecoder.backbones._diffusers import class_reason", False),  # shared
        ("cogvideox", "from refdecoder.backbones.wan import WanAdapter", False),  # public
    ],
)
def test_the_private_import_check_catches_what_it_should(module, source, caught):
    assert bool(private_imports(module, source)) == caught


# --- the contract table -------------------------------------------------------------------------------------------
def _table_members() -> set[str]:
    text = (ROOT / "docs" / "backbones.md").read_text()
    section = text[text.index("### The contract at a glance") :]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {re.match(r"\w+", cell).group() for row in rows for cell in re.findall(r"`([^`]+)`", row.split("|")[1])}


def public_members(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_contract_table_names_every_public_member():
    missing = public_members(BackboneAdapter) - _table_members()
    assert not missing, f"docs/backbones.md's contract table lacks {sorted(missing)}"


def test_the_table_check_notices_a_new_member():
    class Extended(BackboneAdapter):
        def brand_new_hook(self):
            return None

    assert "brand_new_hook" in public_members(Extended) - _table_members()
