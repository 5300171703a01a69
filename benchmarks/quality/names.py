"""Variant names before the short ones of ``recipes/configs/quality_small.yaml``, and how they are read now.

The committed results in ``benchmarks/results/`` keep the names they were recorded with; readers show them under
the current names (:func:`with_current_names`). A renamed variant given on the command line still works, with a
one-line deprecation warning; a removed one (configured, but never run to a committed result) is an error.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from refdecoder.errors import ConfigError

logger = logging.getLogger("refdecoder.benchmarks.quality_small")

# Old name -> current name. The old names spelled the whole difference to the `tiny` preset; the current ones
# name what differs from `finetune.base` (radius 2 with the locality prior, 4 heads x 64, one token per 8x8 px).
RENAMED = {
    "refdecoder_r0": "r0",
    "refdecoder_r0_still": "r0_still",
    "refdecoder_r2_prior": "r2",
    "refdecoder_global_prior": "global",
    "refdecoder_r2_prior_still": "r2_still",
    "refdecoder_r2_prior_drop03": "drop03",
    "refdecoder_r2_prior_s1": "slope1",
    "refdecoder_r2_prior_ps": "ps",
    "refdecoder_r2_prior_lr": "lr_high",
    "refdecoder_r2_prior_ps_lr3": "ps_lr_low",
    "refdecoder_r2_prior_ps_still": "ps_still",
    "refdecoder_r2_prior_ps_still_s2d": "s2d_still",
    "refdecoder_r2_prior_ps_s2d": "s2d",
    "refdecoder_r2_prior_ps_s2d_corr": "corr",
}
# Ablations that were configured but have no committed result (issue 29): removed rather than kept untested.
REMOVED = (
    "refdecoder_r2v0_prior",
    "refdecoder_r4_prior",
    "refdecoder_r2_prior_fine",
    "refdecoder_r2_prior_far",
    "refdecoder_r2_prior_ps_s2d_corr_still",
    "refdecoder_r2_prior_ps_s2d_corr_far",
)
# An old name standing alone or inside a longer label ("static_psnr_vs_refdecoder_r0_still", "a - b"); longest
# first, and never followed by more of a name, so `refdecoder_r0` does not match inside `refdecoder_r0_still`.
_OLD = re.compile(
    r"(?<![A-Za-z0-9])(" + "|".join(sorted(map(re.escape, RENAMED), key=len, reverse=True)) + r")(?![A-Za-z0-9_])"
)


def current_name(name: str) -> str:
    """The current name of a variant given by the user; an old name is mapped with a deprecation warning."""
    if name in REMOVED:
        raise ConfigError(
            f"variant {name!r} was removed (it has no committed result); see benchmarks/quality/names.py"
        )
    if name in RENAMED:
        logger.warning("variant name %r is deprecated; use %r", name, RENAMED[name])
        return RENAMED[name]
    return name


def rename(text: str) -> str:
    """``text`` with every old variant name in it replaced by the current one."""
    return _OLD.sub(lambda match: RENAMED[match.group(1)], text)


def with_current_names(doc: Any) -> Any:
    """A copy of a result document (or part of one) with old variant names in keys and strings made current."""
    if isinstance(doc, dict):
        return {rename(k) if isinstance(k, str) else k: with_current_names(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [with_current_names(v) for v in doc]
    return rename(doc) if isinstance(doc, str) else doc
