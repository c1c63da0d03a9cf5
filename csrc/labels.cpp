// Patch-vs-vocabulary cosine top-k and window label sampling (SEA Eq. 4-7), CPU kernels.
//
// Scores: s_ij = (p_i/|p_i|) . v_j * c_j with c_j = +-1 / max(|v_j|, eps) (the sign of `negate` folded
// in); the vocabulary is never normalized into a copy.
//
// float32 (patches of any dtype but float64): the EXACT top-k of the float32 scores, where "the float32
// score" is one fixed arithmetic (dot_f32: a 64-lane fused-multiply-add dot product in a fixed order,
// times c_j from a fixed-order norm), so the result does not depend on tiling, threads or the prefilter.
// A prefilter scores every pair cheaply: int8 (per-vector scales, at::_int_mm: exact integer dot
// products, VNNI through oneDNN), bfloat16 (at::mm on bf16 copies: AMX through oneDNN) or float32
// (at::mm, MKL), each with a rigorous bound e_ij on |prefilter score - float32 score|: the norms of both
// operands, of their low-precision copies and of the rounding residuals (Cauchy-Schwarz on
// x.y - x~.y~ = (x - x~).y~ + x~.(y - y~) + (x - x~).(y - y~)), the accumulation error of a d-term
// float32 sum, the bf16 rounding of the product, a few float32 roundings relative to the score, and
// an absolute 1e-6 that covers underflow and the rounding of the bound itself. A word can be in a
// row's top-k only if its upper bound reaches L, the k-th best exact score of the row so far (its
// running top-k's threshold, shared by the row's vocabulary splits); a word that passes is rescored
// exactly with dot_f32 at once, from the vocabulary tile while it is still in cache (rescoring later,
// from memory, cost more than the rescoring itself), and L rises with the top-k. The result is the
// top-k of exact scores, ties broken by the smaller index: identical for every prefilter (prefilter 0
// scores every pair exactly -- the oracle; rows or tiles with Inf/NaN/huge values take that path too).
// Extra memory: the normalized patches (M x d, plus a low-precision copy), per thread one vocabulary
// tile (copy), one score buffer, and per row and vocabulary split a top-k of k + max(k, 32) entries --
// independent of the vocabulary size q. Unless a prepared vocabulary is given (prepare_vocab:
// every word's c_j, int8 scale, bound terms and low-precision copy, q x d bytes for int8, 2 q d for bf16,
// plus 33 bytes per word): then the tiles are not converted again; sea_kernels/cpu/labels.py keeps the last
// vocabulary's between calls.
//
// float64: a tiled at::mm (MKL dgemm) per (row block, vocabulary range) into a small buffer and a
// streaming per-row top-k with a threshold (the k-th best at the last compaction).
//
// Ties: among equal scores the smaller vocabulary index wins (a total order, NaN first as in torch.topk).
//
// patch_labels (float32): only one patch per window needs its top-k. First every patch's eligibility
// (top-1 > 0): it is scored exactly (dot_f32 x c_j) against the first 64 words and settled eligible at
// the first positive score. Windows whose patches are all settled pick their patch from u0 right away
// (the contract's rank among the eligible ones); the others are decided by the exact top-k of all their
// patches. So the exact top-k (the prefilter machinery above, k = top_n) runs on the chosen patches plus
// the patches of unsettled windows: B x n_windows rows in the usual case, every row (as before, plus the
// first block) when nothing is positive early. A positive score settles a patch only while no score can
// be NaN (NaN outranks it in the top-k): regular patch rows are checked up front, and should the top-k
// pass meet an irregular word (Inf/NaN/huge), every patch is scored instead. The result is identical to
// cosine_topk of every patch + sample_windows. Then the sampling epilogue of the contract
// (sea_kernels.labels.sample_windows), replicating its float32 arithmetic (cumsum accumulates in double
// and rounds each prefix to float32, as torch's CPU cumsum does). Extra memory: a copy of the scored
// rows of the normalized patches and per patch a flag and a row index. float64: every patch is scored
// (the tiled float64 top-k), then the same epilogue.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
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
  int64_t sub_rows;  // rows per matrix product of the float32 path's prefilter
};

