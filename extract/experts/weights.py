"""Resolving ``--weights``: "random", a local path, or a hub id (downloaded and cached when online).

Offline with no local copy is one clear error that says how to provide the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from astrea.extract.experts.base import WeightsUnavailableError


def is_random(weights: str) -> bool:
    return weights == "random"


def resolve_file(weights: str, filename: str | None = None, *, expert: str) -> Path:
    """Return a local file for ``weights``: the path itself, ``path/filename``, or a hub download."""
    p = Path(os.path.expanduser(weights))
    if p.exists():
        if p.is_dir():
            if filename is None:
                return p
            if (p / filename).exists():
                return p / filename
            raise WeightsUnavailableError(f"{expert}: {p} is a directory without {filename}")
        return p
    if weights.startswith((".", "/", "~")) or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise WeightsUnavailableError(f"{expert}: weights path {weights!r} does not exist")
    return _hub_download(weights, filename, expert=expert)


def _hub_download(repo_id: str, filename: str | None, *, expert: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if filename is None:
            return Path(snapshot_download(repo_id))
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # offline, unknown repo, gated, ...
        what = f"{repo_id}/{filename}" if filename else repo_id
        raise WeightsUnavailableError(
            f"{expert}: could not get weights {what!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). This machine may be offline. Fix: download them "
            f"on a machine with internet (`huggingface-cli download {repo_id}`), copy the files here and "
            f"pass --weights /path/to/{filename or 'snapshot_dir'}, or set HF_HOME to a cache that holds "
            f"them; or use --weights random for a random-weight run (labelled as such)."
        ) from None
