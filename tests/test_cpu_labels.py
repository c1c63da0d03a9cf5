"""The cpu backend of cosine_topk / patch_labels (C++ extension and chunked PyTorch fallback) vs the reference."""

from __future__ import annotations

import pytest
import torch

import sea_kernels.labels as labels
from sea_kernels import dispatch
from sea_kernels.cpu import _build
from sea_kernels.cpu import labels as cpu_labels
from sea_kernels.cpu._build import load_extension
from tests import _checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _have_cpp() -> bool:
    return load_extension("labels") is not None


PATHS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("fallback", id="fallback"),
]


def _use_cpp(path: str) -> bool:
    if path == "cpp":
        if not _have_cpp():
            pytest.skip("the C++ labels extension cannot be built here")
        return True
    return False


def check_topk(fast, ref, patches, vocab, k, negate):
    """The shared check, on the row-major ``(M, d)`` view the backend entry points take."""
    _checks.check_topk(fast, ref, patches.reshape(-1, patches.shape[-1]), vocab, k, negate, max_differ=0.05)


def make_inputs(m, q, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(m, d, generator=g).to(dtype)
    vocab = torch.randn(q, d, generator=g).to(dtype)
    return patches, vocab


# ----------------------------------------------------------------------------- cosine_topk


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("tile", [None, 64], ids=["tile=default", "tile=64"])
def test_cosine_topk_matches_reference(path, dtype, negate, k, tile):
    use_cpp = _use_cpp(path)
    # q = 300: smaller than one default tile, not a multiple of 64 or of the 16-wide vector step; d = 40 likewise
    patches, vocab = make_inputs(37, 300, 40, dtype, seed=k + 10 * negate)
    fast = cpu_labels.cosine_topk(patches, vocab, k, negate, tile=tile, use_cpp=use_cpp)
    ref = labels.cosine_topk_reference(patches, vocab, k, negate)
    check_topk(fast, ref, patches, vocab, k, negate)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "m,q,d,k",
    [
        (3, 300, 40, 5),  # fewer rows than threads x 64: the vocabulary is split between threads and merged
        (20, 5, 3, 5),  # k = q, q below one vector step, d below one vector step
        (9, 400, 24, 400),  # k = q: everything sorted
        (9, 700, 24, 150),  # large k: many candidate-buffer compactions
        (1, 50, 8, 7),  # a single row
    ],
)
def test_cosine_topk_shapes(path, m, q, d, k):
    use_cpp = _use_cpp(path)
    patches, vocab = make_inputs(m, q, d, torch.float32, seed=m * q + k)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the vocabulary split/merge of the C++ path needs more than one thread
    try:
        fast = cpu_labels.cosine_topk(patches, vocab, k, False, tile=32, use_cpp=use_cpp)
    finally:
        torch.set_num_threads(threads)
    ref = labels.cosine_topk_reference(patches, vocab, k, False)
    check_topk(fast, ref, patches, vocab, k, False)


@pytest.mark.parametrize("path", PATHS)
def test_cosine_topk_noncontiguous_and_mixed_dtypes(path):
    use_cpp = _use_cpp(path)
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(40, 33, generator=g).T  # (33, 40) non-contiguous
    vocab = torch.randn(40, 250, generator=g).T  # (250, 40) non-contiguous
    for p, v in [(patches, vocab), (patches, vocab.to(torch.bfloat16)), (patches.half(), vocab.double())]:
        fast = cpu_labels.cosine_topk(p, v, 8, True, tile=64, use_cpp=use_cpp)
        ref = labels.cosine_topk_reference(p, v, 8, True)
        check_topk(fast, ref, p, v, 8, True)