// Row blocks of at most max_rows (one block per thread when M >= min_rows x threads); the vocabulary
// split between threads when there are fewer blocks than threads.
Plan make_plan(int64_t M, int64_t q, int64_t tile, int64_t row_block, int64_t threads, int64_t max_rows,
               int64_t min_rows) {
  const int64_t nt = std::max<int64_t>(1, threads);
  Plan p;
  p.tile = tile > 0 ? tile : 512;
  if (row_block > 0) {
    p.rows_per_block = std::min(row_block, M);
  } else {
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
  p.sub_rows = std::min<int64_t>(p.rows_per_block, 256);
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

  // Many rows per matmul (MKL efficiency) and a score buffer that stays near L2.
  const Plan plan = make_plan(M, q, tile, row_block, at::get_num_threads(), 640, 64);
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

// ============================================================================ float32: exact top-k

constexpr double kU32 = 5.9604644775390625e-08;  // 2^-24, the float32 unit roundoff
constexpr double kBf16Out = 3.90625e-03;          // 2^-8: |x - bf16(x)| <= 2^-8 |bf16(x)| (round to nearest)
constexpr double kTinyNormal = 1.1754943508222875e-38;  // 2^-126
constexpr double kAbsMargin = 1e-6;               // underflow and the float32 rounding of the bound itself
constexpr double kMaxRegular = 1e30;              // larger norms (or Inf/NaN) are scored exactly

enum Prefilter : int64_t { kExact = 0, kFloat32 = 1, kBFloat16 = 2, kInt8 = 3 };

#if defined(__AVX512F__)
// Lanes summed pairwise: l += l + w for w = 8, 4, 2, 1.
inline float reduce16(__m512 z) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}
#endif

inline float reduce16(float* s) {  // the same order on an array
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// The float32 dot product of the contract: lane l (of 64) accumulates the terms t = l (mod 64) with
// fused multiply-adds in increasing t, then the lanes are summed pairwise (l += l + w, w = 32 .. 1).
// The AVX-512 and the portable code compute exactly this.
inline float dot_f32(const float* a, const float* b, int64_t d) {
#if defined(__AVX512F__)
  __m512 z[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t t = 0;
  for (; t + 64 <= d; t += 64)
    for (int i = 0; i < 4; ++i) z[i] = _mm512_fmadd_ps(_mm512_loadu_ps(a + t + 16 * i), _mm512_loadu_ps(b + t + 16 * i), z[i]);
  const int64_t rem = d - t;
  for (int i = 0; i < 4 && 16 * i < rem; ++i) {
    const int64_t m = std::min<int64_t>(16, rem - 16 * i);
    const __mmask16 k = static_cast<__mmask16>((1u << m) - 1u);
    z[i] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k, a + t + 16 * i), _mm512_maskz_loadu_ps(k, b + t + 16 * i),
                                 z[i], k);
  }
  return reduce16(_mm512_add_ps(_mm512_add_ps(z[0], z[2]), _mm512_add_ps(z[1], z[3])));
#else
  constexpr int L = 64;
  float acc[L];
  for (int l = 0; l < L; ++l) acc[l] = 0.0f;
  int64_t t = 0;
  for (; t + L <= d; t += L)
    for (int l = 0; l < L; ++l) acc[l] = std::fma(a[t + l], b[t + l], acc[l]);
  const int rem = static_cast<int>(d - t);
  for (int l = 0; l < rem; ++l) acc[l] = std::fma(a[t + l], b[t + l], acc[l]);
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
#endif
}

inline uint16_t to_bf16(float f) {  // round to nearest even; subnormals flush to a signed zero
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7f800000u) == 0) return static_cast<uint16_t>((b >> 16) & 0x8000u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float from_bf16(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// One vector y of the float32 scoring: its factor c = sign / max(|y|, eps) (16 lanes of fused
// multiply-adds summed left to right: the contract), and upper bounds of |y|, |y~| and |y - y~| for
// the prefilter copy y~ = bf16(y) (written to `low` when not null; else y~ = y).
struct VecStats {
  float c, amax;
  double n, nt, ne;
  bool regular;
};

// |y|^2 of the contract: 16 lanes of fused multiply-adds (lane l: terms t = l mod 16), summed pairwise.
// Also max |y_t| into *amax.
inline float sum_squares(const float* y, int64_t d, float* amax) {
#if defined(__AVX512F__)
  __m512 s = _mm512_setzero_ps(), m = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= d; t += 16) {
    const __m512 v = _mm512_loadu_ps(y + t);
    s = _mm512_fmadd_ps(v, v, s);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  if (t < d) {
    const __mmask16 k = static_cast<__mmask16>((1u << (d - t)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(k, y + t);
    s = _mm512_mask3_fmadd_ps(v, v, s, k);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  *amax = _mm512_reduce_max_ps(m);
  return reduce16(s);
#else
  float s[16] = {0};
  float m = 0.0f;
  for (int64_t t0 = 0; t0 < d; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, d - t0));
    for (int l = 0; l < n; ++l) {
      s[l] = std::fma(y[t0 + l], y[t0 + l], s[l]);
      m = std::max(m, std::fabs(y[t0 + l]));
    }
  }
  *amax = m;
  return reduce16(s);
#endif
}

VecStats vec_stats(const float* y, int64_t d, float sign, uint16_t* low) {
  float amax;
  const float sum = sum_squares(y, d, &amax);
  float sum_t = sum, sum_e = 0.0f;
  if (low != nullptr) {
    float st[16] = {0}, se[16] = {0};
    for (int64_t t0 = 0; t0 < d; t0 += 16) {
      const int m = static_cast<int>(std::min<int64_t>(16, d - t0));
      for (int l = 0; l < m; ++l) {
        const uint16_t h = to_bf16(y[t0 + l]);
        low[t0 + l] = h;
        const float yt = from_bf16(h), e = y[t0 + l] - yt;  // exact
        st[l] = std::fma(yt, yt, st[l]);
        se[l] = std::fma(e, e, se[l]);
      }
    }
    sum_t = reduce16(st);
    sum_e = reduce16(se);
  }
  const float norm = std::sqrt(sum);
  VecStats r;
  r.c = sign / (norm > static_cast<float>(kNormEps) ? norm : static_cast<float>(kNormEps));
  // float32 sums of squares: relative error <= gamma_(d+16), absolute <= (d+16) 2^-126 from underflow
  const double grow = 1.0 + 2.0 * static_cast<double>(d + 16) * kU32, under = static_cast<double>(d + 16) * kTinyNormal;
  auto ub = [&](float x) { return std::sqrt(static_cast<double>(x) * grow + under) * (1.0 + 1e-12); };
  r.n = ub(sum);
  r.nt = ub(sum_t);
  r.ne = low != nullptr ? ub(sum_e) : 0.0;
  r.regular = std::isfinite(r.n) && r.n <= kMaxRegular && std::isfinite(r.c) && std::isfinite(r.nt);
  r.amax = amax;
  return r;
}

// int8 copy y~ = s q of y (q = round(y / s) in [-127, 127], s = max |y| / 127; the prefilter's dot products
// are then exact integers): writes q, returns s and sets st.ne >= |y - y~| (float32 residuals, one
// rounding each, summed as the norms) and st.nt = st.n + st.ne >= |y~|.
float quantize_i8(const float* y, int64_t d, int8_t* q, VecStats& st) {
  const float mx = st.amax;
  const float s = mx > 0.0f && std::isfinite(mx) ? mx / 127.0f : 1.0f, inv = 1.0f / s;
  float se[16] = {0};
  int64_t t = 0;
#if defined(__AVX512F__)
  __m512 a_e = _mm512_setzero_ps();
  const __m512 vinv = _mm512_set1_ps(inv), vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (; t + 16 <= d; t += 16) {
    const __m512 v = _mm512_loadu_ps(y + t);
    __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));  // round to nearest even
    qi = _mm512_min_epi32(_mm512_max_epi32(qi, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + t), _mm512_cvtepi32_epi8(qi));
    const __m512 e = _mm512_fnmadd_ps(vs, _mm512_cvtepi32_ps(qi), v);
    a_e = _mm512_fmadd_ps(e, e, a_e);
  }
  _mm512_storeu_ps(se, a_e);
#endif
  for (; t < d; ++t) {
    const float qf = std::min(127.0f, std::max(-127.0f, std::nearbyint(y[t] * inv)));
    q[t] = static_cast<int8_t>(qf);
    const float e = std::fma(-s, qf, y[t]);
    se[t % 16] = std::fma(e, e, se[t % 16]);
  }
  const double grow = 1.0 + 2.0 * static_cast<double>(d + 16) * kU32, under = static_cast<double>(d + 16) * kTinyNormal;
  st.ne = std::sqrt(static_cast<double>(reduce16(se)) * grow + under) * (1.0 + 4.0 * kU32);
  st.nt = st.n + st.ne;
  return s;
}

// A vector's statistics for `mode`, writing its low-precision copy into row `r` of `low`; the int8 scale
// (1 for the other modes) into *scale.
VecStats prefilter_stats(int64_t mode, const float* y, int64_t d, float sign, at::Tensor& low, int64_t r, float* scale) {
  *scale = 1.0f;
  if (mode == kBFloat16) return vec_stats(y, d, sign, reinterpret_cast<uint16_t*>(low.data_ptr<at::BFloat16>()) + r * d);
  VecStats st = vec_stats(y, d, sign, nullptr);
  if (mode == kInt8 && st.regular) *scale = quantize_i8(y, d, low.data_ptr<int8_t>() + r * d, st);
  return st;
}

at::ScalarType low_dtype(int64_t mode) { return mode == kBFloat16 ? at::kBFloat16 : at::kChar; }
at::ScalarType score_dtype(int64_t mode) {
  return mode == kBFloat16 ? at::kBFloat16 : (mode == kInt8 ? at::kInt : at::kFloat);
}

// Where a word's float32 vector comes from: the vocabulary itself (float32, contiguous) or a row
// converted into scratch.
struct VocabRows {
  const at::Tensor* vocab;
  const float* f32;  // non-null when the vocabulary is float32 and contiguous
  int64_t d;

  const float* row(int64_t j, float* scratch) const {
    if (f32 != nullptr) return f32 + j * d;
    at::Tensor dst = at::from_blob(scratch, {d}, at::TensorOptions().dtype(at::kFloat));
    dst.copy_(vocab->select(0, j));
    return scratch;
  }

  // rows [j0, j0 + n) as float32 (a view, or copied into `buf`)
  const float* tile(int64_t j0, int64_t n, at::Tensor& buf) const {
    if (f32 != nullptr) return f32 + j0 * d;
    at::Tensor dst = buf.narrow(0, 0, n);
    dst.copy_(vocab->narrow(0, j0, n));
    return dst.data_ptr<float>();
  }
};

// The per-row state of one vocabulary split: exact top-k and L.
struct RowState {
  float L;  // a lower bound of the row's k-th largest exact score
  RowTopK<float> exact;
  int64_t rescored;  // words scored exactly
};

// Work shared by the threads of one call.
struct Problem {
  const float* pn;  // normalized patches (M x d)
  VocabRows vocab;
  int64_t k;
  int64_t d;
  std::atomic<float>* row_L;  // per row, the largest L of any vocabulary split (a lower bound for all)
  std::atomic<bool>* irregular;  // set when a vocabulary tile holds a word with Inf/NaN/huge values
};

inline float share_L(std::atomic<float>& shared, float L) {  // max(shared, L), stored and returned
  float cur = shared.load(std::memory_order_relaxed);
  while (L > cur && !shared.compare_exchange_weak(cur, L, std::memory_order_relaxed)) {
  }
  return std::max(cur, L);
}

constexpr int64_t kCompactEvery = 8;  // exact scores added to a row's top-k between two compactions

inline void push_exact(RowState& st, float s, int64_t j) {
  if (!(s < st.exact.thr)) st.exact.push(s, j);  // ties are kept: the compaction orders them by index
}

// L <- the larger of L, the top-k's threshold (the k-th best exact score, compacted every few scores so that
// it stays close to current) and the L of the row's other vocabulary splits.
inline void raise_L(RowState& st, const Problem& pb, int64_t r) {
  const bool first = st.exact.thr == -std::numeric_limits<float>::infinity();
  if (st.exact.cnt >= pb.k + kCompactEvery || (first && st.exact.cnt >= pb.k)) st.exact.compact();
  st.L = share_L(pb.row_L[r], std::max(st.L, st.exact.thr));
}

inline float score_value(float x) { return x; }
inline float score_value(uint16_t x) { return from_bf16(x); }
inline float score_value(int32_t x) { return static_cast<float>(x); }

// Prefilter scores v = raw * xm * w_j of one row against one tile (float32 rows y): a word whose bound
// reaches L (v + e + rel |v| >= L) is scored exactly at once, from the tile while it is in cache, into the
// row's top-k, and L rises with the top-k's threshold.
template <typename S>
void filter_tile_row(const S* raw, const float* w, const float* c, const float* y, int64_t n, int64_t j0, float xm,
                     float e, float rel, RowState& st, const Problem& pb, int64_t r) {
  const float* x = pb.pn + r * pb.d;
  auto take = [&](int64_t t) {
    push_exact(st, dot_f32(x, y + t * pb.d, pb.d) * c[t], j0 + t);
    ++st.rescored;
  };
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 vL = _mm512_set1_ps(st.L);
  const __m512 ve = _mm512_set1_ps(e), vr = _mm512_set1_ps(rel), vxm = _mm512_set1_ps(xm);
  for (; j + 16 <= n; j += 16) {
    __m512 v;
    if constexpr (std::is_same_v<S, uint16_t>) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(raw + j));
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if constexpr (std::is_same_v<S, int32_t>) {
      v = _mm512_cvtepi32_ps(_mm512_loadu_si512(raw + j));
    } else {
      v = _mm512_loadu_ps(raw + j);
    }
    v = _mm512_mul_ps(_mm512_mul_ps(v, vxm), _mm512_loadu_ps(w + j));
    const __m512 up = _mm512_add_ps(v, _mm512_fmadd_ps(vr, _mm512_abs_ps(v), ve));
    const __mmask16 m = _mm512_cmp_ps_mask(up, vL, _CMP_GE_OQ);
    if (m != 0) {
      alignas(64) float tu[16];
      _mm512_store_ps(tu, up);
      uint32_t bits = m;
      while (bits) {
        const int b = __builtin_ctz(bits);
        bits &= bits - 1;
        if (tu[b] >= st.L) take(j + b);
      }
      raise_L(st, pb, r);
      vL = _mm512_set1_ps(st.L);
    }
  }
#endif
  for (; j < n; ++j) {
    const float v = score_value(raw[j]) * xm * w[j];
    if (v + (e + rel * std::fabs(v)) >= st.L) {
      take(j);
      raise_L(st, pb, r);
    }
  }
}

