"""The checkpoint format: file names, finding checkpoints, checksums, and reading files with clear errors.

A checkpoint is a folder ``<out_dir>/checkpoint-<step, 7 digits>/`` holding ``config.json``
(format, version, stage, step, the model and run configs, the saved parameter names),
``model.safetensors``, ``tokenizer/``, ``optimizer.pt``, ``trainer_state.json``, one
``rng_state_<rank>.pt`` per rank, in stage 1 ``mm_projector.bin`` (LLaVA's names), and
``checksums.json`` (the sha256 of every other file). Reading never unpickles arbitrary objects
(JSON, safetensors, ``torch.load(weights_only=True)``); a missing, truncated, altered or foreign
file is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

FORMAT = "sea-checkpoint"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"
TOKENIZER = "tokenizer"
MM_PROJECTOR = "mm_projector.bin"
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not a sea checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` folder's name."""
    return int(_NAME.fullmatch(Path(path).name).group(1))


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory from: a checkpoint directory, an output directory (its latest
    checkpoint), or ``"latest"`` (the latest under ``out_dir``)."""
    if str(path) == "latest":
        if out_dir is None:
            raise CheckpointError("'latest' needs an output directory (train.out_dir)")
        found = list_checkpoints(out_dir)
        if not found:
            raise CheckpointError(f"latest: no checkpoint-* directories in {out_dir}")
        return found[-1]
    p = Path(path)
    if (p / CONFIG).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or output directory")
    raise CheckpointError(f"{p}: not a sea checkpoint (no {CONFIG}) and no checkpoint-* directories in it")


# --------------------------------------------------------------------------- checksums


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """Compare ``path`` with the checksum its checkpoint recorded (``checksums.json`` beside it,
    or one folder up for the tokenizer's files); checkpoints written before checksums pass."""
    path = Path(path)
    for root in (path.parent, path.parent.parent):
        sums = root / CHECKSUMS
        if sums.is_file():
            try:
                recorded = json.loads(sums.read_text()).get(path.relative_to(root).as_posix())
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise CheckpointError(f"{sums}: not valid JSON; the checkpoint is damaged") from None
            if recorded is not None and recorded != sha256(path):
                raise CheckpointError(
                    f"{path}: checksum mismatch (sha256 differs from {CHECKSUMS}): the file was changed or damaged "
                    f"after it was written"
                )
            return


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path) -> None:
    """Give every file and folder under ``folder`` the modes of a plain ``open`` (0666 / 0777 less
    the umask; safetensors writes 0600), record their sha256 in ``checksums.json`` and fsync all."""
    umask = os.umask(0)
    os.umask(umask)
    sums = {}
    for path in sorted(folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            sums[path.relative_to(folder).as_posix()] = sha256(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    sums_path = folder / CHECKSUMS
    with open(sums_path, "w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        fsync_dir(sub)


# --------------------------------------------------------------------------- reading, with clear errors


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or not written by sea") from None
    verify(path)
    return value


def torch_load(path: Path):
    """Tensors and plain data from a ``torch.save`` file (``weights_only=True``: nothing else unpickles)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle (refused by weights_only), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as tensors and plain data ({first}); the file is truncated or not written by sea"
        ) from None
    verify(path)
    return value


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's ``model.safetensors`` (its metadata must name this format)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("sea") != f"{FORMAT}-v{VERSION}":
                raise CheckpointError(
                    f"{path}: not a sea checkpoint's weights (metadata sea={meta.get('sea')!r}, expected "
                    f"{FORMAT}-v{VERSION!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); the file is truncated or not safetensors"
        ) from None
    verify(path)
    return tensors


def read_info(ckpt: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint, checked to be a sea checkpoint of a known version."""
    path = Path(ckpt) / CONFIG
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{path}: not a sea checkpoint (format {got!r}, expected {FORMAT!r})")
    if info.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {info.get('version')!r}; this sea reads version {VERSION}")
    for key in ("stage", "step", "model", "run"):
        if key not in info:
            raise CheckpointError(f"{path}: key {key!r} is missing")
    return info


def load_tokenizer(ckpt: str | os.PathLike):
    """The checkpoint's tokenizer (``tokenizer/``, each file checked against its checksum)."""
    from transformers import AutoTokenizer

    path = Path(ckpt) / TOKENIZER
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    for file in sorted(path.iterdir()):
        verify(file)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({err})") from None
