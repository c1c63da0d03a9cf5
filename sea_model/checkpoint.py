"""Checkpoints: save, resolve, load, resume, and LLaVA's ``mm_projector.bin``.

A checkpoint is a directory ``<out_dir>/checkpoint-<step, 7 digits>/``:

* ``config.json``: ``{"format": "sea-checkpoint", "version": 1, "stage", "step", "model"
  (ModelConfig), "run" (the whole RunConfig), "weights" (the saved parameter names)}``;
* ``model.safetensors``: the parameters that cannot be rebuilt from their source: the trainable
  ones (adapter, SEA's log-scale, the LLM in stage 2, the tower with ``vision_lr``) and those of a
  randomly initialised LLM or tower (an ``llm`` config dict, ``vision.pretrained`` None);
* ``tokenizer/``: ``save_pretrained`` of the tokenizer (with ``<image>``);
* ``optimizer.pt`` (parameter-name-keyed full optimizer state), ``trainer_state.json`` (step,
  samples consumed, epoch, elapsed time, world size, scheduler state) and one
  ``rng_state_<rank>.pt`` per rank (torch, CUDA, Python, NumPy and SEA-generator states);
* stage 1: ``mm_projector.bin``, the adapter under LLaVA's names (``model.mm_projector.0.weight``
  ... for ``mlp2x_gelu``), loadable by LLaVA's ``--pretrain_mm_mlp_adapter``; the final one is
  also copied to ``<out_dir>/mm_projector.bin``;
* ``checksums.json``: the sha256 of every other file, verified when a file is loaded (a changed
  or damaged file is a :class:`CheckpointError` naming it; checkpoints without it still load).

Files get the modes a plain ``open`` gives (0666 less the umask) and are fsynced, with their
folder, before the rename. A checkpoint whose weights hold NaN or infinite values is never
written. A failed write (a full disk) removes the partial folder and says how much space a
checkpoint needs.

:class:`Checkpointer` is given a run's stateful objects (model, optimizer, scheduler, SEA's
generator, the trainer's progress) once and saves or restores them by step. Each checkpoint is
written into ``.checkpoint-<step>.tmp/`` and renamed into place (``os.replace``), so a directory
named ``checkpoint-*`` is always complete; only the last ``keep_last`` are kept. Loading never
unpickles arbitrary objects: tensors come from safetensors, state from JSON or
``torch.load(weights_only=True)``; a missing, truncated or foreign file raises
:class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- reading, with clear errors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path) -> None:
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
            if recorded is not None and recorded != _sha256(path):
                raise CheckpointError(
                    f"{path}: checksum mismatch (sha256 differs from {CHECKSUMS}): the file was changed or damaged "
                    f"after it was written"
                )
            return


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or not written by sea") from None
    _verify(path)
    return value


def _torch_load(path: Path):
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle (refused by weights_only), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as tensors and plain data ({first}); the file is truncated or not written by sea"
        ) from None
    _verify(path)
    return value


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
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
    _verify(path)
    return tensors


def read_info(ckpt: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint, checked to be a sea checkpoint of a known version."""
    path = Path(ckpt) / CONFIG
    info = _read_json(path)
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
    from transformers import AutoTokenizer

    path = Path(ckpt) / TOKENIZER
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    for file in sorted(path.iterdir()):
        _verify(file)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({err})") from None


# --------------------------------------------------------------------------- weights


def saved_parameter_names(model) -> list[str]:
    """Trainable parameters, adapter and SEA always, and randomly initialised LLM / tower."""
    cfg = model.model_config
    random_llm = cfg is not None and isinstance(cfg.llm, dict)
    random_tower = cfg is not None and not cfg.vision.pretrained
    names = []
    for n, p in model.named_parameters():  # tied weights appear once
        if (
            p.requires_grad
            or n.startswith(("adapter.", "sea."))
            or (random_llm and n.startswith("llm."))
            or (random_tower and n.startswith("tower."))
        ):
            names.append(n)
    return names


