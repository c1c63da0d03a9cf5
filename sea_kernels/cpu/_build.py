"""Compile the C++ kernels of ``csrc/`` on first use and cache them.

``load_extension(name)`` builds ``csrc/<name>.cpp`` with ``torch.utils.cpp_extension.load``
(OpenMP, -O3) into a cache folder keyed by the source, torch version and machine, and returns the
module, or ``None`` when it cannot be built (no compiler, no ninja, ``SEA_NO_CPP=1``). A ``None``
is announced once per extension; callers then use their chunked PyTorch path.

A build (the first use on a machine: a compile of each extension) is announced on stderr
before it starts and with its elapsed time when it ends, so that a first training step does
not look hung; ``sea build`` (:func:`build_all`) does it ahead of time, for images and CI.
torch's "No CUDA runtime is found" warning, which says nothing about these CPU kernels, is
silenced while they are built.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path

import torch


def cache_root() -> Path:
    base = os.environ.get("SEA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sea"
    )
    return Path(base) / "extensions"


@cache
def load_extension(name: str):
    if os.environ.get("SEA_NO_CPP", "0") not in ("", "0"):
        _announce(name, "SEA_NO_CPP is set")
        return None
    code = _source(name)
    key = hashlib.sha256(
        code
        + torch.__version__.encode()
        + platform.machine().encode()
        + platform.python_version().encode()
        + _cpu_flags().encode()  # built with -march=native: one build per instruction set
        + torch.__file__.encode()  # one build per installation (include paths differ between venvs)
    ).hexdigest()[:16]
    build_dir = cache_root() / f"{name}_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    src_path = build_dir / f"{name}.cpp"
    if not src_path.exists() or src_path.read_bytes() != code:
        src_path.write_bytes(code)
    fresh = not (build_dir / f"sea_{name}_{key}.so").exists()
    if fresh:
        _say(f"compiling the C++ CPU kernels '{name}' once (about a minute; cached in {build_dir.parent})")
    start = time.perf_counter()
    try:
        with _quiet_cuda_warning(), _build_lock(build_dir):
            from torch.utils import cpp_extension

            module = cpp_extension.load(
                name=f"sea_{name}_{key}",
                sources=[str(src_path)],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-fopenmp", "-march=native"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        if fresh:
            _say(f"compiled the C++ CPU kernels '{name}' in {time.perf_counter() - start:.0f} s")
        return module
    except Exception as exc:  # no compiler, no ninja, or a build error: fall back, loudly once
        _announce(name, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
        return None


EXTENSIONS = ("labels", "contrastive")  # csrc/<name>.cpp


def build_all() -> dict[str, bool]:
    """Build (or find in the cache) every C++ extension; returns name -> whether it is available."""
    return {name: load_extension(name) is not None for name in EXTENSIONS}


def _say(message: str) -> None:
    print(f"sea_kernels: {message}", file=sys.stderr, flush=True)


@contextmanager
def _quiet_cuda_warning():
    """torch.utils.cpp_extension logs "No CUDA runtime is found" on import on CPU-only machines."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    if not torch.cuda.is_available():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _build_lock(build_dir: Path):
    """One build of a cache folder at a time, across processes, released by the OS on a crash.

    torch's own build lock is a plain file (``build_dir/lock``) that a process killed mid-build
    leaves behind, and every later build then waits on it forever. Whoever holds this ``flock``
    is the only sea process building in ``build_dir``, so a ``lock`` file found then is stale.
    """
    import fcntl

    with open(build_dir / ".sea-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def choose_extension(name: str, use_cpp: bool | None):
    """The extension for a call: ``None`` -> the extension when it builds (else None, the PyTorch
    path), ``False`` -> None, ``True`` -> the extension or ``RuntimeError``."""
    if use_cpp is False:
        return None
    ext = load_extension(name)
    if ext is None and use_cpp:
        raise RuntimeError(f"the C++ '{name}' kernels are not available")
    return ext


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _source(name: str) -> bytes:
    """The C++ source: from the checkout's csrc/ when running from source, else from the installed package."""
    checkout = Path(__file__).resolve().parents[2] / "csrc" / f"{name}.cpp"
    if checkout.is_file():
        return checkout.read_bytes()
    return resources.files("sea_kernels.csrc").joinpath(f"{name}.cpp").read_bytes()


def _announce(name: str, why: str) -> None:
    warnings.warn(
        f"sea_kernels: the C++ '{name}' kernels are not available ({why}); "
        "the cpu backend uses its chunked PyTorch path (same results, slower).",
        RuntimeWarning,
        stacklevel=3,
    )