@pytest.mark.parametrize("path", PATHS)
def test_tiling_does_not_change_results(path):
    """Vocabulary tiles of any size, row blocks and the thread split leave the C++ path's results bit-identical
    (its float32 scores do not depend on them): the merge is right. The fallback's tiles and row blocks change
    the shapes of its BLAS products, whose rounding depends on the CPU's kernels (bitwise equal on an Intel
    Xeon, not on an AMD Zen 4): there the results equal the reference's up to near ties."""
    use_cpp = _use_cpp(path)
    patches, vocab = make_inputs(70, 1000, 48, torch.float32, seed=7)
    for k in (1, 10, 64):
        base = cpu_labels.cosine_topk(patches, vocab, k, False, tile=1024, row_block=16, use_cpp=use_cpp)
        ref = labels.cosine_topk_reference(patches, vocab, k, False)
        tilings = [dict(tile=tile, row_block=16) for tile in (16, 48, 100, 334, 4096)]
        tilings += [dict(tile=48, row_block=row_block) for row_block in (1, 7, None)]
        for tiling in tilings:
            got = cpu_labels.cosine_topk(patches, vocab, k, False, **tiling, use_cpp=use_cpp)
            if use_cpp:
                assert torch.equal(got.indices, base.indices) and torch.equal(got.values, base.values), (k, tiling)
            else:
                check_topk(got, ref, patches, vocab, k, False)