// Rows x tile scored exactly (prefilter 0, and rows or tiles with Inf/NaN/huge values).
void exact_tile_row(const float* y, const float* c, int64_t n, int64_t j0, RowState& st, const Problem& pb,
                    int64_t r) {
  const float* x = pb.pn + r * pb.d;
  for (int64_t j = 0; j < n; ++j) push_exact(st, dot_f32(x, y + j * pb.d, pb.d) * c[j], j0 + j);
  st.rescored += n;
}

struct TileStats {
  double A = 0, B = 0, G = 0;  // max_j |c_j| |y~_j|, |c_j| |y_j - y~_j|, |c_j| |y_j|
  bool regular = true;
};

// The bound's constant part for a row x against a tile: e = |c| (|x - x~| |y~| + |x~| |y - y~| + |x - x~|
// |y - y~| + gamma (|x~| |y~| + |x| |y|)) + margin (the row-dependent part rel |v| is added per score).
inline float tile_error(const VecStats& x, const TileStats& t, double gamma) {
  const double e = x.ne * t.A + x.nt * t.B + x.ne * t.B + gamma * (x.nt * t.A + x.n * t.G);
  return static_cast<float>(e * (1.0 + 1e-6) + kAbsMargin);
}

// The patches' side of a call: statistics, low-precision copy and int8 scales of every row.
struct PatchSide {
  std::vector<VecStats> stats;
  std::vector<float> scale;
  at::Tensor low;
};

