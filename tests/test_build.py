"""``sea_kernels.cpu._build``: where the C++ kernels are cached, and the switches that decide whether
the cpu backend uses them."""

from __future__ import annotations

import pytest

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
