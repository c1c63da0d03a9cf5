// Symmetric InfoNCE (SEA Eq. 9) on CPU, tiled: no N x N matrix is ever formed.
//
// Logits l_ij = scale * cos(x_i, t_j) are produced one (tile x tile) block at a time: one at::mm
// (MKL) of a normalized row block of x against a normalized row block of t into a reused block
// buffer (each block is divided by its clamped norms in the accumulation dtype, as F.normalize
// does; x and t are never normalized or up-cast as a whole; strided inputs are fine), then the
// scale and the element-wise work of the block in fused passes (AVX-512 SLEEF exp, as ATen's).
//
// forward:  pass 1 scales the block and takes row and column maxima, pass 2 adds exp(l - max) to
//           the running row and column sums: online softmax statistics (m, z = sum exp(l - m)) in
//           both directions from one block. loss = 0.5/N * sum_i [(m_r_i - l_ii) + log z_r_i] +
//           [(m_c_i - l_ii) + log z_c_i], the terms as cross_entropy forms them, summed in double.
// backward: each block is recomputed and overwritten in place with
//           G~_ij = exp((l_ij - m_r_i) - log z_r_i) + exp((l_ij - m_c_j) - log z_c_j) - 2 delta_ij
//           (the diagonal as (P_r - 1) + (P_c - 1)) while sum(G~ * l) accumulates in double (the
//           scale gradient); then u_i += G~ @ t_hat_j and v_j += G~^T @ x_hat_i (at::addmm_), and
//           the normalization is differentiated like F.normalize (eps = 1e-12).
//           Four N x N x D products in all (forward 1, backward 3).
//
// Threads (the intra-op pool) work on whole blocks, with single-threaded MKL and ATen inside: on a
// shared machine a barrier per block (what multi-threaded MKL calls on small blocks amount to)
// costs more than the arithmetic. Forward: row blocks taken dynamically, no synchronization, each
// row block's column statistics kept apart (nb x N) and merged in block order. Backward: row block
// by row block, worker w owns the column blocks w, w + W, ... (so v_j has a single writer) and its
// own partial u, summed in worker order: one synchronization per row block. Every sum runs in an
// order fixed by the block grid: the results are deterministic.
//
// Extra memory: per thread one block and three (tile x D) blocks (mapped directly, see scratch()),
// O(N) statistics plus the nb x N column statistics of the forward, and the gradients (plus a
// float32 N x D accumulator for t's gradient when t is float16/bfloat16).
// sea_kernels/cpu/contrastive.py holds the PyTorch path with the same arithmetic.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>  // shipped with torch; libtorch_cpu exports the functions
#endif

namespace {

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's default eps

using at::Tensor;

// p[0..n) <- exp(p[0..n)), with the same SLEEF routine ATen's exp uses on AVX-512.
inline void exp_inplace(float* p, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(p + j, Sleef_expf16_u10(_mm512_loadu_ps(p + j)));
  if (j < n) {
    __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(p + j, k, Sleef_expf16_u10(_mm512_maskz_loadu_ps(k, p + j)));
    return;
  }
#endif
  for (; j < n; ++j) p[j] = std::exp(p[j]);
}

inline void exp_inplace(double* p, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 8 <= n; j += 8) _mm512_storeu_pd(p + j, Sleef_expd8_u10(_mm512_loadu_pd(p + j)));
#endif
  for (; j < n; ++j) p[j] = std::exp(p[j]);
}

// A scratch tensor of numel elements. Large ones are mapped directly and unmapped when freed:
// from malloc, a freed multi-megabyte block stays resident in the allocator's per-thread arena
// (glibc raises its mmap threshold after the first free), which would add the scratch of the
// forward to the peak memory of the backward.
Tensor scratch(int64_t numel, const at::TensorOptions& opt) {
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (bytes >= (size_t(1) << 20)) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      return at::from_blob(p, {numel}, [bytes](void* q) { munmap(q, bytes); }, opt);
    }
  }
#endif
  return at::empty({numel}, opt);
}

struct Blocks {
  int64_t n, tile;
  int64_t count() const { return (n + tile - 1) / tile; }
  int64_t begin(int64_t k) const { return k * tile; }
  int64_t end(int64_t k) const { return std::min(n, (k + 1) * tile); }
};