// One word's prefilter data: c_j, w_j (c_j times its int8 scale), the bound's terms abg = (|c_j| |y~_j|,
// |c_j| |y_j - y~_j|, |c_j| |y_j|) and whether it is regular; its low-precision copy goes to row r of `low`.
inline void word_stats(int64_t mode, const float* y, int64_t d, float sign, at::Tensor& low, int64_t r, float* c,
                       float* w, double* abg, uint8_t* regular) {
  float scale;
  const VecStats st = prefilter_stats(mode, y, d, sign, low, r, &scale);
  const double ac = std::fabs(static_cast<double>(st.c));
  *c = st.c;
  *w = st.c * scale;
  abg[0] = ac * st.nt;
  abg[1] = ac * st.ne;
  abg[2] = ac * st.n;
  *regular = st.regular;
}

// The prefilter data of words [j0, j0 + n): per word c, w, abg, regularity, and the low-precision rows.
struct WordSide {
  const float* c;
  const float* w;
  const double* abg;
  const uint8_t* regular;
  at::Tensor low;  // (n, d) int8 / bf16 rows (undefined for the other modes)

  TileStats maxima(int64_t n) const {  // the tile's maxima for the bound
    TileStats ts;
    for (int64_t j = 0; j < n; ++j) {
      ts.A = std::max(ts.A, abg[3 * j]);
      ts.B = std::max(ts.B, abg[3 * j + 1]);
      ts.G = std::max(ts.G, abg[3 * j + 2]);
      ts.regular = ts.regular && regular[j];
    }
    ts.regular = ts.regular && std::isfinite(ts.A + ts.B + ts.G);
    return ts;
  }
};

// The whole vocabulary's prefilter data, from prepare_vocab (kept between calls by the Python side, so
// that a constant vocabulary is converted once): low (q x d, int8 / bf16, empty for the other modes), c and
// w (q, float32), abg (q x 3, float64), regular (q, uint8).
struct PreparedVocab {
  std::vector<at::Tensor> t;  // empty: none given

  bool given() const { return !t.empty(); }
  WordSide words(int64_t j0, int64_t n) const {
    return WordSide{t[1].data_ptr<float>() + j0, t[2].data_ptr<float>() + j0, t[3].data_ptr<double>() + 3 * j0,
                    t[4].data_ptr<uint8_t>() + j0, t[0].numel() > 0 ? t[0].narrow(0, j0, n) : at::Tensor()};
  }
};

// Per-thread buffers of one task: a float32 tile (when the vocabulary is not float32), the prefilter
// scores, and (without a prepared vocabulary) the tile's prefilter data.
struct TileBuffers {
  at::Tensor ybuf, ylow, sbuf;
  std::vector<float> c, w;
  std::vector<double> abg;
  std::vector<uint8_t> regular;
};

// The prefilter data of tile rows y[0..n), computed into tb.
WordSide tile_words(int64_t mode, const float* y, int64_t n, int64_t d, float sign, TileBuffers& tb) {
  for (int64_t j = 0; j < n; ++j)
    word_stats(mode, y + j * d, d, sign, tb.ylow, j, &tb.c[j], &tb.w[j], &tb.abg[3 * j], &tb.regular[j]);
  return WordSide{tb.c.data(), tb.w.data(), tb.abg.data(), tb.regular.data(),
                  tb.ylow.defined() ? tb.ylow.narrow(0, 0, n) : at::Tensor()};
}

int64_t effective_mode(int64_t mode, int64_t d) {
  TORCH_CHECK(mode >= kExact && mode <= kInt8, "cosine_topk: prefilter must be 0, 1, 2 or 3");
  return mode == kInt8 && d > 100000 ? kFloat32 : mode;  // int32 dot products of d int8 pairs must not overflow
}

// The whole vocabulary's prefilter data for `mode` and the sign of `negate` (see PreparedVocab).
std::vector<at::Tensor> prepare_vocab(const at::Tensor& vocab, bool negate, int64_t prefilter) {
  TORCH_CHECK(vocab.dim() == 2 && vocab.device().is_cpu(), "prepare_vocab: a CPU (q, d) vocabulary expected");
  TORCH_CHECK(vocab.scalar_type() != at::kDouble, "prepare_vocab: float32 scoring only");
  at::NoGradGuard no_grad;
  const int64_t q = vocab.size(0), d = vocab.size(1), mode = effective_mode(prefilter, d);
  const auto opts = vocab.options();
  at::Tensor low = (mode == kBFloat16 || mode == kInt8) ? at::empty({q, d}, opts.dtype(low_dtype(mode)))
                                                         : at::empty({0}, opts.dtype(at::kChar));
  at::Tensor c = at::empty({q}, opts.dtype(at::kFloat)), w = at::empty({q}, opts.dtype(at::kFloat));
  at::Tensor abg = at::empty({q, 3}, opts.dtype(at::kDouble)), regular = at::empty({q}, opts.dtype(at::kByte));
  const bool direct = vocab.scalar_type() == at::kFloat && vocab.is_contiguous();
  const VocabRows rows{&vocab, direct ? vocab.data_ptr<float>() : nullptr, d};
  at::parallel_for(0, q, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(d));
    for (int64_t j = begin; j < end; ++j)
      word_stats(mode, rows.row(j, scratch.data()), d, negate ? -1.0f : 1.0f, low, j, c.data_ptr<float>() + j,
                 w.data_ptr<float>() + j, abg.data_ptr<double>() + 3 * j, regular.data_ptr<uint8_t>() + j);
  });
  return {low, c, w, abg, regular};
}