def load_weights(
    model, ckpt: str | os.PathLike, *, require_trainable_for_stage: int | None = None, vision: bool = False
) -> list[str]:
    """Copy ``model.safetensors`` into ``model``'s parameters; returns the names loaded.

    Every tensor must be a parameter of the model with the same shape (``sea.*`` is skipped when
    the model has SEA off). With ``require_trainable_for_stage`` (resume), every parameter that
    stage trains must be in the file."""
    path = Path(ckpt) / WEIGHTS
    tensors = _read_weights(path)
    params = dict(model.named_parameters())
    if any(n.startswith("adapter.") for n in params) and not any(n.startswith("adapter.") for n in tensors):
        raise CheckpointError(
            f"{path}: holds no adapter.* tensors (found {sorted(tensors)[:4]}...); not a sea checkpoint"
        )
    loaded = []
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params:
                if name.startswith("sea.") and model.sea is None:
                    continue  # SEA is off in this model
                raise CheckpointError(
                    f"{path}: tensor {name!r} is not a parameter of this model (a checkpoint of another architecture?)"
                )
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}; the model's is {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            loaded.append(name)
    if require_trainable_for_stage is not None:
        prefixes = (
            ["adapter.", "sea."]
            + (["llm."] if require_trainable_for_stage == 2 else [])
            + (["tower."] if vision else [])
        )
        missing = [n for n in params if n.startswith(tuple(prefixes)) and n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} trained parameter(s) missing, e.g. {missing[0]!r}")
    return loaded


def mm_projector_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors under LLaVA's names: ``adapter.0.weight`` -> ``model.mm_projector.0.weight``."""
    return {"model.mm_projector." + k[len("adapter.") :]: v for k, v in weights.items() if k.startswith("adapter.")}