def test_exact_ties_prefer_the_smaller_index():
    """All scores exactly 0: the C++ path returns indices 0..k-1 (torch.topk's CPU tie order is unspecified)."""
    _use_cpp("cpp")
    g = torch.Generator().manual_seed(5)
    vocab = torch.randn(300, 16, generator=g)
    vocab[:, 0] = 0.0
    patches = torch.zeros(4, 16)
    patches[:, 0] = torch.tensor([1.0, 2.0, 0.5, 3.0])
    for negate in (False, True):
        for k in (1, 7, 40):
            got = cpu_labels.cosine_topk(patches, vocab, k, negate, tile=64, use_cpp=True)
            assert torch.equal(got.indices, torch.arange(k).expand(4, k)), (negate, k)
            assert (got.values == 0).all()
    # and the fallback still returns k distinct zero-score indices
    got = cpu_labels.cosine_topk(patches, vocab, 40, False, tile=64, use_cpp=False)
    assert (got.values == 0).all() and (got.indices.sort(1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_nan_scores_rank_first_like_torch_topk(path):
    """validate=False with NaN input: NaN scores come first (torch.topk's order), nothing crashes."""
    use_cpp = _use_cpp(path)
    patches, vocab = make_inputs(20, 200, 24, torch.float32, seed=9)
    vocab[37, 3] = float("nan")  # column 37 is NaN for every patch
    patches[4, 0] = float("nan")  # row 4 is NaN everywhere
    for k in (1, 6):
        got = cpu_labels.cosine_topk(patches, vocab, k, True, tile=64, use_cpp=use_cpp)
        ref = labels.cosine_topk_reference(patches, vocab, k, True)
        rows = torch.arange(20) != 4
        assert (got.indices[rows, 0] == 37).all() and got.values[rows, 0].isnan().all()
        assert torch.equal(got.indices[rows, 1:], ref.indices[rows, 1:])
        assert got.values[4].isnan().all() and got.indices[4].unique().numel() == k
        assert ((got.indices >= 0) & (got.indices < 200)).all()


# ----------------------------------------------------------------------------- patch_labels


def labels_inputs(batch, grid, q, d, dtype, negate, seed):
    """Random patches with some ineligible ones (no positive score), including a whole window."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    vocab = torch.randn(q, d, generator=g)
    vocab[:, 0] = vocab[:, 0].abs() + 0.5  # every vocabulary vector has a positive first coordinate
    patches = torch.randn(batch, h * w, d, generator=g)
    dead = torch.zeros(d)
    dead[0] = 1.0 if negate else -1.0  # every score of a dead patch is < 0 (cos < 0, or -cos < 0 when negated)
    patches[0, [0, 1, w, w + 1]] = dead  # the first 2x2 window of image 0: no eligible patch
    patches[:, torch.randperm(h * w, generator=g)[: h * w // 3]] = dead * 2.0
    u = torch.rand(batch, labels.num_windows(grid, 2), 2, generator=g)
    return patches.to(dtype), vocab.to(dtype), u


def check_labels(fast, ref, patches, vocab, grid, top_n, negate, u, window=2):
    """The shared check; on these inputs eligibility and the chosen patches are exact."""
    assert torch.equal(fast.valid, ref.valid)
    assert torch.equal(fast.patch, ref.patch)
    assert _checks.check_patch_labels(fast, ref, patches, vocab, grid, top_n, window, negate, u) > 0
    assert (fast.label == ref.label).double().mean() >= 0.9


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("top_n", [1, 16])
def test_patch_labels_matches_reference(path, dtype, negate, top_n):
    use_cpp = _use_cpp(path)
    grid = (5, 7)  # H != W, P = 35 not a multiple of the window: partial edge windows
    patches, vocab, u = labels_inputs(2, grid, 300, 40, dtype, negate, seed=top_n + negate)
    fast = cpu_labels.patch_labels(patches, vocab, grid, top_n, 2, negate, u, tile=64, use_cpp=use_cpp)
    ref = labels.patch_labels_reference(patches, vocab, grid, top_n, 2, negate, u)
    assert ref.valid.any() and not ref.valid.all() and not ref.valid[0, 0]  # the inputs exercise both cases
    check_labels(fast, ref, patches, vocab, grid, top_n, negate, u)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grid,window", [((6, 4), 1), ((4, 9), 3), ((7, 7), 5)])
def test_patch_labels_windows(path, grid, window):
    use_cpp = _use_cpp(path)
    patches, vocab, _ = labels_inputs(3, grid, 200, 24, torch.float32, False, seed=window)
    u = torch.rand(3, labels.num_windows(grid, window), 2, generator=torch.Generator().manual_seed(window))
    fast = cpu_labels.patch_labels(patches, vocab, grid, 10, window, False, u, use_cpp=use_cpp)
    ref = labels.patch_labels_reference(patches, vocab, grid, 10, window, False, u)
    check_labels(fast, ref, patches, vocab, grid, 10, False, u, window)


def test_sampling_epilogue_is_exact():
    """The C++ epilogue equals sample_windows bit for bit on the same scores, at CDF and rank boundaries too."""
    _use_cpp("cpp")
    ext = load_extension("labels")
    g = torch.Generator().manual_seed(11)
    grid, window, n = (5, 6), 2, 6
    nw = labels.num_windows(grid, window)
    for trial in range(30):
        values = torch.randn(4, 30, n, generator=g).sort(dim=-1, descending=True).values
        if trial % 3 == 0:  # exactly representable CDFs (0.5, 0.75, 1) and u on the boundaries
            values = torch.tensor([0.5, 0.25, 0.25, 0.0, -0.1, -0.2]).expand(4, 30, n).clone()
            values[:, ::4] = -1.0  # ineligible patches
        indices = torch.randint(0, 1000, (4, 30, n), generator=g)
        u = torch.rand(4, nw, 2, generator=g)
        if trial % 2 == 0:
            u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 / 3, 2 / 3, 0.999999])[
                torch.randint(0, 7, (4, nw, 2), generator=g)
            ]
        got = ext.sample_windows(values, indices, grid[0], grid[1], window, u)
        want = labels.sample_windows(values, indices, grid, window, u)
        for a, b, name in zip(got, want, want._fields):
            assert torch.equal(a, b), (trial, name)


# ----------------------------------------------------------------------------- dispatch and fallback


def test_dispatch_uses_the_cpu_backend():
    assert dispatch.resolve("cosine_topk", "cpu", torch.device("cpu")) is cpu_labels.cosine_topk
    assert dispatch.resolve("patch_labels", "cpu", torch.device("cpu")) is cpu_labels.patch_labels
    assert dispatch.resolve("patch_labels", "auto", torch.device("cpu")) is cpu_labels.patch_labels
    patches, vocab, u = labels_inputs(2, (4, 4), 120, 16, torch.float32, True, seed=1)
    got = labels.patch_labels(patches, vocab, top_n=5, negate=True, uniforms=u, backend="cpu")
    ref = labels.patch_labels(patches, vocab, top_n=5, negate=True, uniforms=u, backend="reference")
    check_labels(got, ref, patches, vocab, (4, 4), 5, True, u)
    tk = labels.cosine_topk(patches, vocab, 5, backend="cpu")
    assert tuple(tk.values.shape) == (2, 16, 5)


def test_backend_falls_back_without_the_extension(monkeypatch):
    """Without a compiler (load_extension -> None) the backend entry points run the chunked path."""
    calls = []
    chunked = cpu_labels.cosine_topk_chunked

    def spy(*args, **kwargs):
        calls.append(1)
        return chunked(*args, **kwargs)

    monkeypatch.setattr(_build, "load_extension", lambda name: None)
    monkeypatch.setattr(cpu_labels, "cosine_topk_chunked", spy)
    patches, vocab, u = labels_inputs(2, (3, 5), 100, 16, torch.float32, False, seed=2)
    got = cpu_labels.patch_labels(patches, vocab, (3, 5), 4, 2, False, u)
    ref = labels.patch_labels_reference(patches, vocab, (3, 5), 4, 2, False, u)
    check_labels(got, ref, patches, vocab, (3, 5), 4, False, u)
    tk = cpu_labels.cosine_topk(patches.reshape(-1, 16), vocab, 3, False)
    check_topk(tk, labels.cosine_topk_reference(patches.reshape(-1, 16), vocab, 3, False), patches, vocab, 3, False)
    assert len(calls) == 2
    with pytest.raises(RuntimeError):
        cpu_labels.cosine_topk(patches.reshape(-1, 16), vocab, 3, False, use_cpp=True)


# ----------------------------------------------------------------------------- exact top-k through a prefilter

PREFILTERS = sorted(cpu_labels.PREFILTERS)


def exact_topk(patches, vocab, k, negate):
    """The top-k of the C++ path's float32 scores, equal scores in index order (a stable sort)."""
    s = cpu_labels.exact_scores(patches, vocab, negate)
    values, order = s.sort(dim=1, descending=True, stable=True)
    return values[:, :k], order[:, :k]


def assert_exact(got, patches, vocab, k, negate):
    values, indices = exact_topk(patches, vocab, k, negate)
    assert torch.equal(got.values, values), "values differ from the float32 top-k"
    assert torch.equal(got.indices, indices), "indices differ from the float32 top-k (ties: smaller index first)"


@pytest.fixture(params=[True, False], ids=["vocab-cached", "vocab-per-call"])
def vocab_cache(request, monkeypatch):
    """Both ways of getting the vocabulary's prefilter data: kept between calls, and converted per tile."""
    monkeypatch.setattr(cpu_labels, "CACHE_VOCABULARY", request.param)
    cpu_labels._PREPARED.clear()
    return request.param


def near_duplicates(q, d, seed, eps=1e-6):
    """Vocabulary rows that are copies of 5 base rows plus differences of ``eps``, some exact copies."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(5, d, generator=g)
    vocab = base[torch.randint(0, 5, (q,), generator=g)] + eps * torch.randn(q, d, generator=g)
    vocab[::7] = base[0]  # exact duplicates: exactly equal scores, ordered by index
    return vocab


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize(
    "m,q,d,k,tile",
    [
        (37, 300, 40, 5, None),  # q below one tile
        (70, 1000, 48, 10, 64),  # q not a multiple of the tile
        (5, 700, 33, 16, 128),  # m below one row block, d odd
        (3, 50, 8, 50, 16),  # k = q
    ],
)
def test_prefilter_is_exact_on_random_inputs(prefilter, negate, m, q, d, k, tile, vocab_cache):
    _use_cpp("cpp")
    patches, vocab = make_inputs(m, q, d, torch.float32, seed=m + q + k)
    got = cpu_labels.cosine_topk(patches, vocab, k, negate, tile=tile, prefilter=prefilter, use_cpp=True)
    assert_exact(got, patches, vocab, k, negate)


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_prefilter_is_exact_on_near_duplicates(prefilter, negate, eps, vocab_cache):
    """Hundreds of scores within the prefilter's bound of the k-th (rows differing by eps), and exact ties."""
    _use_cpp("cpp")
    vocab = near_duplicates(517, 64, seed=1, eps=eps)  # 517: not a multiple of any tile
    g = torch.Generator().manual_seed(2)
    patches = torch.cat([vocab[:6] + 1e-3 * torch.randn(6, 64, generator=g), torch.randn(9, 64, generator=g)])
    for k in (1, 10, 40):
        got = cpu_labels.cosine_topk(patches, vocab, k, negate, tile=96, prefilter=prefilter, use_cpp=True)
        assert_exact(got, patches, vocab, k, negate)
        if prefilter == "int8":  # the bound is wide: far more than k words reach the k-th best and are rescored
            n = cpu_labels.rescored_counts(patches, vocab, k, negate, prefilter=prefilter, tile=96)
            assert n.max() > 4 * k


@pytest.mark.parametrize("prefilter", ["fp32", "bf16", "int8"])
def test_prefilter_mixed_dtypes_and_threads(prefilter):
    """fp16/bf16/float64 vocabularies (converted per tile and per rescored row), fp16 patches, 1 and 2 threads."""
    _use_cpp("cpp")
    patches, vocab = make_inputs(23, 333, 40, torch.float32, seed=4)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for p, v in [(patches, vocab.half()), (patches.half(), vocab.bfloat16()), (patches, vocab.double())]:
                got = cpu_labels.cosine_topk(p, v, 7, True, tile=64, prefilter=prefilter, use_cpp=True)
                assert_exact(got, p, v, 7, True)
    finally:
        torch.set_num_threads(threads)


def test_prefilter_survivors():
    """Every prefilter scores at least k words exactly per row and prunes most of the vocabulary (the exact
    oracle scores all of it): rescored are the words whose bound reached the row's k-th best at the time."""
    _use_cpp("cpp")
    patches, vocab = make_inputs(64, 3000, 128, torch.float32, seed=6)
    for prefilter in PREFILTERS:
        n = cpu_labels.rescored_counts(patches, vocab, 10, False, prefilter=prefilter)
        assert n.shape == (64,) and (n >= 10).all() and (n <= 3000).all(), prefilter
        if prefilter == "exact":
            assert (n == 3000).all()
        else:
            assert n.float().median() < 300 and n.max() < 600, prefilter


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("negate", [False, True])
def test_sampled_labels_equal_the_reference_on_exact_scores(prefilter, negate):
    """patch_labels = the contract's sample_windows on the float32 top-k, bit for bit, for every prefilter."""
    _use_cpp("cpp")
    grid = (5, 7)
    patches, vocab, u = labels_inputs(2, grid, 300, 40, torch.float32, negate, seed=3)
    vocab[::5] = vocab[1]  # exact ties among the candidates
    got = cpu_labels.patch_labels(patches, vocab, grid, 10, 2, negate, u, tile=64, prefilter=prefilter, use_cpp=True)
    values, indices = exact_topk(patches.reshape(70, 40), vocab, 10, negate)
    want = labels.sample_windows(values.view(2, 35, 10), indices.view(2, 35, 10), grid, 2, u)
    for a, b, name in zip(got, want, want._fields):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- patch_labels: chosen patches only
# The C++ patch_labels settles eligibility first (a positive exact score among the first 64 words) and
# computes the exact top-k of the chosen patches only (and of every patch of a window with an unsettled
# one). Its output must equal the cpu cosine_topk of every patch followed by the contract's sample_windows.

FIRST_BLOCK = 64  # csrc/labels.cpp kFirstBlock


def adversarial_labels_inputs(batch, grid, window, q, d, dtype, negate, seed):
    """Patches of four kinds on near-duplicate vocabulary rows: ``live`` (random: eligible, settled by the
    first words), ``late`` (every score of the first 64 words < 0, a few later ones > 0: eligible, not
    settled), ``dead`` (every score < 0: the vocabulary lies in one half-space) and ``zero`` (every score
    exactly 0: ineligible). Returns the inputs and each patch's kind ``(B, P)`` (0 live .. 3 zero)."""
    g = torch.Generator().manual_seed(seed)
    vocab = near_duplicates(q, d, seed=seed)
    vocab[:, 0] = vocab[:, 0].abs() + 0.5  # every word in the half-space x_0 > 0
    vocab[:, 1] = vocab[:, 1].abs() + 0.5  # ... and x_1 > 0, except a few late words
    late_words = torch.arange(FIRST_BLOCK + 3, q, 41)
    vocab[late_words, 1] = -vocab[late_words, 1] - 2.0
    vocab[late_words[1::2]] = vocab[late_words[0]].clone()  # exact ties among the late patches' candidates
    vocab[:, 2] = 0.0
    sign = -1.0 if negate else 1.0
    h, w = grid
    kind = torch.multinomial(torch.tensor([0.4, 0.2, 0.2, 0.2]), batch * h * w, True, generator=g).view(batch, h * w)
    patches = torch.randn(batch, h * w, d, generator=g)
    noise = 1e-2 * torch.randn(batch, h * w, d, generator=g)
    noise[..., 2] = 0.0
    axis = torch.eye(d)
    patches[kind == 1] = (-sign * axis[1] + noise)[kind == 1]  # < 0 on x_1 > 0, > 0 on the late words
    patches[kind == 2] = (-sign * axis[0] + noise)[kind == 2]  # < 0 on every word
    patches[kind == 3] = axis[2] * torch.rand(batch, h * w, 1, generator=g)[kind == 3]  # 0 on every word
    u = torch.rand(batch, labels.num_windows(grid, window), 2, generator=g)
    return patches.to(dtype), vocab.to(dtype), u, kind


def all_patches_labels(patches, vocab, grid, top_n, window, negate, u, **kw):
    """The cpu backend's top-k of every patch, then the contract's sample_windows."""
    b, p, d = patches.shape
    tk = cpu_labels.cosine_topk(patches.reshape(b * p, d), vocab, top_n, negate, use_cpp=True, **kw)
    return labels.sample_windows(tk.values.view(b, p, top_n), tk.indices.view(b, p, top_n), grid, window, u)


def assert_same_labels(got, want, what=""):
    for a, b, name in zip(got, want, want._fields):
        assert torch.equal(a, b), f"{what}: {name} differs"


LABEL_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),  # mixed: the vocabulary converted per tile and per row
    (torch.float64, torch.float64),  # float64 scores every patch (the tiled float64 top-k)
]


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("dtypes", LABEL_DTYPES, ids=lambda t: f"{t[0]}-{t[1]}".replace("torch.", ""))
def test_patch_labels_equal_the_top_k_of_every_patch(prefilter, negate, dtypes, vocab_cache):
    """Ineligible (negative and exactly 0), late-eligible and live patches, windows with 0-4 eligible
    patches, partial edge windows, windows 1, 2 and 3, near-duplicate and tied words: identical outputs."""
    _use_cpp("cpp")
    for grid, window, top_n, tile in [((5, 7), 2, 10, 64), ((7, 8), 3, 4, None), ((4, 5), 1, 16, 96)]:
        patches, vocab, u, kind = adversarial_labels_inputs(3, grid, window, 300, 40, dtypes[0], negate, seed=window)
        vocab = vocab.to(dtypes[1])
        kw = dict(tile=tile, prefilter=prefilter)
        got = cpu_labels.patch_labels(patches, vocab, grid, top_n, window, negate, u, use_cpp=True, **kw)
        want = all_patches_labels(patches, vocab, grid, top_n, window, negate, u, **kw)
        assert_same_labels(got, want, f"grid {grid} window {window}")
        if window == 2:  # the inputs hold windows with every number of eligible patches
            slots = labels.window_patches(grid, window)
            eligible = (kind <= 1)[:, slots.clamp(min=0)] & (slots >= 0)
            assert set(eligible.sum(-1).flatten().tolist()) == {0, 1, 2, 3, 4}
    assert want.valid.any() and not want.valid.all()