// A prepared vocabulary given to cosine_topk / patch_labels must be the one of this vocabulary and mode.
PreparedVocab check_prepared(const std::vector<at::Tensor>& prepared, const at::Tensor& vocab, int64_t mode) {
  if (prepared.empty() || mode == kExact) return PreparedVocab{};
  const int64_t q = vocab.size(0);
  const bool low_mode = mode == kBFloat16 || mode == kInt8;
  TORCH_CHECK(prepared.size() == 5 && prepared[1].numel() == q && prepared[2].numel() == q &&
                  prepared[3].numel() == 3 * q && prepared[4].numel() == q &&
                  prepared[1].scalar_type() == at::kFloat && prepared[2].scalar_type() == at::kFloat &&
                  prepared[3].scalar_type() == at::kDouble && prepared[4].scalar_type() == at::kByte &&
                  (low_mode ? prepared[0].sizes() == vocab.sizes() && prepared[0].scalar_type() == low_dtype(mode)
                            : prepared[0].numel() == 0),
              "cosine_topk: the prepared vocabulary does not match the vocabulary or the prefilter");
  for (const auto& t : prepared) TORCH_CHECK(t.is_contiguous(), "cosine_topk: prepared tensors must be contiguous");
  return PreparedVocab{prepared};
}

// Prefilter scores of patch rows [r, r + sb) against the tile (sb x n, into tb.sbuf).
void prefilter_product(int64_t mode, const Problem& pb, const PatchSide& xp, const float* y, const at::Tensor& ylow,
                       int64_t r, int64_t sb, int64_t n, TileBuffers& tb) {
  const int64_t d = pb.d;
  at::Tensor out = tb.sbuf.narrow(0, 0, sb * n).view({sb, n});
  if (mode == kFloat32) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor yt = at::from_blob(const_cast<float*>(y), {n, d}, f32);
    at::mm_out(out, at::from_blob(const_cast<float*>(pb.pn + r * d), {sb, d}, f32), yt.t());
  } else if (mode == kBFloat16) {
    at::mm_out(out, xp.low.narrow(0, r, sb), ylow.t());
  } else {
    at::_int_mm_out(out, xp.low.narrow(0, r, sb), ylow.t());
  }
}

// One task: rows [r0, r0 + mb) against the vocabulary range of `split`.
void run_task32(const Problem& pb, const Plan& plan, int64_t mode, bool negate, const PatchSide& xp,
                const PreparedVocab& pv, RowState* states, int64_t M, int64_t q, int64_t r0, int64_t mb, int64_t split,
                TileBuffers& tb) {
  const int64_t d = pb.d, T = plan.tile;
  const double gamma = static_cast<double>(d + 64) * kU32 / (1.0 - static_cast<double>(d + 64) * kU32);
  const float rel = static_cast<float>((mode == kBFloat16 ? kBf16Out * (1.0 + 1e-6) : 0.0) + 8.0 * kU32);
  const int64_t j_begin = split * plan.tiles_per_split * T;
  const int64_t j_end = std::min(q, j_begin + plan.tiles_per_split * T);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += T) {
    const int64_t n = std::min(T, j_end - j0);
    const float* y = pb.vocab.tile(j0, n, tb.ybuf);
    const WordSide words = pv.given() ? pv.words(j0, n) : tile_words(mode, y, n, d, negate ? -1.0f : 1.0f, tb);
    const TileStats ts = words.maxima(n);
    if (!ts.regular) pb.irregular->store(true, std::memory_order_relaxed);
    const bool exact = mode == kExact || !ts.regular;
    for (int64_t s0 = 0; s0 < mb; s0 += plan.sub_rows) {
      const int64_t sb = std::min(plan.sub_rows, mb - s0);
      if (!exact) prefilter_product(mode, pb, xp, y, words.low, r0 + s0, sb, n, tb);
      for (int64_t t = 0; t < sb; ++t) {
        const int64_t r = r0 + s0 + t;
        RowState& st = states[split * M + r];
        if (exact || !xp.stats[r].regular) {
          exact_tile_row(y, words.c, n, j0, st, pb, r);
          continue;
        }
        const float e = tile_error(xp.stats[r], ts, gamma), xm = xp.scale[r];
        if (mode == kBFloat16)
          filter_tile_row(reinterpret_cast<const uint16_t*>(tb.sbuf.data_ptr<at::BFloat16>()) + t * n, words.w,
                          words.c, y, n, j0, xm, e, rel, st, pb, r);
        else if (mode == kInt8)
          filter_tile_row(tb.sbuf.data_ptr<int32_t>() + t * n, words.w, words.c, y, n, j0, xm, e, rel, st, pb, r);
        else
          filter_tile_row(tb.sbuf.data_ptr<float>() + t * n, words.w, words.c, y, n, j0, xm, e, rel, st, pb, r);
      }
    }
  }
}

// Row r's result from all splits: the top-k of their exact top-k lists, and the number of words scored exactly.
void finish_row32(const RowState* states, int64_t n_splits, int64_t M, int64_t r, const Problem& pb,
                  std::vector<Entry<float>>& all, float* out_v, int64_t* out_i, int64_t* out_n) {
  all.clear();
  int64_t rescored = 0;
  for (int64_t s = 0; s < n_splits; ++s) {
    const RowState& st = states[s * M + r];
    all.insert(all.end(), st.exact.e, st.exact.e + st.exact.cnt);
    rescored += st.rescored;
  }
  TORCH_CHECK(static_cast<int64_t>(all.size()) >= pb.k, "cosine_topk: internal error (fewer than k survivors)");
  write_row<float>(all.data(), static_cast<int64_t>(all.size()), pb.k, out_v, out_i);
  out_n[0] = rescored;
}

