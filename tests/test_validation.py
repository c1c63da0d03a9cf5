"""Every bad input the contract lists raises the documented error, naming the argument."""

from __future__ import annotations

import pytest
import torch

from sea_kernels import available_backends, backends, cosine_topk, dispatch, patch_labels

P = torch.randn(2, 16, 8)
V = torch.randn(20, 8)
NAN = torch.full((2, 16, 8), float("nan"))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 7)), ValueError, "feature dimension"),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8), 0), ValueError, "k must be in 1..5"),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8), 6), ValueError, "k must be in 1..5"),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8), 2.0), TypeError, "k must be an int"),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(2, 5, 8)), ValueError, "vocab must have 2"),
        (lambda: cosine_topk(torch.tensor(1.0), torch.randn(5, 8)), ValueError, "patches must have at least 1"),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8).long()), TypeError, "vocab must be float"),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8).to("meta"), 3), ValueError, "one device"),
        (
            lambda: cosine_topk(torch.tensor([[float("inf")] * 8]), torch.randn(5, 8), 3),
            ValueError,
            "patches must be finite",
        ),
        (lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8), 3, negate=1), TypeError, "negate"),
        (
            lambda: cosine_topk(torch.randn(3, 8), torch.randn(5, 8), 3, backend="gpu"),
            ValueError,
            "backend must be one of",
        ),
        (lambda: patch_labels(torch.randn(16, 8), V), ValueError, "patches must have 3"),
        (lambda: patch_labels(torch.randn(2, 15, 8), V), ValueError, "perfect square"),
        (lambda: patch_labels(P, V, grid=(4, 5)), ValueError, "does not match P = 16"),
        (lambda: patch_labels(P, V, grid=(0, 16)), ValueError, "grid"),
        (lambda: patch_labels(P, V, grid=4), TypeError, "grid"),
        (lambda: patch_labels(P, V, top_n=21), ValueError, "top_n must be in 1..20"),
        (lambda: patch_labels(P, V, top_n=0), ValueError, "top_n"),
        (lambda: patch_labels(P, V, window=0), ValueError, "window"),
        (lambda: patch_labels(P, torch.randn(20, 9)), ValueError, "feature dimension"),
        (
            lambda: patch_labels(P, V, uniforms=torch.rand(2, 4)),
            ValueError,
            r"uniforms must have shape \(B, n_windows, 2\)",
        ),
        (lambda: patch_labels(P, V, uniforms=torch.rand(2, 5, 2)), ValueError, "uniforms"),
        (lambda: patch_labels(P, V, uniforms=torch.ones(2, 4, 2)), ValueError, r"\[0, 1\)"),
        (lambda: patch_labels(P, V, uniforms=torch.zeros(2, 4, 2, dtype=torch.long)), TypeError, "uniforms"),
        (lambda: patch_labels(NAN, V), ValueError, "patches must be finite"),
        (lambda: patch_labels(P, V, generator=3), TypeError, "generator"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_validate_false_skips_only_the_value_checks():
    cosine_topk(torch.tensor([[float("inf")] * 8]), torch.randn(5, 8), 3, validate=False)
    patch_labels(P, V, uniforms=torch.ones(2, 4, 2), validate=False)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        patch_labels(P, V, uniforms=torch.rand(2, 5, 2), validate=False)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if "triton" not in backends("cosine_topk"):
        pytest.skip("no triton backend registered")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        cosine_topk(torch.randn(3, 8), torch.randn(5, 8), 3, backend="triton")


def test_auto_resolves_to_an_existing_backend():
    for op in dispatch.OPS:
        fn = dispatch.resolve(op, "auto", torch.device("cpu"))
        assert callable(fn)
        assert "reference" in available_backends(op, "cpu")


def test_integer_like_arguments_are_accepted():
    import numpy as np

    a = cosine_topk(torch.randn(3, 8), torch.randn(5, 8), np.int64(2), backend="reference")
    assert a.values.shape == (3, 2)
    b = patch_labels(P, V, top_n=np.int32(3), window=np.int64(2), grid=(np.int64(4), 4), backend="reference")
    assert b.patch.shape == (2, 4)


def test_backends_names_the_implementations_and_refuses_unknown_ops():
    assert backends("contrastive_loss")[0] == "reference"
    assert set(backends("cosine_topk")) <= set(dispatch.BACKENDS) - {"auto"}
    with pytest.raises(ValueError, match="op must be one of"):
        backends("no_such_op")
