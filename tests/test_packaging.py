"""The package installs what it needs, CI runs what the README says, and sea_kernels stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_sea_kernels_does_not_pull_model_libraries():
    code = (
        "import sys, sea_kernels, sea_model, sea_model.commands.cli; "
        "print(sorted(m for m in ('transformers', 'open_clip', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_installed_package_ships_the_cpp_sources():
    """Outside the checkout, the C++ sources are found in the installed package (sea_kernels.csrc)."""
    names = sorted(p.name for p in (ROOT / "csrc").glob("*.cpp"))
    code = (
        "import sys; from importlib import resources; "
        f"print(all(resources.files('sea_kernels.csrc').joinpath(n).is_file() for n in {names!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "True", out.stderr


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install ".[dev]" && pytest -n auto ' in readme
    assert 'pip install --progress-bar off ".[dev]"' in ci and "\npytest -n auto\n" in ci


def test_cli_selfcheck_help():
    out = subprocess.run(
        [sys.executable, "-m", "sea_model.commands.cli", "selfcheck", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "--interpret" in out.stdout


def test_every_subpackage_is_installed():
    """A package folder missing from pyproject's list would be left out of the wheel (sea lab once was)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("sea_kernels", "sea_model")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
