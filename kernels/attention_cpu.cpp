// GAPE attention forward for the CPU: one fused pass, FlashAttention-style.
//
// For each (batch, query head, block of query rows) the key axis is walked in
// blocks: S = Q K^T by BLAS, then per row the GAPE bias
// -lambda_i (1 - pi_j) phi(delta_ij) is added in registers (phi read from a
// reversed table, so a row's phi values are contiguous in j), the causal and
// boolean masks applied, and an online softmax updates the running max, sum
// and output O += P V (BLAS). The bias never exists in memory, which is what
// the pure-PyTorch tiles pay for (a tile written, then read back by the
// softmax or by SDPA). Built at first use by gape/kernels/attention_cpu.py;
// the math is ../shared/GAPE.md and the oracle gape.reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

// The Fortran BLAS that libtorch_cpu exports (MKL on x86 wheels).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

using at::vec::Vectorized;

// Column-major: C[m x n] = alpha op(A) op(B) + beta C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp_u20 is PyTorch's own fast float exp (used by its CPU flash attention);
// float64 keeps the 1-ulp exp.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

struct Strides {
  int64_t b, h, l;  // the last dim is contiguous
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
void forward_impl(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& lam_t,
                  const at::Tensor& keep_t, const at::Tensor& phi_t, const c10::optional<at::Tensor>& mask_t,
                  at::Tensor& out_t, double scale_d, bool causal, int64_t QB, int64_t KB) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t B = query.size(0), Hq = query.size(1), Lq = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), Lk = key.size(2), Dv = value.size(3);
  const int64_t rep = Hq / Hkv, nqb = (Lq + QB - 1) / QB;
  const Strides sq = strides_of(query), sk = strides_of(key), sv = strides_of(value), so = strides_of(out_t);
  const T* q = query.data_ptr<T>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const T* lam = lam_t.data_ptr<T>();    // [B, Hq, Lq] contiguous
  const T* keep = keep_t.data_ptr<T>();  // 1 - pi, [B, Hkv, Lk] contiguous
  const T* phi_rev = phi_t.data_ptr<T>();  // phi(delta(i, j)) = phi_rev[Lq - 1 - i + j]
  T* out = out_t.data_ptr<T>();
  const bool* mask = nullptr;
  int64_t mb = 0, mh = 0, mq = 0, mk = 0;  // mask expanded to [B, Hq, Lq, Lk]: broadcast dims have stride 0
  if (mask_t.has_value()) {
    mask = mask_t->data_ptr<bool>();
    mb = mask_t->stride(0), mh = mask_t->stride(1), mq = mask_t->stride(2), mk = mask_t->stride(3);
  }
  const T scale = static_cast<T>(scale_d);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s_buf(QB * KB), o_buf(QB * Dv), m_buf(QB), l_buf(QB);
    T* S = s_buf.data();
    T* O = o_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      // Causal blocks differ in cost; alternating first/last blocks gives every
      // thread's contiguous range of items a similar amount of work.
      const int64_t t = item % nqb, bh = item / nqb, h = bh % Hq, b = bh / Hq, hk = h / rep;
      const int64_t qb = (t % 2 == 0) ? t / 2 : nqb - 1 - t / 2;
      const int64_t i0 = qb * QB, rows = std::min(QB, Lq - i0);
      const T* qp = q + b * sq.b + h * sq.h + i0 * sq.l;
      const T* kp = k + b * sk.b + hk * sk.h;
      const T* vp = v + b * sv.b + hk * sv.h;
      const T* lp = lam + (b * Hq + h) * Lq + i0;
      const T* keepp = keep + (b * Hkv + hk) * Lk;
      // Bottom-right alignment: row i sits at position i + Lk - Lq and, causal, sees keys j <= that.
      const int64_t kend = causal ? std::min(Lk, i0 + rows + Lk - Lq) : Lk;
      std::fill(O, O + rows * Dv, T(0));
      std::fill(m_buf.begin(), m_buf.begin() + rows, neg_inf);
      std::fill(l_buf.begin(), l_buf.begin() + rows, T(0));
      for (int64_t j0 = 0; j0 < kend; j0 += KB) {
        const int64_t n = std::min(KB, kend - j0);
        // S[rows x n] (row-major, ld KB) = Q K^T, i.e. column-major S^T = K Q^T
        gemm('T', 'N', n, rows, D, T(1), kp + j0 * sk.l, sk.l, qp, sq.l, T(0), S, KB);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          T* s = S + r * KB;
          const int64_t ncols = causal ? std::clamp<int64_t>(i + Lk - Lq - j0 + 1, 0, n) : n;
          if (ncols == 0) {
            std::fill(s, s + n, T(0));
            continue;
          }
          const T* ph = phi_rev + (Lq - 1 - i + j0);
          const T* kk = keepp + j0;
          const T li = lp[r];
          const V vneg_l(-li), vscale(scale);
          int64_t c = 0;
          for (; c + W <= ncols; c += W) {
            V x = at::vec::fmadd(vneg_l, V::loadu(kk + c) * V::loadu(ph + c), V::loadu(s + c) * vscale);
            x.store(s + c);
          }
          for (; c < ncols; ++c) s[c] = s[c] * scale - li * (kk[c] * ph[c]);
          if (mask != nullptr) {
            const bool* mr = mask + b * mb + h * mh + i * mq + j0 * mk;
            for (int64_t x = 0; x < ncols; ++x)
              if (!mr[x * mk]) s[x] = neg_inf;
          }
          V vmax(neg_inf);
          c = 0;
          for (; c + W <= ncols; c += W) vmax = at::vec::maximum(vmax, V::loadu(s + c));
          T rmax = at::vec::vec_reduce_all<T>([](V& a, V& bb) { return at::vec::maximum(a, bb); }, vmax);
          for (; c < ncols; ++c) rmax = std::max(rmax, s[c]);
          if (rmax == neg_inf) {  // every key of this block is masked for this row
            std::fill(s, s + n, T(0));
            continue;
          }
          const T m_old = m_buf[r];
          const T m_new = std::max(m_old, rmax);
          const T alpha = m_old == neg_inf ? T(0) : std::exp(m_old - m_new);
          const V vm(m_new);
          V vsum(T(0));
          c = 0;
          for (; c + W <= ncols; c += W) {
            V p = vexp(V::loadu(s + c) - vm);
            p.store(s + c);
            vsum = vsum + p;
          }
          T sum = at::vec::vec_reduce_all<T>([](V& a, V& bb) { return a + bb; }, vsum);
          for (; c < ncols; ++c) {
            s[c] = std::exp(s[c] - m_new);
            sum += s[c];
          }
          std::fill(s + ncols, s + n, T(0));
          l_buf[r] = l_buf[r] * alpha + sum;
          m_buf[r] = m_new;
          if (alpha != T(1)) {
            T* o = O + r * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
          }
        }
        // O[rows x Dv] += P[rows x n] V[n x Dv], i.e. column-major O^T += V^T P^T
        gemm('N', 'N', Dv, rows, n, T(1), vp + j0 * sv.l, sv.l, S, KB, T(1), O, Dv);
      }
      // A row that saw no key (all masked, or before the cache) is zeros, as GAPE defines it.
      T* op = out + b * so.b + h * so.h + i0 * so.l;
      for (int64_t r = 0; r < rows; ++r) {
        const T inv = l_buf[r] > T(0) ? T(1) / l_buf[r] : T(0);
        for (int64_t d = 0; d < Dv; ++d) op[r * so.l + d] = O[r * Dv + d] * inv;
      }
    }
  });
}

