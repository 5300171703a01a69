"""Hugging Face Hub ids where a path is expected, resolved through ``huggingface_hub`` (cache first).

Wherever refdecoder takes a model path (``refdecoder.load``, ``load_official``, the CLI's ``--vae`` and
``--weights``, the recipe's ``model.vae.path``), an existing local path is used as it is; anything else of the
form ``org/name`` is a Hub repository, spelled as ``huggingface_hub``'s file system spells it:

    org/name                     the repository at its default revision
    org/name@v1.0                a revision (branch, tag or commit)
    org/name/vae                 a subfolder (diffusers' ``subfolder="vae"``)
    org/name@v1.0/vae            both

The files are taken from the local Hub cache when they are there, and downloaded otherwise (not with
``HF_HUB_OFFLINE=1``). A missing id fails with one line that names the id and the cache folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from refdecoder.errors import CheckpointError

__all__ = ["HubSpec", "parse_hub_spec", "resolve_path"]

# A repo id is `namespace/name`: letters, digits, '-', '_', '.', not starting with '.' or '-'.
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_SPEC = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^/]+))?(?:/(?P<subfolder>.+))?$")


class HubSpec(NamedTuple):
    """A Hub reference: ``repo_id`` (``org/name``), and the optional ``revision`` and ``subfolder``."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None


def parse_hub_spec(text: str) -> HubSpec | None:
    """``"org/name@rev/sub"`` -> ``HubSpec("org/name", "rev", "sub")``; None when ``text`` cannot be a repo id."""
    if text.startswith((".", "/", "~")) or "\\" in text or "//" in text:
        return None
    match = _SPEC.match(text)
    if match is None or match.group("repo").endswith((".", "-")):
        return None
    return HubSpec(match.group("repo"), match.group("revision"), match.group("subfolder"))


def resolve_path(
    path: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    what: str = "model",
) -> Path:
    """A local file or folder for ``path``: the path itself when it exists, else a Hub snapshot folder.

    Args:
        path: a local path, or a Hub reference (see the module docstring).
        revision: Hub revision; overrides one given in ``path``.
        subfolder: folder inside the local path or the repository (diffusers' ``subfolder``).
        what: what is being loaded, for messages (``"VAE"``, ``"RefDecoder weights"``).

    Raises:
        CheckpointError: a missing local path that is no repo id, or a repo id that is neither cached nor
            downloadable; the message names the id and the cache folder.
    """
    local = Path(path).expanduser()
    if local.exists():
        return local / subfolder if subfolder else local
    spec = parse_hub_spec(os.fspath(path))
    if spec is None:
        raise CheckpointError(f"{what} not found: {os.fspath(path)} does not exist")
    inner = "/".join(p for p in (spec.subfolder, subfolder) if p)
    patterns = [inner, f"{inner}/*"] if inner else None  # a subfolder (or file) alone, not the whole repository
    folder = _snapshot(spec.repo_id, revision or spec.revision, patterns, os.fspath(path), what)
    return folder / inner if inner else folder


def _snapshot(repo_id: str, revision: str | None, patterns: list[str] | None, shown: str, what: str) -> Path:
    """The snapshot folder of ``repo_id``: from the cache, or downloaded when that is allowed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache, rev = constants.HF_HUB_CACHE, f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{what} {shown!r}: no local path of that name, and the Hugging Face repository {repo_id}{rev} is not "
            f"in the cache {cache} (downloads are off: HF_HUB_OFFLINE=1); download it there first or give a path"
        ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{what} {shown!r}: no local path of that name, and the Hugging Face repository {repo_id}{rev} is "
            f"neither in the cache {cache} nor downloadable ({type(err).__name__}: {reason})"
        ) from None
