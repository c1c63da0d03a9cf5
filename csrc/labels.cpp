// Patch-vs-vocabulary cosine top-k and window label sampling (SEA Eq. 4-7), CPU kernels.
//
// cosine_topk: rows of normalized patches are split into row blocks; each (row block, vocabulary
// range) task walks its vocabulary range in tiles of `tile` rows: one at::mm (MKL sgemm, many rows
// per call) of the block against the raw tile into a small L2-resident buffer, then a streaming
// per-row top-k over the tile. Scores are formed as (p/|p|) . v * (1/|v|) (the vocabulary is never
// normalized into a copy; its inverse norms are computed per tile, with the sign of `negate` folded
// in). The per-row top-k keeps a buffer of at most k + max(k, 32) candidates and a threshold (the
// k-th best at the last compaction): almost every score is rejected by one vector compare.
// Extra memory: the normalized patches (M x d) and, per thread, one (rows x tile) score buffer and
// (rows x (2k + 32)) candidates -- independent of the vocabulary size q (with fewer row blocks than
// threads, the vocabulary is split between threads and all M rows keep candidates per split).
//
// Ties: among equal scores the smaller vocabulary index wins (scan order + strict compare).
//
// patch_labels: cosine_topk with k = top_n, then the sampling epilogue of the contract
// (sea_kernels.labels.sample_windows), replicating its float32 arithmetic (cumsum accumulates in
// double and rounds each prefix to float32, as torch's CPU cumsum does).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's default eps

template <typename T>
struct Entry {
  T v;
  int64_t i;
};

// Strict order "a comes before b": larger score first, NaN above everything (as torch.topk), then the
// smaller index.
template <typename T>
inline bool better(const Entry<T>& a, const Entry<T>& b) {
  if (a.v > b.v) return true;
  if (a.v == b.v) return a.i < b.i;
  const bool a_nan = std::isnan(a.v), b_nan = std::isnan(b.v);
  if (a_nan || b_nan) return a_nan && (!b_nan || a.i < b.i);
  return false;
}

// Streaming top-k of one row: candidates e[0..cnt), every score <= thr is known to be out.
template <typename T>
struct RowTopK {
  Entry<T>* e;
  int64_t cnt;
  int64_t k;
  int64_t cap;
  T thr;

  void compact() {
    std::nth_element(e, e + (k - 1), e + cnt, better<T>);
    cnt = k;
    thr = e[k - 1].v;  // the k-th best; a later equal score has a larger index and loses the tie
  }

  inline void push(T s, int64_t idx) {
    if (cnt == cap) {
      compact();
      if (s <= thr) return;
    }
    e[cnt].v = s;
    e[cnt].i = idx;
    ++cnt;
  }
};

// Scores of one row of the tile: s_j = c[j] * inv[j]; push those above the row's threshold (or NaN:
// !(s <= thr) is true for NaN scores and for any score once the threshold is NaN).
template <typename T>
inline void filter_row(const T* c, const T* inv, int64_t n, int64_t col0, RowTopK<T>& st) {
  for (int64_t j = 0; j < n; ++j) {
    T s = c[j] * inv[j];
    if (!(s <= st.thr)) st.push(s, col0 + j);
  }
}

#if defined(__AVX512F__)
template <>
inline void filter_row<float>(const float* c, const float* inv, int64_t n, int64_t col0, RowTopK<float>& st) {
  int64_t j = 0;
  __m512 vt = _mm512_set1_ps(st.thr);
  for (; j + 32 <= n; j += 32) {
    __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(c + j), _mm512_loadu_ps(inv + j));
    __m512 s1 = _mm512_mul_ps(_mm512_loadu_ps(c + j + 16), _mm512_loadu_ps(inv + j + 16));
    __mmask16 m0 = _mm512_cmp_ps_mask(s0, vt, _CMP_NLE_UQ);  // !(s <= thr)
    __mmask16 m1 = _mm512_cmp_ps_mask(s1, vt, _CMP_NLE_UQ);
    if ((m0 | m1) != 0) {
      alignas(64) float tmp[32];
      _mm512_store_ps(tmp, s0);
      _mm512_store_ps(tmp + 16, s1);
      uint32_t m = static_cast<uint32_t>(m0) | (static_cast<uint32_t>(m1) << 16);
      while (m) {
        int b = __builtin_ctz(m);
        m &= m - 1;
        if (!(tmp[b] <= st.thr)) st.push(tmp[b], col0 + j + b);
      }
      vt = _mm512_set1_ps(st.thr);
    }
  }
  for (; j < n; ++j) {
    float s = c[j] * inv[j];
    if (!(s <= st.thr)) st.push(s, col0 + j);
  }
}
#endif

