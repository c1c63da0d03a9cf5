"""``sea_kernels.cpu._build``: where the C++ kernels are cached, the switches that decide whether
the cpu backend uses them, the first build's message and ``sea build``; ``sea export``'s errors."""

from __future__ import annotations

import logging

import pytest
from torch.utils import cpp_extension

from sea_kernels.cpu import _build


@pytest.fixture
def fresh_cache():
    """``load_extension`` caches per name; each test starts and ends with an empty cache."""
    _build.load_extension.cache_clear()
    yield
    _build.load_extension.cache_clear()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEA_CACHE_DIR", str(tmp_path / "sea"))
    assert _build.cache_root() == tmp_path / "sea" / "extensions"
    monkeypatch.delenv("SEA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == tmp_path / "xdg" / "sea" / "extensions"


def test_sea_no_cpp_disables_the_extensions_with_one_warning(monkeypatch, fresh_cache):
    monkeypatch.setenv("SEA_NO_CPP", "1")
    with pytest.warns(RuntimeWarning, match="SEA_NO_CPP is set"):
        assert _build.load_extension("labels") is None
    assert _build.choose_extension("labels", None) is None  # the PyTorch path
    with pytest.raises(RuntimeError, match="'labels' kernels are not available"):
        _build.choose_extension("labels", True)


def test_use_cpp_false_never_loads(monkeypatch):
    def fail(name):
        raise AssertionError("load_extension must not be called")

    monkeypatch.setattr(_build, "load_extension", fail)
    assert _build.choose_extension("contrastive", False) is None


def test_sources_are_found_in_the_checkout():
    for name in ("labels", "contrastive"):
        code = _build._source(name)
        assert code.startswith(b"//") or b"#include" in code
    with pytest.raises((OSError, ModuleNotFoundError)):  # neither in the checkout nor installed
        _build._source("no_such_kernel")


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """A private cache and a stand-in for torch's compiler (no real build in the test suite)."""
    calls = []

    def load(name, sources, build_directory, **kw):
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found (test)")
        calls.append(name)
        return object()

    monkeypatch.setenv("SEA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SEA_NO_CPP", raising=False)
    monkeypatch.setattr(cpp_extension, "load", load)
    _build.load_extension.cache_clear()
    yield calls
    _build.load_extension.cache_clear()  # later tests load the real extensions again


def test_first_build_is_announced_with_its_time(fake_compiler, capsys, caplog):
    assert _build.load_extension("labels") is not None
    err = capsys.readouterr().err
    assert "compiling the C++ CPU kernels 'labels' once (about a minute" in err
    assert "compiled the C++ CPU kernels 'labels' in" in err
    assert fake_compiler == [n for n in fake_compiler if n.startswith("sea_labels_")] and len(fake_compiler) == 1
    assert "No CUDA runtime" not in caplog.text  # torch's misleading warning is silenced


def test_a_stale_torch_build_lock_is_removed(fake_compiler, tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's ``lock`` file; the next build must not wait on it forever."""
    seen = []

    def load(name, sources, build_directory, **kw):
        seen.append((tmp_path / build_directory).joinpath("lock").exists())
        return object()

    monkeypatch.setattr(cpp_extension, "load", load)
    build_dir = _build.cache_root()
    _build.load_extension("labels")  # creates the cache folder
    _build.load_extension.cache_clear()
    (folder,) = [p for p in build_dir.iterdir() if p.name.startswith("labels_")]
    (folder / "lock").write_text("")  # what a killed build leaves
    assert _build.load_extension("labels") is not None
    assert seen == [False, False]


def test_sea_build_builds_every_extension(fake_compiler, capsys):
    from sea_model.commands.cli import main

    assert main(["build"]) == 0
    out = capsys.readouterr().out
    assert "labels: ready" in out and "contrastive: ready" in out
    assert len(fake_compiler) == 2


def test_sea_export_of_a_foreign_folder_is_one_error_line(tmp_path, capsys):
    from sea_model.commands.cli import main

    assert main(["export", "--format", "llava-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sea export: error:")