def load_mm_projector(adapter: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a LLaVA ``mm_projector.bin`` (or ours) into ``adapter``."""
    path = Path(path)
    sd = _torch_load(path)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    sub = {k.split("mm_projector.", 1)[1]: v for k, v in sd.items() if "mm_projector." in k}
    if not sub:
        raise CheckpointError(f"{path}: no mm_projector.* keys (found {sorted(sd)[:4]})")
    try:
        adapter.load_state_dict(sub, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit this adapter: {err}") from None


# --------------------------------------------------------------------------- saving


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _rng_state(sea_generator: torch.Generator) -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sea": sea_generator.get_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
    }


def _set_rng_state(state: dict, sea_generator: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    sea_generator.set_state(state["sea"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, g))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor (FSDP2): this rank's shard


def _param_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return _local(p).device if p is not None else torch.device("cpu")


def _tensors(obj):
    """Every tensor inside nested dicts / lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(folder: Path) -> None:
    """Give every file and folder under ``folder`` the modes of a plain ``open`` (0666 / 0777 less
    the umask; safetensors writes 0600), record their sha256 in ``checksums.json`` and fsync all."""
    umask = os.umask(0)
    os.umask(umask)
    sums = {}
    for path in sorted(folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            sums[path.relative_to(folder).as_posix()] = _sha256(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    sums_path = folder / CHECKSUMS
    with open(sums_path, "w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        _fsync_dir(sub)


def _gather_weights(model, names: list[str], main: bool) -> dict[str, torch.Tensor]:
    """Full tensors on the main rank (FSDP shards are all-gathered on every rank, in order)."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n].detach()
        if hasattr(p, "full_tensor"):  # a DTensor (FSDP2): collective
            p = p.full_tensor()
        if main:
            out[n] = p.to("cpu", copy=True).contiguous()
    return out


class Checkpointer:
    """Saves a run's stateful objects as ``<out_dir>/checkpoint-<step>`` and restores them.

    It is given the objects once (as torchtitan's ``CheckpointManager``): ``model`` (the unwrapped
    model; FSDP2 shards are gathered), ``optimizer``, ``scheduler``, ``generator`` (SEA's sampling
    generator) and ``progress`` (any object with ``state_dict()``/``load_state_dict()`` holding at
    least ``step``, ``samples_seen``, ``elapsed`` and ``world_size``: ``trainer_state.json``), plus
    what describes the run: its ``tokenizer``, ``run_config`` (dict), ``stage``. :meth:`save` is
    collective when ``world > 1`` (the directory must be on a file system every rank sees)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        model,
        optimizer,
        scheduler,
        generator: torch.Generator,
        progress,
        tokenizer,
        run_config: dict,
        stage: int,
        rank: int = 0,
        world: int = 1,
        keep_last: int = 2,
    ):
        self.out_dir, self.keep_last = Path(out_dir), keep_last
        self.model, self.optimizer, self.scheduler, self.generator = model, optimizer, scheduler, generator
        self.progress, self.tokenizer, self.run_config, self.stage = progress, tokenizer, run_config, stage
        self.rank, self.world = rank, world
        self.last: Path | None = None  # the last checkpoint saved

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` atomically (into ``.checkpoint-<step>.tmp``: files written,
        given the usual modes, checksummed, fsynced, then renamed; the folder fsynced), keep the
        last ``keep_last``; returns its path. When ``keep_last`` allows, the oldest checkpoints are
        removed before writing, so the disk needs room for ``keep_last`` of them, not one more.

        Raises :class:`CheckpointError` without writing when a saved parameter is not finite, and
        when a write fails (a full disk: the space needed and free), after removing the partial folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        name = checkpoint_name(step)
        final, tmp = self.out_dir / name, self.out_dir / f".{name}.tmp"
        names = saved_parameter_names(self.model)
        self._check_finite(names, name)
        weights = _gather_weights(self.model, names, self.main)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        error = self._agree(self._attempt(lambda: self._make_room(final, tmp)) if self.main else None)
        if error is None:
            error = self._agree(self._attempt(lambda: self._write(tmp, step, names, weights, optim)))
        if error is None and self.main:
            error = self._attempt(lambda: self._publish(tmp, final))
        error = self._agree(error)
        if error is not None:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(error, name, weights, optim)
        self.last = final
        return final

    @staticmethod
    def _attempt(write) -> OSError | None:
        try:
            write()
        except OSError as err:
            return err
        return None

    def _agree(self, error: OSError | None) -> OSError | None:
        """Every rank's outcome of a write (collective when ``world > 1``): an error if any failed."""
        if self.world == 1:
            return error
        flag = torch.tensor([float(error is not None)], device=_param_device(self.model))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and error is None:
            return OSError(errno.EIO, "another process failed to write its part")
        return error

    def _check_finite(self, names: list[str], name: str) -> None:
        params = dict(self.model.named_parameters())
        bad = [n for n in names if not bool(torch.isfinite(_local(params[n])).all())]
        if self.world > 1:  # FSDP shards differ: agree
            count = torch.tensor([float(len(bad))], device=_param_device(self.model))
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            bad = bad or (["a parameter of another process"] if count.item() else [])
        if bad:
            raise CheckpointError(
                f"not saving {name}: {len(bad)} parameter(s) hold NaN or infinite values (e.g. {bad[0]}): the run "
                f"diverged. Lower train.lr or set train.grad_clip and resume from the last good checkpoint "
                f"({self.last or 'the latest in ' + str(self.out_dir)})"
            )

    def _make_room(self, final: Path, tmp: Path) -> None:
        """Remove partial saves and, when ``keep_last`` allows, the checkpoints the new one will push out."""
        for partial in self.out_dir.glob(".checkpoint-*.tmp"):  # left by a run killed while saving
            shutil.rmtree(partial, ignore_errors=True)
        if self.keep_last >= 2:
            others = [c for c in list_checkpoints(self.out_dir) if c.name != final.name]
            for stale in others[: max(0, len(others) - (self.keep_last - 1))]:
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)

    def _write(self, tmp: Path, step: int, names: list[str], weights: dict, optim: dict) -> None:
        if self.main:
            self._write_main_files(tmp, step, names, weights, optim)
        torch.save(_rng_state(self.generator), tmp / rng_file(self.rank))

    def _write_error(self, err: OSError, name: str, weights: dict, optim: dict) -> CheckpointError:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            need = sum(t.numel() * t.element_size() for t in _tensors([weights, optim]))
            free = shutil.disk_usage(self.out_dir).free
            return CheckpointError(
                f"cannot write {name} in {self.out_dir}: no space left on the device (a checkpoint needs about "
                f"{_mb(need)}, {_mb(free)} free; the partial checkpoint was removed). Free space or lower "
                f"train.keep_last, then --resume latest"
            )
        reason = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        return CheckpointError(f"cannot write {name} in {self.out_dir}: {reason} (the partial checkpoint was removed)")

    def _write_main_files(self, tmp: Path, step: int, names: list[str], weights: dict, optim: dict) -> None:
        from safetensors.torch import save_file

        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "sea": f"{FORMAT}-v{VERSION}"})
        torch.save(optim, tmp / OPTIMIZER)
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / STATE).write_text(json.dumps({**self.progress.state_dict(), "scheduler": sched}, indent=1))
        self.tokenizer.save_pretrained(str(tmp / TOKENIZER))
        if self.stage == 1:
            torch.save(mm_projector_state(weights), tmp / MM_PROJECTOR)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "stage": self.stage,
            "step": step,
            "model": self.run_config["model"],
            "run": self.run_config,
            "weights": names,
        }
        (tmp / CONFIG).write_text(json.dumps(info, indent=1))

    def _publish(self, tmp: Path, final: Path) -> None:
        """Seal ``tmp`` (modes, checksums, fsync), rename it to ``final`` (replacing a checkpoint of
        the same step), fsync the folder, prune old checkpoints."""
        _seal(tmp)
        if final.exists():  # a rerun of this step (after a resume): replace it
            old = self.out_dir / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        for stale in list_checkpoints(self.out_dir)[: -max(1, self.keep_last)]:
            shutil.rmtree(stale)

    def load(self, ckpt: str | os.PathLike) -> dict:
        """Restore optimizer, scheduler, this rank's RNG states and ``progress`` from ``ckpt``
        (weights are loaded before, by :func:`load_weights`); returns ``trainer_state.json``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        ckpt = Path(ckpt)
        state = _read_json(ckpt / STATE)
        for key in ("step", "samples_seen", "elapsed", "world_size", "scheduler"):
            if key not in state:
                raise CheckpointError(f"{ckpt / STATE}: key {key!r} is missing")
        optim = _torch_load(ckpt / OPTIMIZER)
        try:
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=options)
        except Exception as err:
            raise CheckpointError(f"{ckpt / OPTIMIZER}: does not fit this run's optimizer ({err})") from None
        lambdas = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lambdas})
        self._load_rng(ckpt, state["world_size"])
        self.progress.load_state_dict(state)
        return state

    def _load_rng(self, ckpt: Path, saved_world: int) -> None:
        if saved_world != self.world:
            log.warning(
                "%s was written by %d process(es), this run has %d: data order is kept, "
                "random streams are not (not an exact continuation)",
                ckpt,
                saved_world,
                self.world,
            )
        rng_path = ckpt / rng_file(self.rank)
        if rng_path.is_file() or saved_world == self.world:
            rng = _torch_load(rng_path)
            if not isinstance(rng, dict) or not {"torch", "cuda", "sea", "python", "numpy"} <= set(rng):
                raise CheckpointError(f"{rng_path}: not a sea RNG state")
            _set_rng_state(rng, self.generator)


# --------------------------------------------------------------------------- inference


def load_for_inference(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """``(model, tokenizer, info)`` rebuilt from a checkpoint (or output directory): the saved
    model config with SEA off (answering needs no vocabulary), its tokenizer and weights."""
    from .model import ModelConfig, build_model

    ckpt = resolve(path)
    info = read_info(ckpt)
    config = ModelConfig.from_dict(info["model"])
    config.sea.enabled = False
    tokenizer = load_tokenizer(ckpt)
    model, tokenizer = build_model(config, tokenizer, device=device, progress=False)
    load_weights(model, ckpt)
    model.eval()
    return model, tokenizer, info