// inv[j] = sign / max(|v_j|, eps) for the rows of a contiguous (n x d) tile.
template <typename T>
void inverse_norms(const T* v, int64_t n, int64_t d, bool negate, T* inv) {
  const T sign = negate ? T(-1) : T(1);
  for (int64_t r = 0; r < n; ++r) {
    const T* x = v + r * d;
    T acc[16] = {0};
    int64_t t = 0;
    for (; t + 16 <= d; t += 16)
      for (int l = 0; l < 16; ++l) acc[l] += x[t + l] * x[t + l];
    T sum = 0;
    for (int l = 0; l < 16; ++l) sum += acc[l];
    for (; t < d; ++t) sum += x[t] * x[t];
    T norm = std::sqrt(sum);
    T denom = norm > T(kNormEps) ? norm : T(kNormEps);
    inv[r] = sign / denom;
  }
}

struct Plan {
  int64_t rows_per_block;
  int64_t n_row_blocks;
  int64_t n_vocab_splits;
  int64_t tile;
  int64_t tiles_per_split;
};

Plan make_plan(int64_t M, int64_t q, int64_t tile, int64_t row_block) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  Plan p;
  p.tile = tile > 0 ? tile : 512;
  if (row_block > 0) {
    p.rows_per_block = std::min(row_block, M);
  } else {
    // Many rows per matmul (MKL efficiency), a score buffer that stays near L2, and at least
    // one block per thread when there are enough rows.
    const int64_t max_rows = 640, min_rows = 64;
    int64_t blocks = (M + max_rows - 1) / max_rows;
    if (M >= min_rows * nt) blocks = ((blocks + nt - 1) / nt) * nt;
    p.rows_per_block = (M + blocks - 1) / blocks;
  }
  p.n_row_blocks = (M + p.rows_per_block - 1) / p.rows_per_block;
  const int64_t n_tiles = (q + p.tile - 1) / p.tile;
  int64_t splits = 1;
  if (p.n_row_blocks < nt) splits = std::min(n_tiles, (nt + p.n_row_blocks - 1) / p.n_row_blocks);
  p.tiles_per_split = (n_tiles + splits - 1) / splits;
  p.n_vocab_splits = (n_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

template <typename T>
void write_row(Entry<T>* e, int64_t cnt, int64_t k, float* out_v, int64_t* out_i) {
  std::partial_sort(e, e + k, e + cnt, better<T>);
  for (int64_t t = 0; t < k; ++t) {
    out_v[t] = static_cast<float>(e[t].v);
    out_i[t] = e[t].i;
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_kernel(const at::Tensor& pn, const at::Tensor& vocab, int64_t k, bool negate,
                                               int64_t tile, int64_t row_block) {
  const int64_t M = pn.size(0), d = pn.size(1), q = vocab.size(0);
  const auto opts = pn.options();
  at::Tensor values = at::empty({M, k}, opts.dtype(at::kFloat));
  at::Tensor indices = at::empty({M, k}, opts.dtype(at::kLong));
  if (M == 0) return {values, indices};

  const Plan plan = make_plan(M, q, tile, row_block);
  const int64_t cap = k + std::max<int64_t>(k, 32);
  const bool direct = vocab.scalar_type() == pn.scalar_type() && vocab.is_contiguous();
  const int64_t n_tasks = plan.n_row_blocks * plan.n_vocab_splits;

  // With one vocabulary split a task finishes its rows itself and its candidates live in a per-thread
  // buffer; with several (fewer row blocks than threads, so M < threads x rows_per_block) the
  // candidates of split s of row r are kept at [(s * M + r) * cap] for the merge.
  const bool merge = plan.n_vocab_splits > 1;
  std::vector<Entry<T>> cand(merge ? static_cast<size_t>(plan.n_vocab_splits * M * cap) : 0);
  std::vector<int64_t> counts(merge ? static_cast<size_t>(plan.n_vocab_splits * M) : 0, 0);

  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();

  at::parallel_for(0, n_tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    const int64_t rb = plan.rows_per_block, T_ = plan.tile;
    at::Tensor cbuf = at::empty({rb * T_}, opts);
    at::Tensor inv_buf = at::empty({T_}, opts);
    at::Tensor vbuf = direct ? at::Tensor() : at::empty({T_, d}, opts);
    T* inv = inv_buf.data_ptr<T>();
    std::vector<RowTopK<T>> st(static_cast<size_t>(rb));
    std::vector<Entry<T>> local(merge ? 0 : static_cast<size_t>(rb * cap));
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t blk = task / plan.n_vocab_splits, split = task % plan.n_vocab_splits;
      const int64_t r0 = blk * rb, mb = std::min(rb, M - r0);
      const int64_t j_begin = split * plan.tiles_per_split * T_;
      const int64_t j_end = std::min(q, j_begin + plan.tiles_per_split * T_);
      for (int64_t r = 0; r < mb; ++r) {
        st[r].e = merge ? cand.data() + (split * M + r0 + r) * cap : local.data() + r * cap;
        st[r].cnt = 0;
        st[r].k = k;
        st[r].cap = cap;
        st[r].thr = -std::numeric_limits<T>::infinity();
      }
      at::Tensor a = pn.narrow(0, r0, mb);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += T_) {
        const int64_t n = std::min(T_, j_end - j0);
        at::Tensor vt;
        if (direct) {
          vt = vocab.narrow(0, j0, n);
        } else {
          vt = vbuf.narrow(0, 0, n);
          vt.copy_(vocab.narrow(0, j0, n));
        }
        inverse_norms<T>(vt.data_ptr<T>(), n, d, negate, inv);
        at::Tensor c = cbuf.narrow(0, 0, mb * n).view({mb, n});
        at::mm_out(c, a, vt.t());
        const T* cp = c.data_ptr<T>();
        for (int64_t r = 0; r < mb; ++r) filter_row<T>(cp + r * n, inv, n, j0, st[r]);
      }
      for (int64_t r = 0; r < mb; ++r) {
        if (merge)
          counts[split * M + r0 + r] = st[r].cnt;
        else
          write_row<T>(st[r].e, st[r].cnt, k, out_v + (r0 + r) * k, out_i + (r0 + r) * k);
      }
    }
  });

  if (merge) {
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      std::vector<Entry<T>> row;
      for (int64_t r = begin; r < end; ++r) {
        row.clear();
        for (int64_t s = 0; s < plan.n_vocab_splits; ++s) {
          const Entry<T>* e = cand.data() + (s * M + r) * cap;
          row.insert(row.end(), e, e + counts[s * M + r]);
        }
        write_row<T>(row.data(), static_cast<int64_t>(row.size()), k, out_v + r * k, out_i + r * k);
      }
    });
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> cosine_topk(const at::Tensor& patches, const at::Tensor& vocab, int64_t k, bool negate,
                                               int64_t tile, int64_t row_block) {
  TORCH_CHECK(patches.dim() == 2 && vocab.dim() == 2, "cosine_topk: patches (M, d) and vocab (q, d) expected");
  TORCH_CHECK(patches.size(1) == vocab.size(1), "cosine_topk: feature dimensions differ");
  TORCH_CHECK(k >= 1 && k <= vocab.size(0), "cosine_topk: k must be in 1..q");
  TORCH_CHECK(patches.device().is_cpu() && vocab.device().is_cpu(), "cosine_topk: CPU tensors expected");
  at::NoGradGuard no_grad;
  // The reference computes in float64 for float64 patches, else in float32.
  const auto acc = patches.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor p = patches.to(acc);
  at::Tensor pn = (p / p.norm(2, {1}, true).clamp_min(kNormEps)).contiguous();  // F.normalize
  if (acc == at::kDouble) return topk_kernel<double>(pn, vocab, k, negate, tile, row_block);
  return topk_kernel<float>(pn, vocab, k, negate, tile, row_block);
}

