"""A run's configuration from its layers: defaults < the model config of ``init_from`` (or the whole
saved run of ``resume``) < a YAML file < dotted command-line overrides.

A YAML file gives any of the sections ``model``, ``data`` and ``train`` (:mod:`sea_model.config`);
every field can then be overridden on the command line by its dotted name::

    sea train --stage 1 --config configs/stage1.yaml --train.lr 1e-3 --model.sea.enabled false \\
        --data.json_path data/blip_laion_cc_sbu_558k.json --model.llm.hidden_size 64

Values are read as YAML scalars (``false``, ``null``, ``1e-3``, ``[1, 2]``) and converted to the
field's type by :func:`sea_model.config.from_dict`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from ..config import RunConfig
from .checkpoint import read_info, resolve

CONFIG_FILE = "run_config.yaml"  # the resolved configuration, in each output folder


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--train.lr", "1e-3", "--model.sea.enabled=false"]`` -> ``[("train.lr", "1e-3"), ...]``."""
    pairs, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ValueError(f"expected --section.key VALUE; got {a!r}")
        if "=" in a:
            key, value = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{a}: missing value")
            key, value = a[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def set_dotted(d: dict, key: str, raw: str) -> None:
    """Set ``d[a][b][c] = yaml(raw)`` for ``key = "a.b.c"`` (only through existing mappings)."""
    import yaml

    parts = key.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            raise ValueError(f"unknown key --{key}: {'.'.join(parts[: i + 1])} does not exist")
        if not isinstance(node[p], dict):
            raise ValueError(f"--{key}: {'.'.join(parts[: i + 1])} is {node[p]!r}, not a section")
        node = node[p]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_file(path: str | os.PathLike) -> dict:
    """The sections of a YAML configuration file; a missing or malformed file is a clear error."""
    import yaml

    try:
        file_dict = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such file: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: a directory, not a YAML file") from None
    if not isinstance(file_dict, dict):
        raise ValueError(f"{path}: expected a mapping with sections model, data, train; got {type(file_dict).__name__}")
    return file_dict


def load_run_config(path: str | os.PathLike | None = None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """Defaults < model config of ``init_from`` / saved run of ``resume`` < YAML file < overrides."""
    file_dict = _read_file(path) if path is not None else {}
    # Where does this run start from? (Looked up before the layers are merged.)
    probe = _merge(asdict(RunConfig()), file_dict)
    for k, v in overrides:
        if k in ("train.resume", "train.init_from", "train.out_dir"):
            set_dotted(probe, k, v)
    base = asdict(RunConfig())
    t = probe["train"]
    if t.get("resume"):
        saved = read_info(resolve(t["resume"], t.get("out_dir")))
        base = _merge(base, saved.get("run", {}))
        base["train"].update(resume=None, stop_after=None, overwrite=False)  # how that one ran, not what this one does
    elif t.get("init_from") and not str(t["init_from"]).endswith(".bin"):
        saved = read_info(resolve(t["init_from"]))
        base["model"] = saved["model"]
    merged = _merge(base, file_dict)
    for k, v in overrides:
        set_dotted(merged, k, v)
    return RunConfig.from_dict(merged)


def write_run_config(cfg: RunConfig, out_dir: Path) -> None:
    """``<out_dir>/run_config.yaml``: the resolved configuration of the run writing there."""
    import yaml

    (Path(out_dir) / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
