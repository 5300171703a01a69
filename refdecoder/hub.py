"""Hugging Face Hub ids where a path is expected, resolved through ``huggingface_hub`` (cache first).

Wherever refdecoder takes a model path (``refdecoder.load``, ``load_official``, the CLI's ``--vae`` and
``--weights``, the recipe's ``model.vae.path``), an existing local path is used as it is; anything else of the
form ``org/name`` is a Hub repository, spelled as ``huggingface_hub``'s file system spells it:

    org/name                     the repository at its default revision
    org/name@v1.0                a revision (branch, tag or commit)
    org/name/vae                 a subfolder (diffusers' ``subfolder="vae"``)
    org/name@v1.0/vae            both

The files are taken from the local Hub cache when they are there, and downloaded otherwise (not with
``HF_HUB_OFFLINE=1``). A missing id fails with one line that names the id and the cache folder. An id (repository,
revision or subfolder) with a ``.`` or ``..`` part, an empty part or an absolute part is refused, and so is a
resolved path that would lie outside the snapshot (or outside the local folder a ``subfolder`` is added to): a name
never reads from elsewhere on the machine.
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
    shown = os.fspath(path)
    _refuse_unsafe(subfolder, "subfolder", shown, what)
    _refuse_unsafe(revision, "revision", shown, what)
    local = Path(path).expanduser()
    if local.exists():
        return _inside(local, subfolder, shown, what) if subfolder else local
    spec = parse_hub_spec(shown)
    if spec is None:
        raise CheckpointError(f"{what} not found: {shown} does not exist")
    _refuse_unsafe(spec.revision, "revision", shown, what)
    _refuse_unsafe(spec.subfolder, "subfolder", shown, what)
    inner = "/".join(p for p in (spec.subfolder, subfolder) if p)
    patterns = [inner, f"{inner}/*"] if inner else None  # a subfolder (or file) alone, not the whole repository
    folder = _snapshot(spec.repo_id, revision or spec.revision, patterns, shown, what)
    return _inside(folder, inner, shown, what) if inner else folder


def _refuse_unsafe(part: str | None, kind: str, shown: str, what: str) -> None:
    """Refuse a revision or subfolder that could leave the snapshot: absolute, or with an empty, ``.`` or ``..``
    part (``org/name/../../x``, ``org/name@..``)."""
    if part is None:
        return
    pieces = part.replace("\\", "/").split("/")
    if part.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", part) or any(p in ("", ".", "..") for p in pieces):
        raise CheckpointError(
            f"{what} {shown!r}: refused {kind} {part!r} (a Hub id names folders inside its repository: no '..', '.', "
            "empty or absolute parts); give a plain id such as org/name@revision/subfolder, or a local path"
        )


def _inside(folder: Path, inner: str, shown: str, what: str) -> Path:
    """``folder / inner``, refused when it resolves outside ``folder`` (a symlinked folder pointing elsewhere).

    Only folders are resolved: a Hub snapshot's files are symlinks into the cache's ``blobs`` folder by design."""
    target = folder / inner
    check = target if target.is_dir() else target.parent
    if not check.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"{what} {shown!r}: {inner!r} resolves to {check.resolve()}, outside {folder}; refused (a subfolder must "
            "stay inside its repository or folder)"
        )
    return target


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
