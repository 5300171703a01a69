"""The fill rule regenerates the fixture weights exactly (checked against the fixtures' own fill_checks)."""

import json

import pytest

from tests.official_fill import fill_tensor

CASES = ["wan21_refdecoder_small", "videovaeplus_small", "videovaeplus_refdecoder_small"]


@pytest.mark.parametrize("case", CASES)
def test_fill_checks_match(official_fixtures, case):
    checks = json.loads((official_fixtures / case / "config.json").read_text())["fill_checks"]
    assert checks, "fixture lists no fill checks"
    for check in checks:
        t = fill_tensor(check["name"], check["shape"])
        assert t.flatten()[:4].tolist() == pytest.approx(check["first4"], abs=1e-7), check["name"]
        assert t.double().sum().item() == pytest.approx(check["sum_f64"], rel=1e-6, abs=1e-6), check["name"]
