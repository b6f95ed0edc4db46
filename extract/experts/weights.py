"""``--weights`` for every expert, decided here once: what it names, how a random init is seeded, how a
checkpoint's keys are checked, and what the spec records of the file.

- :func:`choose` turns the text into a typed :class:`Weights`: ``random`` (seeded init), a ``file``, a
  ``directory``, or a ``hub`` id (downloaded and cached when online; offline with no local copy is one
  clear error that says how to provide the weights). A path that does not exist is refused here.
- :func:`check_keys` is the one strict check: a checkpoint with missing, unexpected or wrongly shaped
  parameters is refused, naming them, whichever library loaded it (torch's own message is parsed back
  into names by :func:`keys_from_load_error`; transformers' loading info is passed in as lists). A
  model must never run with a parameter left at an unseeded random init.
- :func:`files_sha256` is the checkpoint file's own hash, recorded in the spec beside the state-dict
  hash (provenance: which file was read; the fingerprint follows the state dict).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from astrea.extract.experts.base import WeightsUnavailableError

RANDOM = "random"
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_random(weights: str) -> bool:
    return weights == RANDOM


def looks_like_path(weights: str) -> bool:
    """Text that can only mean a local path (never a hub id): refused when it does not exist."""
    return weights.startswith((".", "/", "~")) or weights.endswith(_PATH_SUFFIXES)


@dataclass(frozen=True)
class Weights:
    """What ``--weights`` names. ``path`` is set for ``file`` and ``directory``, ``hub_id`` (without an
    ``hf-hub:`` prefix) for ``hub``; ``seed`` seeds a ``random`` init."""

    kind: Literal["random", "file", "directory", "hub"]
    given: str
    seed: int = 0
    path: Path | None = None
    hub_id: str | None = None

    @property
    def random(self) -> bool:
        return self.kind == "random"

    def refuse_hub_for_small(self, expert: str, arch_name: str, real_archs: Iterable[str], *,
                             local: str = "a local checkpoint") -> None:
        """Test-size archs have no published weights: a hub id for one is an error naming the real archs."""
        if self.kind == "hub":
            raise WeightsUnavailableError(
                f"{expert}: arch {arch_name!r} is a test-size model: weights must be 'random' or {local}, not the "
                f"hub id {self.hub_id!r}; for hub weights pick a real arch ({', '.join(real_archs)})"
            )


def choose(weights: str, *, seed: int, expert: str) -> Weights:
    """``--weights`` text -> :class:`Weights`; a path-like value that does not exist is refused."""
    if is_random(weights):
        return Weights("random", weights, seed=seed)
    p = Path(os.path.expanduser(weights))
    if p.is_file():
        return Weights("file", weights, seed=seed, path=p)
    if p.is_dir():
        return Weights("directory", weights, seed=seed, path=p)
    if looks_like_path(weights):
        raise WeightsUnavailableError(f"{expert}: weights path {weights!r} does not exist")
    hub = weights[len("hf-hub:"):] if weights.startswith("hf-hub:") else weights
    return Weights("hub", weights, seed=seed, hub_id=hub)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global torch RNG for model init without leaking the seed into the caller's RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- files ----------------------------------------------------------------------------------------
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
    if looks_like_path(weights):
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


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth", "*.pt")


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint files of a snapshot directory (sharded ones included), sorted by name."""
    return sorted({f for pat in _WEIGHT_FILES for f in directory.glob(pat) if f.is_file()})


def files_sha256(paths: Iterable[Path]) -> str:
    """sha256 of the checkpoint file(s) as read from disk: ``HEX`` for one file, ``name=HEX,...`` for
    several (a sharded snapshot); "" for none (random weights)."""
    out = []
    paths = sorted(Path(p) for p in paths)
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out.append((p.name, h.hexdigest()))
    if len(out) == 1:
        return out[0][1]
    return ",".join(f"{n}={d}" for n, d in out)