at::ScalarType acc_type(const Tensor& x, const Tensor& t) {
  return (x.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// Row norms of x in acc, converting one block at a time (into a scratch block, not per-block
// allocations, when x is not in acc).
Tensor norms(const Tensor& x, at::ScalarType acc, int64_t tile) {
  const auto opt = x.options().dtype(acc);
  Tensor out = at::empty({x.size(0)}, opt);
  Blocks b{x.size(0), tile};
  const int64_t bt = std::min(tile, x.size(0));
  Tensor buf = x.scalar_type() == acc ? Tensor() : scratch(bt * x.size(1), opt).view({bt, x.size(1)});
  for (int64_t k = 0; k < b.count(); ++k) {
    Tensor o = out.slice(0, b.begin(k), b.end(k));
    Tensor xb = x.slice(0, b.begin(k), b.end(k));
    if (buf.defined()) xb = buf.narrow(0, 0, xb.size(0)).copy_(xb);
    at::linalg_vector_norm_out(o, xb, 2, at::IntArrayRef{1});
  }
  return out;
}

// buf[:e-a] <- x[a:e] / max(|x|, eps) in acc (den's dtype), dividing as F.normalize does. buf is
// per-thread scratch: no allocation per block (freed blocks would stay resident in the
// allocator's per-thread arenas), and a 16-bit x is converted into it rather than into a temporary.
Tensor normalized(Tensor& buf, const Tensor& x, const Tensor& den, int64_t a, int64_t e) {
  Tensor out = buf.narrow(0, 0, e - a);
  Tensor d = den.slice(0, a, e).unsqueeze(1);
  if (x.scalar_type() == den.scalar_type()) {
    at::div_out(out, x.slice(0, a, e), d);
  } else {
    out.copy_(x.slice(0, a, e)).div_(d);
  }
  return out;
}

// Run f(k) for every block k in [0, nb) on the intra-op threads, each thread taking the next block
// from a shared counter (dynamic: a thread that the OS preempts does not hold the others up). Each
// thread first builds its scratch with make_scratch(). Inside, ATen ops and at::mm (MKL) run
// single-threaded: the only synchronization is the end of the loop.
template <typename S, typename F>
void for_each_block(int64_t nb, S make_scratch, F f) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nb);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    if (w0 >= w1) return;
    at::NoGradGuard no_grad;  // grad mode is thread-local: the pool threads start with it on
    auto scratch = make_scratch();
    for (int64_t k = next.fetch_add(1); k < nb; k = next.fetch_add(1)) f(k, scratch);
  });
}

// ------------------------------------------------------------------------------------ forward

// l (r x c) holds cos(x_i, t_j): scale it to logits in place and fold it into the running row
// stats (mr, zr) and column stats (mc, zc) (maxima m and sums z = sum exp(l - m)).
template <typename T>
void block_stats(T* l, int64_t r, int64_t c, T scale, T* mr, T* zr, T* mc, T* zc, T* work) {
  T* new_mc = work;   // c
  T* b = work + c;    // c
  // Pass 1: scale, row maxima, column maxima.
  std::copy(mc, mc + c, new_mc);
  for (int64_t i = 0; i < r; ++i) {
    T* row = l + i * c;
    T m = mr[i];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < c; ++j) {
      const T v = row[j] * scale;
      row[j] = v;
      m = std::max(m, v);
      new_mc[j] = std::max(new_mc[j], v);
    }
    zr[i] *= std::exp(mr[i] - m);  // 0 while mr is -inf
    mr[i] = m;
  }
  for (int64_t j = 0; j < c; ++j) {
    zc[j] *= std::exp(mc[j] - new_mc[j]);
    mc[j] = new_mc[j];
  }
  // Pass 2: exp(l - max) summed along rows and along columns.
  for (int64_t i = 0; i < r; ++i) {
    T* row = l + i * c;
    const T m = mr[i];
    T* a = work + 2 * c;  // c
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      a[j] = row[j] - m;
      b[j] = row[j] - mc[j];
    }
    exp_inplace(a, c);
    exp_inplace(b, c);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < c; ++j) {
      sum += a[j];
      zc[j] += b[j];
    }
    zr[i] += sum;
  }
}