def test_patch_labels_score_only_the_chosen_patches():
    """Settled windows: only the chosen patch is scored; a window with an unsettled patch: all of its patches."""
    _use_cpp("cpp")
    grid, window = (6, 7), 2
    slots = labels.window_patches(grid, window)
    patches, vocab, u, kind = adversarial_labels_inputs(2, grid, window, 300, 40, torch.float32, True, seed=4)
    scored = cpu_labels.scored_patches(patches, vocab, grid, 10, window, True, u)
    got = cpu_labels.patch_labels(patches, vocab, grid, 10, window, True, u, use_cpp=True)
    for i in range(2):
        for wi in range(slots.shape[0]):
            members = slots[wi][slots[wi] >= 0]
            if (kind[i, members] == 0).all():
                assert scored[i, members].sum() == 1 and scored[i, got.patch[i, wi]], (i, wi)
            else:
                assert scored[i, members].all(), (i, wi)
    patches, vocab, u = labels_inputs(2, grid, 300, 40, torch.float32, False, seed=1)
    patches = torch.randn(patches.shape, generator=torch.Generator().manual_seed(0))  # all live
    scored = cpu_labels.scored_patches(patches, vocab, grid, 10, window, False, u)
    got = cpu_labels.patch_labels(patches, vocab, grid, 10, window, False, u, use_cpp=True)
    assert got.valid.all() and int(scored.sum()) == got.valid.numel()
    assert scored.gather(1, got.patch).all()