# -- the one strict check -------------------------------------------------------------------------
def check_keys(expert: str, source: Any, *, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               mismatched: Iterable[str] = (), hint: str = "", error: type[WeightsUnavailableError] = WeightsUnavailableError) -> None:
    """Refuse a checkpoint whose parameters do not match the model, naming them (a few of each kind,
    with the counts): a missing one would run at a random, unseeded init; an unexpected one means the
    file is for another model."""
    text = describe_keys(missing=missing, unexpected=unexpected, mismatched=mismatched)
    if text:
        raise error(f"{expert}: checkpoint {source} does not match the model: {text}" + (f". {hint}" if hint else ""))


def describe_keys(*, missing: Iterable[str] = (), unexpected: Iterable[str] = (), mismatched: Iterable[str] = ()) -> str:
    """"N missing keys (e.g. [...]); M unexpected keys (e.g. [...])", or "" when all three are empty."""
    missing, unexpected, mismatched = sorted(set(missing)), sorted(set(unexpected)), list(mismatched)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if mismatched:
        parts.append(f"{len(mismatched)} with wrong shapes (e.g. {mismatched[:3]})")
    return "; ".join(parts)


_KEYS_RE = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.?\s*$")
_SHAPE_RE = re.compile(r"size mismatch for ([^:]+): copying a param with shape (.*?) from checkpoint, "
                       r"the shape in current model is (.*?)\.?\s*$")


def keys_from_load_error(e: BaseException) -> dict[str, list[str]] | None:
    """torch's ``load_state_dict(strict=True)`` error -> ``{"missing", "unexpected", "mismatched"}``
    (the names its multi-line message lists), or None when ``e`` is some other error."""
    text = str(e)
    if "Error(s) in loading state_dict" not in text:
        return None
    out: dict[str, list[str]] = {"missing": [], "unexpected": [], "mismatched": []}
    for line in text.splitlines():
        line = line.strip()
        m = _KEYS_RE.search(line)
        if m:
            names = [n.strip().strip('"') for n in m.group(2).split(",") if n.strip()]
            out["missing" if m.group(1) == "Missing" else "unexpected"].extend(names)
            continue
        s = _SHAPE_RE.search(line)
        if s:
            out["mismatched"].append(f"{s.group(1)}: file {s.group(2)} vs model {s.group(3)}")
    return out


def load_state_dict_strict(model: Any, state: dict[str, Any], *, expert: str, source: Any, hint: str = "") -> None:
    """``model.load_state_dict(state)``, refused through :func:`check_keys` when it does not fit."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        keys = keys_from_load_error(e)
        if keys is None:
            raise
        check_keys(expert, source, **keys, hint=hint)
        raise
    check_keys(expert, source, missing=result.missing_keys, unexpected=result.unexpected_keys, hint=hint)


# -- transformers snapshots (grounding_dino, sam) ---------------------------------------------------
def snapshot_dir(w: Weights, *, expert: str, arch_name: str, has_hub: bool, real_archs: Iterable[str],
                 hub_hint: str, holds: str) -> Path:
    """The transformers snapshot directory ``w`` names: the directory itself, or the hub id's snapshot
    (downloaded; test-size archs have none). A file is refused: these experts read a whole snapshot."""
    if w.kind == "file":
        raise WeightsUnavailableError(
            f"{expert}: weights {w.given!r} is a file; pass a transformers snapshot directory holding {holds} "
            f"(`huggingface-cli download {hub_hint} --local-dir DIR`)"
        )
    if w.kind == "directory":
        return w.path
    if not has_hub:
        w.refuse_hub_for_small(expert, arch_name, real_archs, local="a local snapshot directory")
    return resolve_file(w.hub_id, None, expert=expert)  # snapshot_download; offline -> one clear error


def from_pretrained_strict(cls: Any, path: Path, *, expert: str, hint: str = "") -> Any:
    """``cls.from_pretrained(path)``, refused through :func:`check_keys` when the snapshot lacks a
    parameter (transformers would initialise it at random, unseeded, and only log it) or holds one the
    model does not have."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    mismatched = [" ".join(str(x) for x in m) if isinstance(m, (tuple, list)) else str(m)
                  for m in info.get("mismatched_keys", [])]
    check_keys(expert, path, missing=info.get("missing_keys", []), unexpected=info.get("unexpected_keys", []),
               mismatched=mismatched, hint=hint)
    return model