std::vector<Tensor> forward(const Tensor& x, const Tensor& t, double s, int64_t tile) {
  TORCH_CHECK(x.dim() == 2 && t.sizes() == x.sizes(), "x and t must be (N, D) of one shape");
  TORCH_CHECK(tile >= 1, "tile must be >= 1");
  const auto acc = acc_type(x, t);
  const int64_t n = x.size(0), dim = x.size(1);
  const auto opt = x.options().dtype(acc);
  const double inf = std::numeric_limits<double>::infinity();
  Tensor nx = norms(x, acc, tile), nt = norms(t, acc, tile);
  Tensor den_x = nx.clamp_min(kNormEps), den_t = nt.clamp_min(kNormEps);
  Blocks B{n, tile};
  const int64_t nb = B.count(), bt = std::min(tile, n);
  Tensor m_r = at::full({n}, -inf, opt), z_r = at::zeros({n}, opt), diag = at::empty({n}, opt);
  // Column statistics of each row block (nb x N), merged in block order below: deterministic.
  Tensor pm = at::full({nb, n}, -inf, opt), pz = at::zeros({nb, n}, opt);
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_forward", [&] {
    struct Scratch {
      Tensor lbuf, xbuf, tbuf;
      std::vector<scalar_t> work;
    };
    for_each_block(
        nb,
        [&] {
          return Scratch{scratch(bt * bt, opt), scratch(bt * dim, opt).view({bt, dim}),
                         scratch(bt * dim, opt).view({bt, dim}), std::vector<scalar_t>(3 * bt)};
        },
        [&](int64_t bi, Scratch& sc) {
          const int64_t a = B.begin(bi), e = B.end(bi);
          Tensor xn = normalized(sc.xbuf, x, den_x, a, e);
          for (int64_t bj = 0; bj < nb; ++bj) {
            const int64_t c = B.begin(bj), d = B.end(bj);
            Tensor l = sc.lbuf.narrow(0, 0, (e - a) * (d - c)).view({e - a, d - c});
            at::mm_out(l, xn, normalized(sc.tbuf, t, den_t, c, d).t());
            block_stats<scalar_t>(l.data_ptr<scalar_t>(), e - a, d - c, static_cast<scalar_t>(s),
                                  m_r.data_ptr<scalar_t>() + a, z_r.data_ptr<scalar_t>() + a,
                                  pm.data_ptr<scalar_t>() + bi * n + c, pz.data_ptr<scalar_t>() + bi * n + c,
                                  sc.work.data());
            if (bi == bj) diag.slice(0, a, e).copy_(l.diagonal());
          }
        });
  });
  Tensor m_c = std::get<0>(pm.max(0));
  Tensor z_c = pz.mul_((pm - m_c.unsqueeze(0)).exp_()).sum(0);  // sums over blocks in order
  pm.reset();
  pz.reset();
  Tensor lz_r = z_r.log_(), lz_c = z_c.log_();
  // Summed in double: the O(N) terms are accurate, an N-term float32 sum would not be.
  Tensor total = (m_r - diag).add_(lz_r).sum(at::kDouble) + (m_c - diag).add_(lz_c).sum(at::kDouble);
  Tensor loss = (total * (0.5 / static_cast<double>(n))).to(acc);
  return {loss, nx, nt, m_r, lz_r, m_c, lz_c};
}

// ----------------------------------------------------------------------------------- backward

// l (r x c) holds cos(x_i, t_j); with logits scale * l, overwrite it with G~ and return
// sum(G~ * logits) (double). `diag`: the block is on the diagonal.
template <typename T>
double block_grad(T* l, int64_t r, int64_t c, T scale, const T* mr, const T* lzr, const T* mc, const T* lzc,
                  bool diag, T* work) {
  T* a = work;
  T* b = work + c;
  double total = 0.0;
  for (int64_t i = 0; i < r; ++i) {
    T* row = l + i * c;
    const T m = mr[i], lz = lzr[i];
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const T v = row[j] * scale;
      row[j] = v;
      a[j] = (v - m) - lz;
      b[j] = (v - mc[j]) - lzc[j];
    }
    exp_inplace(a, c);
    exp_inplace(b, c);
    if (diag) {  // G~_ii = (P_r - 1) + (P_c - 1): no rounding of P_r + P_c ~ 2
      a[i] -= T(1);
      b[i] -= T(1);
    }
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < c; ++j) {
      const T g = a[j] + b[j];
      sum += static_cast<double>(g) * static_cast<double>(row[j]);
      row[j] = g;
    }
    total += sum;
  }
  return total;
}

// out <- the gradient of raw through x_hat = raw / max(|raw|, eps) (xn, rows x dim contiguous),
// given dL/dx_hat = factor * u (u, contiguous, is overwritten): g - x_hat (x_hat . g), divided by
// |raw|, where |raw| >= eps; g / eps elsewhere (F.normalize's clamp has no gradient there).
template <typename T>
void finish(Tensor out, Tensor u, const Tensor& xn, const Tensor& norm, const Tensor& den, T factor) {
  const int64_t rows = u.size(0), dim = u.size(1);
  T* g = u.data_ptr<T>();
  const T* xv = xn.data_ptr<T>();
  const T* nv = norm.data_ptr<T>();
  const T* dv = den.data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    T* gi = g + i * dim;
    const T* xi = xv + i * dim;
    T w = 0;
#pragma omp simd reduction(+ : w)
    for (int64_t j = 0; j < dim; ++j) {
      gi[j] *= factor;
      w += xi[j] * gi[j];
    }
    if (!(nv[i] >= static_cast<T>(kNormEps))) w = 0;
    const T dn = dv[i];
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) gi[j] = (gi[j] - xi[j] * w) / dn;
  }
  if (out.data_ptr() != u.data_ptr()) out.copy_(u);  // into the gradient's dtype
}