// (values, indices, rescored): the exact float32 top-k of normalized patches pn, and per row the number
// of words scored exactly. *vocab_regular (when given): whether every vocabulary word was regular (finite,
// norm <= 1e30), so that no score of a regular row can be NaN or infinite (true when M == 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_f32(const at::Tensor& pn, const at::Tensor& vocab, int64_t k,
                                                        bool negate, int64_t tile, int64_t row_block, int64_t prefilter,
                                                        const std::vector<at::Tensor>& prepared,
                                                        bool* vocab_regular = nullptr) {
  const int64_t M = pn.size(0), d = pn.size(1), q = vocab.size(0), mode = effective_mode(prefilter, d);
  TORCH_CHECK(q < std::numeric_limits<int32_t>::max(), "cosine_topk: vocabulary too large");
  const PreparedVocab pv = check_prepared(prepared, vocab, mode);
  const auto opts = pn.options();
  at::Tensor values = at::empty({M, k}, opts.dtype(at::kFloat));
  at::Tensor indices = at::empty({M, k}, opts.dtype(at::kLong));
  at::Tensor rescored = at::zeros({M}, opts.dtype(at::kLong));
  if (vocab_regular != nullptr) *vocab_regular = true;
  if (M == 0) return {values, indices, rescored};

  const bool direct = vocab.scalar_type() == at::kFloat && vocab.is_contiguous();
  std::vector<std::atomic<float>> row_L(static_cast<size_t>(M));
  for (auto& L : row_L) L.store(-std::numeric_limits<float>::infinity());
  std::atomic<bool> irregular{false};
  const Problem pb{pn.data_ptr<float>(), VocabRows{&vocab, direct ? vocab.data_ptr<float>() : nullptr, d}, k, d,
                   row_L.data(), &irregular};
  // A small call (under ~1 ms of work, automatic tiling) runs in the calling thread: no thread-pool wake-ups.
  const bool small = tile <= 0 && row_block <= 0 && static_cast<double>(M) * q * d < 4e6;
  // Row blocks of up to 4096 rows: each block converts the vocabulary once.
  const Plan plan = make_plan(M, q, tile, row_block, small ? 1 : at::get_num_threads(), 4096, 4096);

  // Row statistics and the low-precision copy of the patches.
  PatchSide xp;
  xp.stats.resize(static_cast<size_t>(M));
  xp.scale.assign(static_cast<size_t>(M), 1.0f);
  if (mode == kBFloat16 || mode == kInt8) xp.low = at::empty({M, d}, opts.dtype(low_dtype(mode)));
  at::parallel_for(0, M, small ? M : 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) xp.stats[r] = prefilter_stats(mode, pb.pn + r * d, d, 1.0f, xp.low, r, &xp.scale[r]);
  });

  const int64_t kcap = k + std::max<int64_t>(k, 32);
  const int64_t n_states = plan.n_vocab_splits * M;
  std::vector<Entry<float>> exact(static_cast<size_t>(n_states * kcap));
  std::vector<RowState> states(static_cast<size_t>(n_states));
  for (int64_t s = 0; s < n_states; ++s) {
    RowState& st = states[s];
    st.L = -std::numeric_limits<float>::infinity();
    st.exact = RowTopK<float>{exact.data() + s * kcap, 0, k, kcap, -std::numeric_limits<float>::infinity()};
    st.rescored = 0;
  }

  const int64_t n_tasks = plan.n_row_blocks * plan.n_vocab_splits;
  at::parallel_for(0, n_tasks, small ? n_tasks : 1, [&](int64_t t_begin, int64_t t_end) {
    const int64_t T = plan.tile;
    TileBuffers tb;
    if (!direct) tb.ybuf = at::empty({T, d}, opts.dtype(at::kFloat));
    tb.sbuf = at::empty({plan.sub_rows * T}, opts.dtype(score_dtype(mode)));
    if (!pv.given()) {
      if (mode == kBFloat16 || mode == kInt8) tb.ylow = at::empty({T, d}, opts.dtype(low_dtype(mode)));
      tb.c.resize(static_cast<size_t>(T));
      tb.w.resize(static_cast<size_t>(T));
      tb.abg.resize(static_cast<size_t>(3 * T));
      tb.regular.resize(static_cast<size_t>(T));
    }
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t blk = task / plan.n_vocab_splits, split = task % plan.n_vocab_splits;
      const int64_t r0 = blk * plan.rows_per_block, mb = std::min(plan.rows_per_block, M - r0);
      run_task32(pb, plan, mode, negate, xp, pv, states.data(), M, q, r0, mb, split, tb);
    }
  });

  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  int64_t* out_n = rescored.data_ptr<int64_t>();
  at::parallel_for(0, M, small ? M : 16, [&](int64_t begin, int64_t end) {
    std::vector<Entry<float>> all;
    for (int64_t r = begin; r < end; ++r)
      finish_row32(states.data(), plan.n_vocab_splits, M, r, pb, all, out_v + r * k, out_i + r * k, out_n + r);
  });
  if (vocab_regular != nullptr) *vocab_regular = !irregular.load();
  return {values, indices, rescored};
}

// The float32 score of every pair (M x q), for tests: the arithmetic that cosine_topk ranks.
at::Tensor scores_f32(const at::Tensor& pn, const at::Tensor& vocab, bool negate) {
  const int64_t M = pn.size(0), d = pn.size(1), q = vocab.size(0);
  at::Tensor out = at::empty({M, q}, pn.options().dtype(at::kFloat));
  at::Tensor v = vocab.to(at::kFloat).contiguous();
  const float* y = v.data_ptr<float>();
  const float* x = pn.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<float> c(static_cast<size_t>(q));
  for (int64_t j = 0; j < q; ++j) c[j] = vec_stats(y + j * d, d, negate ? -1.0f : 1.0f, nullptr).c;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < q; ++j) o[r * q + j] = dot_f32(x + r * d, y + j * d, d) * c[j];
  });
  return out;
}

at::Tensor normalize_rows(const at::Tensor& patches) {
  // The reference computes in float64 for float64 patches, else in float32.
  const auto acc = patches.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor p = patches.to(acc);
  return (p / p.norm(2, {1}, true).clamp_min(kNormEps)).contiguous();  // F.normalize
}

void check_topk_args(const at::Tensor& patches, const at::Tensor& vocab, int64_t k) {
  TORCH_CHECK(patches.dim() == 2 && vocab.dim() == 2, "cosine_topk: patches (M, d) and vocab (q, d) expected");
  TORCH_CHECK(patches.size(1) == vocab.size(1), "cosine_topk: feature dimensions differ");
  TORCH_CHECK(k >= 1 && k <= vocab.size(0), "cosine_topk: k must be in 1..q");
  TORCH_CHECK(patches.device().is_cpu() && vocab.device().is_cpu(), "cosine_topk: CPU tensors expected");
}

// (values, indices, rescored): rescored[r] is the number of words row r scored exactly (float32 path;
// zeros for float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_topk(const at::Tensor& patches, const at::Tensor& vocab,
                                                           int64_t k, bool negate, int64_t tile, int64_t row_block,
                                                           int64_t prefilter, const std::vector<at::Tensor>& prepared) {
  check_topk_args(patches, vocab, k);
  at::NoGradGuard no_grad;
  at::Tensor pn = normalize_rows(patches);
  if (pn.scalar_type() == at::kDouble) {
    auto tk = topk_kernel<double>(pn, vocab, k, negate, tile, row_block);
    return {std::get<0>(tk), std::get<1>(tk), at::zeros({pn.size(0)}, pn.options().dtype(at::kLong))};
  }
  return topk_f32(pn, vocab, k, negate, tile, row_block, prefilter, prepared);
}

at::Tensor exact_scores(const at::Tensor& patches, const at::Tensor& vocab, bool negate) {
  check_topk_args(patches, vocab, 1);
  TORCH_CHECK(patches.scalar_type() != at::kDouble, "exact_scores: float32 scoring only");
  at::NoGradGuard no_grad;
  return scores_f32(normalize_rows(patches), vocab, negate);
}