def test_patch_labels_with_nan_scores_and_threads():
    """A huge word (finite, but its scores overflow to NaN, which outranks every positive score), a NaN
    patch (validate=False): every patch is scored, as the all-patch path; 1 and 2 threads agree."""
    _use_cpp("cpp")
    grid, window = (5, 6), 2
    patches, vocab, u, _ = adversarial_labels_inputs(2, grid, window, 300, 40, torch.float32, False, seed=6)
    patches[1, 4] = float("nan")
    huge = vocab.clone()
    huge[200] = 3e38
    threads = torch.get_num_threads()
    try:
        for v in (vocab, huge):
            want = all_patches_labels(patches, v, grid, 10, window, False, u)
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                got = cpu_labels.patch_labels(patches, v, grid, 10, window, False, u, use_cpp=True)
                assert_same_labels(got, want, f"{n_threads} threads")
    finally:
        torch.set_num_threads(threads)
    top1 = cpu_labels.cosine_topk(patches.reshape(60, 40), huge, 1, False, use_cpp=True).values[:, 0]
    assert top1.isnan().sum() > 1  # patches that a positive early score would have called eligible
    assert cpu_labels.scored_patches(patches, huge, grid, 10, window, False, u).all()


def test_unknown_prefilter_is_one_clear_error():
    patches, vocab = make_inputs(4, 30, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="prefilter must be one of"):
        cpu_labels.cosine_topk(patches, vocab, 3, False, prefilter="fp8")