// One sweep, row block by row block. Worker w (of W) owns the column blocks j = w, w + W, ...: it
// recomputes G~_ij for them, adds G~_ij @ t_hat_j to its own partial u (summed over the workers in
// order afterwards -> dx_i) and G~_ij^T @ x_hat_i to v_j, which only it writes (-> dt_j at the end).
// Every sum runs in an order fixed by the block grid, not by thread timing: deterministic. One
// synchronization per row block; three N x N x D products in all.
std::vector<Tensor> backward(const Tensor& x, const Tensor& t, const Tensor& nx, const Tensor& nt,
                             const Tensor& m_r, const Tensor& lz_r, const Tensor& m_c, const Tensor& lz_c, double s,
                             double coef, int64_t tile) {
  const auto acc = acc_type(x, t);
  const int64_t n = x.size(0), dim = x.size(1);
  const auto opt = x.options().dtype(acc);
  Tensor den_x = nx.clamp_min(kNormEps), den_t = nt.clamp_min(kNormEps);
  Blocks B{n, tile};
  const int64_t nb = B.count(), bt = std::min(tile, n);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nb);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dt = at::empty(t.sizes(), t.options());
  // v = G~^T @ x_hat accumulates over all row blocks: dt itself when t is in acc.
  Tensor v = t.scalar_type() == acc ? dt.zero_() : at::zeros(t.sizes(), opt);
  std::vector<double> dsum(workers, 0.0);
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_backward", [&] {
    struct Scratch {
      Tensor lbuf, ubuf, xbuf, tbuf;
      std::vector<scalar_t> work;
    };
    std::vector<Scratch> scr;
    for (int64_t w = 0; w < workers; ++w) {
      scr.push_back(Scratch{scratch(bt * bt, opt), scratch(bt * dim, opt).view({bt, dim}),
                            scratch(bt * dim, opt).view({bt, dim}), scratch(bt * dim, opt).view({bt, dim}),
                            std::vector<scalar_t>(2 * bt)});
    }
    const scalar_t sc_s = static_cast<scalar_t>(s), factor = static_cast<scalar_t>(coef * s);
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t a = B.begin(bi), e = B.end(bi);
      at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
        at::NoGradGuard no_grad;  // grad mode is thread-local: the pool threads start with it on
        for (int64_t w = w0; w < w1; ++w) {
          Scratch& sc = scr[w];
          Tensor xn = normalized(sc.xbuf, x, den_x, a, e);
          Tensor u = sc.ubuf.narrow(0, 0, e - a).zero_();
          for (int64_t bj = w; bj < nb; bj += workers) {
            const int64_t c = B.begin(bj), d = B.end(bj);
            Tensor tn = normalized(sc.tbuf, t, den_t, c, d);
            Tensor l = sc.lbuf.narrow(0, 0, (e - a) * (d - c)).view({e - a, d - c});
            at::mm_out(l, xn, tn.t());
            dsum[w] += block_grad<scalar_t>(l.data_ptr<scalar_t>(), e - a, d - c, sc_s, m_r.data_ptr<scalar_t>() + a,
                                            lz_r.data_ptr<scalar_t>() + a, m_c.data_ptr<scalar_t>() + c,
                                            lz_c.data_ptr<scalar_t>() + c, bi == bj, sc.work.data());
            u.addmm_(l, tn);
            v.slice(0, c, d).addmm_(l.t(), xn);
          }
        }
      });
      Tensor u = scr[0].ubuf.narrow(0, 0, e - a);
      for (int64_t w = 1; w < workers; ++w) u.add_(scr[w].ubuf.narrow(0, 0, e - a));
      finish<scalar_t>(dx.slice(0, a, e), u, scr[0].xbuf.narrow(0, 0, e - a), nx.slice(0, a, e),
                       den_x.slice(0, a, e), factor);
    }
    for_each_block(
        nb, [&] { return scratch(bt * dim, opt).view({bt, dim}); },
        [&](int64_t bj, Tensor& tbuf) {
          const int64_t c = B.begin(bj), d = B.end(bj);
          Tensor vb = v.slice(0, c, d);
          finish<scalar_t>(dt.slice(0, c, d), vb, normalized(tbuf, t, den_t, c, d), nt.slice(0, c, d),
                           den_t.slice(0, c, d), factor);
        });
  });
  double total = 0.0;
  for (double p : dsum) total += p;
  Tensor dscale = at::scalar_tensor(coef * total / s, opt);
  return {dx, dt, dscale};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "tiled symmetric InfoNCE forward: (loss, nx, nt, m_r, lz_r, m_c, lz_c)");
  m.def("backward", &backward, "tiled symmetric InfoNCE backward: (dx, dt, dscale)");
}