// Steps 2-4 of the contract from sorted top scores values (B, P, n) f32 and indices (B, P, n).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_windows(const at::Tensor& values_in,
                                                                          const at::Tensor& indices_in, int64_t H,
                                                                          int64_t W, int64_t window,
                                                                          const at::Tensor& uniforms_in) {
  at::Tensor values = values_in.to(at::kFloat).contiguous();
  at::Tensor indices = indices_in.to(at::kLong).contiguous();
  at::Tensor uniforms = uniforms_in.to(at::kFloat).contiguous();
  TORCH_CHECK(values.dim() == 3 && values.size(1) == H * W, "sample_windows: values must be (B, H*W, n)");
  const int64_t B = values.size(0), P = values.size(1), n = values.size(2);
  const int64_t nwy = (H + window - 1) / window, nwx = (W + window - 1) / window, nw = nwy * nwx;
  TORCH_CHECK(uniforms.dim() == 3 && uniforms.size(0) == B && uniforms.size(1) == nw && uniforms.size(2) == 2,
              "sample_windows: uniforms must be (B, n_windows, 2)");
  const auto opts = values.options();
  at::Tensor patch = at::empty({B, nw}, opts.dtype(at::kLong));
  at::Tensor label = at::empty({B, nw}, opts.dtype(at::kLong));
  at::Tensor score = at::empty({B, nw}, opts.dtype(at::kFloat));
  at::Tensor valid = at::empty({B, nw}, opts.dtype(at::kBool));
  const float* v = values.data_ptr<float>();
  const int64_t* ix = indices.data_ptr<int64_t>();
  const float* u = uniforms.data_ptr<float>();
  int64_t* o_patch = patch.data_ptr<int64_t>();
  int64_t* o_label = label.data_ptr<int64_t>();
  float* o_score = score.data_ptr<float>();
  bool* o_valid = valid.data_ptr<bool>();

  at::parallel_for(0, B * nw, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> eligible(static_cast<size_t>(window * window));
    std::vector<float> cdf(static_cast<size_t>(n));
    for (int64_t bw = begin; bw < end; ++bw) {
      const int64_t b = bw / nw, w = bw % nw, wy = w / nwx, wx = w % nwx;
      int64_t count = 0;
      for (int64_t oy = 0; oy < window; ++oy) {
        const int64_t y = wy * window + oy;
        if (y >= H) break;
        for (int64_t ox = 0; ox < window; ++ox) {
          const int64_t x = wx * window + ox;
          if (x >= W) break;
          const int64_t p = y * W + x;
          if (v[(b * P + p) * n] > 0.0f) eligible[count++] = p;
        }
      }
      if (count == 0) {
        o_patch[bw] = -1;
        o_label[bw] = -1;
        o_score[bw] = 0.0f;
        o_valid[bw] = false;
        continue;
      }
      // float32 product, as (uniforms[..., 0] * count).floor() in the reference
      const float prod = u[bw * 2] * static_cast<float>(count);
      const int64_t rank = std::min(static_cast<int64_t>(std::floor(prod)), count - 1);
      const int64_t p = eligible[rank];
      const float* s = v + (b * P + p) * n;
      int64_t m = 0;
      while (m < n && s[m] > 0.0f) ++m;  // candidates: a prefix of the sorted scores
      double acc = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        acc += static_cast<double>(s[j]);
        cdf[j] = static_cast<float>(acc);
      }
      const float total = cdf[m - 1];
      const float u1 = u[bw * 2 + 1];
      int64_t pick = m - 1;
      for (int64_t j = 0; j < m; ++j) {
        if (u1 < cdf[j] / total) {
          pick = j;
          break;
        }
      }
      o_patch[bw] = p;
      o_label[bw] = ix[(b * P + p) * n + pick];
      o_score[bw] = s[pick];
      o_valid[bw] = true;
    }
  });
  return {patch, label, score, valid};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_labels(const at::Tensor& patches,
                                                                        const at::Tensor& vocab, int64_t H, int64_t W,
                                                                        int64_t top_n, int64_t window, bool negate,
                                                                        const at::Tensor& uniforms, int64_t tile,
                                                                        int64_t row_block) {
  TORCH_CHECK(patches.dim() == 3 && patches.size(1) == H * W, "patch_labels: patches must be (B, H*W, d)");
  const int64_t B = patches.size(0), P = patches.size(1);
  auto tk = cosine_topk(patches.reshape({B * P, patches.size(2)}), vocab, top_n, negate, tile, row_block);
  return sample_windows(std::get<0>(tk).view({B, P, top_n}), std::get<1>(tk).view({B, P, top_n}), H, W, window,
                        uniforms);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SEA token-level labels: tiled cosine top-k and window label sampling (CPU)";
  m.def("cosine_topk", &cosine_topk, "cosine top-k over vocabulary tiles", py::arg("patches"), py::arg("vocab"),
        py::arg("k"), py::arg("negate"), py::arg("tile") = 0, py::arg("row_block") = 0);
  m.def("sample_windows", &sample_windows, "window label sampling from sorted top scores", py::arg("values"),
        py::arg("indices"), py::arg("H"), py::arg("W"), py::arg("window"), py::arg("uniforms"));
  m.def("patch_labels", &patch_labels, "cosine top-k + window label sampling", py::arg("patches"), py::arg("vocab"),
        py::arg("H"), py::arg("W"), py::arg("top_n"), py::arg("window"), py::arg("negate"), py::arg("uniforms"),
        py::arg("tile") = 0, py::arg("row_block") = 0);
}