# ----------------------------------------------------------------------------- the vocabulary's prefilter data


def test_vocabulary_data_is_kept_and_redone_when_the_vocabulary_changes():
    """Reused for the same unmodified tensor; redone after an in-place change, for the other sign, for
    another tensor; dropped when the vocabulary is freed; never kept for inference tensors."""
    _use_cpp("cpp")
    cpu_labels._PREPARED.clear()
    patches, vocab = make_inputs(19, 700, 40, torch.float32, seed=8)

    def run(v, negate=False):
        got = cpu_labels.cosine_topk(patches, v, 5, negate, tile=128, prefilter="int8", use_cpp=True)
        assert_exact(got, patches, v, 5, negate)
        return cpu_labels._PREPARED.value()

    first = run(vocab)
    assert run(vocab) is first
    vocab[3:9].mul_(-2.0)  # in place: the version counter moves
    second = run(vocab)
    assert second is not first and not torch.equal(second[0], first[0])
    assert run(vocab, negate=True) is not second
    other = vocab.clone()
    assert run(other) is not second
    del other
    assert not cpu_labels._PREPARED
    with torch.inference_mode():
        frozen = vocab.clone()
    got = cpu_labels.cosine_topk(patches, frozen, 5, False, prefilter="int8", use_cpp=True)
    assert_exact(got, patches, frozen, 5, False)
    assert not cpu_labels._PREPARED


def test_prepared_vocabulary_of_another_vocabulary_is_refused():
    _use_cpp("cpp")
    ext = load_extension("labels")
    patches, vocab = make_inputs(4, 300, 40, torch.float32, seed=9)
    code = cpu_labels.PREFILTERS["int8"]
    for wrong in (
        ext.prepare_vocab(vocab[:200], False, code),
        ext.prepare_vocab(vocab, False, cpu_labels.PREFILTERS["bf16"]),
    ):
        with pytest.raises(RuntimeError, match="prepared vocabulary does not match"):
            ext.cosine_topk(patches, vocab, 3, False, 0, 0, code, wrong)