// ============================================================================ window sampling

// Windows of a window x window tiling of an H x W grid, partial at the right and bottom edges.
inline int64_t n_windows(int64_t H, int64_t W, int64_t window) {
  return ((H + window - 1) / window) * ((W + window - 1) / window);
}

// The patches of window w (row-major, inside the grid) into `out`; returns how many there are.
int64_t window_members(int64_t w, int64_t H, int64_t W, int64_t window, int64_t* out) {
  const int64_t nwx = (W + window - 1) / window, wy = w / nwx, wx = w % nwx;
  int64_t n = 0;
  for (int64_t y = wy * window; y < std::min(H, (wy + 1) * window); ++y)
    for (int64_t x = wx * window; x < std::min(W, (wx + 1) * window); ++x) out[n++] = y * W + x;
  return n;
}

// The chosen patch's rank among the window's `count` eligible ones: min(floor(u0 * count), count - 1),
// the product in float32 as (uniforms[..., 0] * count).floor() in the reference.
inline int64_t window_rank(float u0, int64_t count) {
  const float prod = u0 * static_cast<float>(count);
  return std::min(static_cast<int64_t>(std::floor(prod)), count - 1);
}

// The sampled position among a patch's sorted top scores s[0..n) (s[0] > 0): the first candidate (a
// prefix of positive scores) whose normalized cumulative score exceeds u1, else the last. cumsum
// accumulates in double and rounds each prefix to float32, as torch's CPU cumsum; cdf: n floats.
int64_t sample_candidate(const float* s, int64_t n, float u1, float* cdf) {
  int64_t m = 0;
  while (m < n && s[m] > 0.0f) ++m;
  TORCH_CHECK(m > 0, "patch_labels: internal error (a chosen patch without candidates)");
  double acc = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    acc += static_cast<double>(s[j]);
    cdf[j] = static_cast<float>(acc);
  }
  const float total = cdf[m - 1];
  for (int64_t j = 0; j < m; ++j)
    if (u1 < cdf[j] / total) return j;
  return m - 1;
}

// The four (B, n_windows) outputs of patch_labels.
struct WindowLabels {
  at::Tensor patch, label, score, valid;

  WindowLabels(int64_t B, int64_t nw, const at::TensorOptions& opts)
      : patch(at::empty({B, nw}, opts.dtype(at::kLong))),
        label(at::empty({B, nw}, opts.dtype(at::kLong))),
        score(at::empty({B, nw}, opts.dtype(at::kFloat))),
        valid(at::empty({B, nw}, opts.dtype(at::kBool))) {}

  // Window bw (b * n_windows + w): patch p with the candidate `pick` of its top scores s and words ix,
  // or invalid when p < 0.
  void set(int64_t bw, int64_t p, const float* s, const int64_t* ix, int64_t pick) {
    patch.data_ptr<int64_t>()[bw] = p < 0 ? -1 : p;
    label.data_ptr<int64_t>()[bw] = p < 0 ? -1 : ix[pick];
    score.data_ptr<float>()[bw] = p < 0 ? 0.0f : s[pick];
    valid.data_ptr<bool>()[bw] = p >= 0;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const { return {patch, label, score, valid}; }
};

void check_uniforms(const at::Tensor& u, int64_t B, int64_t nw) {
  TORCH_CHECK(u.dim() == 3 && u.size(0) == B && u.size(1) == nw && u.size(2) == 2,
              "patch_labels: uniforms must be (B, n_windows, 2)");
}

// Steps 2-4 of the contract into `out`. The sorted top scores of patch p of image b are row
// slot[b * P + p] of values (rows x n; slot null: row b * P + p); the patch is eligible when
// settled[b * P + p] (null: never settled) or its top-1 > 0.
void sample_rows(const uint8_t* settled, const int64_t* slot, const at::Tensor& values, const at::Tensor& indices,
                 int64_t H, int64_t W, int64_t window, const float* u, WindowLabels& out) {
  const int64_t P = H * W, nw = out.patch.size(1), n = values.size(1);
  const float* v = values.data_ptr<float>();
  const int64_t* ix = indices.data_ptr<int64_t>();
  at::parallel_for(0, out.patch.numel(), 4096, [&](int64_t begin, int64_t end) {  // ~0.1 us per window
    std::vector<int64_t> members(static_cast<size_t>(window * window));
    std::vector<float> cdf(static_cast<size_t>(n));
    auto row = [&](int64_t bp) { return slot != nullptr ? slot[bp] : bp; };
    for (int64_t bw = begin; bw < end; ++bw) {
      const int64_t base = (bw / nw) * P, size = window_members(bw % nw, H, W, window, members.data());
      int64_t count = 0;
      for (int64_t t = 0; t < size; ++t) {
        const int64_t bp = base + members[t];
        if ((settled != nullptr && settled[bp]) || v[row(bp) * n] > 0.0f) members[count++] = members[t];
      }
      if (count == 0) {
        out.set(bw, -1, nullptr, nullptr, 0);
        continue;
      }
      const int64_t p = members[window_rank(u[bw * 2], count)], r = row(base + p);
      TORCH_CHECK(r >= 0, "patch_labels: internal error (the chosen patch was not scored)");
      out.set(bw, p, v + r * n, ix + r * n, sample_candidate(v + r * n, n, u[bw * 2 + 1], cdf.data()));
    }
  });
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
  const int64_t B = values.size(0), n = values.size(2);
  const int64_t nw = n_windows(H, W, window);
  check_uniforms(uniforms, B, nw);
  WindowLabels out(B, nw, values.options());
  sample_rows(nullptr, nullptr, values.view({-1, n}), indices.view({-1, n}), H, W, window, uniforms.data_ptr<float>(),
              out);
  return out.tuple();
}

// ============================================================================ patch_labels

constexpr int64_t kFirstBlock = 64;  // words scored exactly, per patch, to settle its eligibility cheaply

// Per row of pn (M x d, float32): 1 when the row is regular and one of the first n words has a positive
// float32 score (dot_f32 x c_j, the arithmetic of topk_f32). When every word is regular no score of a
// regular row is NaN, so such a row's top-1 is > 0: the patch is eligible. 0: not settled.
std::vector<uint8_t> positive_in_first_block(const float* pn, int64_t M, int64_t d, const VocabRows& vocab, int64_t n,
                                             bool negate) {
  at::Tensor buf = at::empty({n, d}, at::TensorOptions().dtype(at::kFloat));
  const float* y = vocab.tile(0, n, buf);
  std::vector<float> c(static_cast<size_t>(n));
  std::vector<uint8_t> word_ok(static_cast<size_t>(n)), out(static_cast<size_t>(M), 0);
  for (int64_t j = 0; j < n; ++j) {
    const VecStats st = vec_stats(y + j * d, d, negate ? -1.0f : 1.0f, nullptr);
    c[j] = st.c;
    word_ok[j] = st.regular;
  }
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = pn + r * d;
      if (!vec_stats(x, d, 1.0f, nullptr).regular) continue;
      for (int64_t j = 0; j < n; ++j) {
        if (word_ok[j] && dot_f32(x, y + j * d, d) * c[j] > 0.0f) {
          out[r] = 1;
          break;
        }
      }
    }
  });
  return out;
}