void attention_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& query_gate, const at::Tensor& keep, const at::Tensor& phi_rev,
                       const c10::optional<at::Tensor>& mask, at::Tensor& out, double scale, bool causal,
                       int64_t q_block, int64_t k_block) {
  // Shapes, dtypes and strides are checked in gape/kernels/attention_cpu.py; these guard the pointer math.
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4 && out.dim() == 4, "gape: 4-d q/k/v/out expected");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1 && out.stride(3) == 1,
              "gape: q/k/v/out need a contiguous last dim");
  TORCH_CHECK(query_gate.is_contiguous() && keep.is_contiguous() && phi_rev.is_contiguous(),
              "gape: gates and phi table must be contiguous");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->dim() == 4), "gape: bool 4-d mask expected");
  TORCH_CHECK(q_block > 0 && k_block > 0, "gape: block sizes must be positive");
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "gape_cpu_attention_fwd", [&] {
    forward_impl<scalar_t>(query, key, value, query_gate, keep, phi_rev, mask, out, scale, causal, q_block, k_block);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gape, m) {
  m.def(
      "cpu_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor query_gate, Tensor keep, Tensor phi_rev, "
      "Tensor? mask, Tensor(a!) out, float scale, bool is_causal, int q_block, int k_block) -> ()");
}

TORCH_LIBRARY_IMPL(gape, CPU, m) { m.impl("cpu_attention_fwd", &attention_forward); }