// Per (image, patch) the row of the exact top-k that holds its scores, or -1: in a window whose patches
// are all settled eligible only the one the contract picks (known before any top-k), in any other
// window every patch (its top-1 decides its eligibility).
std::vector<int64_t> rows_to_score(const std::vector<uint8_t>& settled, int64_t B, int64_t H, int64_t W,
                                   int64_t window, const float* u, std::vector<int64_t>& rows) {
  const int64_t P = H * W, nw = n_windows(H, W, window);
  std::vector<int64_t> slot(static_cast<size_t>(B * P), -1), members(static_cast<size_t>(window * window));
  auto add = [&](int64_t bp) {
    slot[bp] = static_cast<int64_t>(rows.size());
    rows.push_back(bp);
  };
  for (int64_t bw = 0; bw < B * nw; ++bw) {
    const int64_t base = (bw / nw) * P, size = window_members(bw % nw, H, W, window, members.data());
    bool all = true;
    for (int64_t t = 0; t < size; ++t) all = all && settled[base + members[t]];
    if (all) {
      add(base + members[window_rank(u[bw * 2], size)]);
    } else {
      for (int64_t t = 0; t < size; ++t) add(base + members[t]);
    }
  }
  return slot;
}

// (patch, label, score, valid, scored): the contract's labels and the (B, P) mask of the patches whose
// exact top-k was computed. float32: eligibility first (positive_in_first_block), then the exact top-k
// of the chosen patches only (and of every patch of a window with an unsettled one). Should a vocabulary
// word be irregular (NaN scores can outrank a positive one), or for float64, every patch is scored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_labels(
    const at::Tensor& patches, const at::Tensor& vocab, int64_t H, int64_t W, int64_t top_n, int64_t window,
    bool negate, const at::Tensor& uniforms_in, int64_t tile, int64_t row_block, int64_t prefilter,
    const std::vector<at::Tensor>& prepared) {
  TORCH_CHECK(patches.dim() == 3 && patches.size(1) == H * W, "patch_labels: patches must be (B, H*W, d)");
  TORCH_CHECK(window >= 1, "patch_labels: window must be >= 1");
  const int64_t B = patches.size(0), P = patches.size(1), d = patches.size(2), q = vocab.size(0);
  at::Tensor flat = patches.reshape({B * P, d});
  check_topk_args(flat, vocab, top_n);
  at::NoGradGuard no_grad;
  at::Tensor pn = normalize_rows(flat);
  at::Tensor uniforms = uniforms_in.to(at::kFloat).contiguous();
  const int64_t nw = n_windows(H, W, window);
  check_uniforms(uniforms, B, nw);
  auto score_all = [&]() {
    at::Tensor v, ix;
    if (pn.scalar_type() == at::kDouble)
      std::tie(v, ix) = topk_kernel<double>(pn, vocab, top_n, negate, tile, row_block);
    else
      std::tie(v, ix, std::ignore) = topk_f32(pn, vocab, top_n, negate, tile, row_block, prefilter, prepared);
    auto out = sample_windows(v.view({B, P, top_n}), ix.view({B, P, top_n}), H, W, window, uniforms);
    return std::tuple_cat(out, std::make_tuple(at::ones({B, P}, pn.options().dtype(at::kBool))));
  };
  if (pn.scalar_type() == at::kDouble) return score_all();

  const bool direct = vocab.scalar_type() == at::kFloat && vocab.is_contiguous();
  const VocabRows words{&vocab, direct ? vocab.data_ptr<float>() : nullptr, d};
  const std::vector<uint8_t> settled =
      positive_in_first_block(pn.data_ptr<float>(), B * P, d, words, std::min(q, kFirstBlock), negate);
  const float* u = uniforms.data_ptr<float>();
  std::vector<int64_t> rows;
  const std::vector<int64_t> slot = rows_to_score(settled, B, H, W, window, u, rows);
  const at::Tensor idx =
      at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::TensorOptions().dtype(at::kLong));
  bool regular = true;
  auto tk = topk_f32(pn.index_select(0, idx), vocab, top_n, negate, tile, row_block, prefilter, prepared, &regular);
  if (!regular) return score_all();

  WindowLabels out(B, nw, pn.options());
  sample_rows(settled.data(), slot.data(), std::get<0>(tk), std::get<1>(tk), H, W, window, u, out);
  at::Tensor scored = at::zeros({B * P}, pn.options().dtype(at::kBool));
  scored.index_fill_(0, idx, true);
  return std::tuple_cat(out.tuple(), std::make_tuple(scored.view({B, P})));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SEA token-level labels: tiled cosine top-k and window label sampling (CPU)";
  m.def("cosine_topk", &cosine_topk, "cosine top-k over vocabulary tiles", py::arg("patches"), py::arg("vocab"),
        py::arg("k"), py::arg("negate"), py::arg("tile") = 0, py::arg("row_block") = 0, py::arg("prefilter") = 2,
        py::arg("prepared") = std::vector<at::Tensor>{});
  m.def("prepare_vocab", &prepare_vocab, "a vocabulary's prefilter data, to pass to several calls as `prepared`",
        py::arg("vocab"), py::arg("negate"), py::arg("prefilter"));
  m.def("exact_scores", &exact_scores, "the float32 scores cosine_topk ranks (M x q; for tests)", py::arg("patches"),
        py::arg("vocab"), py::arg("negate"));
  m.def("sample_windows", &sample_windows, "window label sampling from sorted top scores", py::arg("values"),
        py::arg("indices"), py::arg("H"), py::arg("W"), py::arg("window"), py::arg("uniforms"));
  m.def("patch_labels", &patch_labels, "window labels: eligibility, then the top-k of the chosen patches only",
        py::arg("patches"), py::arg("vocab"), py::arg("H"), py::arg("W"), py::arg("top_n"), py::arg("window"),
        py::arg("negate"), py::arg("uniforms"), py::arg("tile") = 0, py::arg("row_block") = 0,
        py::arg("prefilter") = 2, py::arg("prepared") = std::vector<at::Tensor>{});
}
