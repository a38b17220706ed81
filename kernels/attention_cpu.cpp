// GAPE attention for the CPU, forward and backward, FlashAttention-style.
//
// For each (batch, query head, block of query rows) the key axis is walked in
// blocks: S = Q K^T by BLAS, then per row the GAPE bias
// -lambda_i (1 - pi_j) phi(delta_ij) is added in registers (phi read from a
// reversed table, so a row's phi values are contiguous in j), the causal and
// boolean masks applied, and an online softmax updates the running max, sum
// and output O += P V (BLAS). The bias never exists in memory, which is what
// the pure-PyTorch tiles pay for (a tile written, then read back by the
// softmax or by SDPA). The backward recomputes the same logits from the
// forward's row log-sum-exp (see backward_impl). Positions are an input: each
// segment (a batch element, or one packed sequence) has its own query offset, and a
// call allows the signed distances [dlo, dhi] (causal rule, local window), so key
// blocks outside a block's window are never visited. Built at first use by
// gape/kernels/attention_cpu.py;
// the math is docs/maths.md and the oracle gape.core.reference.
//
// Optional logit terms (docs/kernels.md, "Learned sinks and the soft-cap in the CPU kernel"):
// a soft-cap (the content logit becomes softcap tanh(scale <q, k> / softcap), the bias added
// after it; a template flag, so the plain logit loop is unchanged) and learned sinks (one logit
// per query head in each row's denominator, folded in when a row is finished, and into its lse,
// so the backward needs no change for them).
//
// Storage and compute types: float and double inputs are computed in their own type.
// bfloat16 and float16 inputs are read in place and computed in float (softmax, bias,
// gate reductions, accumulators); their two products per block take one of two forms,
// chosen per call (the `dot` argument, see gape/kernels/attention_cpu.py):
//  - dot = 1: the products run on the half-precision operands with float accumulation
//    (MKL's gemm_bf16bf16f32 / gemm_f16f16f32: AVX512-BF16, AVX512-FP16 or AMX where
//    the CPU has them); the probabilities P and dS are rounded to the input type first,
//    as every flash attention does.
//  - dot = 0: the operand blocks are widened to float and the products are SGEMMs, for
//    CPUs without half-precision arithmetic (there MKL would widen them anyway, slower).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// The Fortran BLAS that libtorch_cpu exports (MKL on x86 wheels).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
// MKL's mixed-precision GEMMs (half-precision operands, float C); weak, so a BLAS
// without them (an OpenBLAS build of torch) still loads the kernel: dot = 1 is then refused.
void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*, const uint16_t*,
                       const int*, const uint16_t*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void gemm_f16f16f32_(const char*, const char*, const int*, const int*, const int*, const float*, const uint16_t*,
                     const int*, const uint16_t*, const int*, const float*, float*, const int*) __attribute__((weak));
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
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const c10::BFloat16* a, int lda,
                 const c10::BFloat16* b, int ldb, float beta, float* c, int ldc) {
  gemm_bf16bf16f32_(&ta, &tb, &m, &n, &k, &alpha, reinterpret_cast<const uint16_t*>(a), &lda,
                    reinterpret_cast<const uint16_t*>(b), &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const c10::Half* a, int lda, const c10::Half* b,
                 int ldb, float beta, float* c, int ldc) {
  gemm_f16f16f32_(&ta, &tb, &m, &n, &k, &alpha, reinterpret_cast<const uint16_t*>(a), &lda,
                  reinterpret_cast<const uint16_t*>(b), &ldb, &beta, c, &ldc);
}

// dst[0, n) = src[0, n) in another floating type.
template <typename S, typename G>
inline void convert_row(const S* src, G* dst, int64_t n) {
  if constexpr (std::is_same_v<G, float> && (std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>)) {
    using VS = Vectorized<S>;
    constexpr int64_t W = VS::size();
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      auto [lo, hi] = at::vec::convert_to_float<S>(VS::loadu(src + c));
      lo.store(dst + c);
      hi.store(dst + c + W / 2);
    }
    for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// A GEMM operand of type G: `rows` rows of `cols` entries at `src` (row stride ld) are used in
// place when already of type G, else converted into `buf` (packed, row stride cols).
template <typename G>
struct Operand {
  const G* p;
  int64_t ld;
};
template <typename G, typename S>
inline Operand<G> operand(const S* src, int64_t rows, int64_t cols, int64_t ld, std::vector<G>& buf) {
  if constexpr (std::is_same_v<G, S>) {
    return {src, ld};
  } else {
    if (static_cast<int64_t>(buf.size()) < rows * cols) buf.resize(rows * cols);
    for (int64_t r = 0; r < rows; ++r) convert_row(src + r * ld, buf.data() + r * cols, cols);
    return {buf.data(), cols};
  }
}

// exp_u20 is PyTorch's own fast float exp (used by its CPU flash attention);
// float64 keeps the 1-ulp exp.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// tanh for the soft-cap. float64 keeps Sleef's 1-ulp tanh; for float that one (double-float
// arithmetic inside) cost as much as the rest of the forward, so: an odd Taylor polynomial to
// x^13 for |x| < 0.3 (truncation below 1e-8 relative), else (1 - e) / (1 + e), e = exp(-2|x|),
// which has no cancellation there (e <= 0.55); the sign of x restored. Both are a few ulp.
inline Vectorized<double> vtanh(const Vectorized<double>& x) { return x.tanh(); }
inline Vectorized<float> vtanh(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V ax = x.abs(), one(1.f);
  const V e = (ax * V(-2.f)).exp();
  const V big = (one - e) / (one + e);
  const V x2 = x * x;
  // tanh x = x (1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925 + 21844x^12/6081075)
  V p(21844.f / 6081075.f);
  p = at::vec::fmadd(p, x2, V(-1382.f / 155925.f));
  p = at::vec::fmadd(p, x2, V(62.f / 2835.f));
  p = at::vec::fmadd(p, x2, V(-17.f / 315.f));
  p = at::vec::fmadd(p, x2, V(2.f / 15.f));
  p = at::vec::fmadd(p, x2, V(-1.f / 3.f));
  const V small = at::vec::fmadd(p * x2, x, x);
  const V signed_big = V::blendv(big, V(0.f) - big, x < V(0.f));
  return V::blendv(signed_big, small, ax < V(0.3f));
}

// max that keeps a NaN from either side: a NaN score makes the row's maximum NaN, so the whole
// row comes out NaN as in the reference (std::max(m, NaN) would return m and hide it).
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || std::isnan(b)) ? b : a;
}

template <typename T>
T row_max(const T* s, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V vmax(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + W <= n; c += W) vmax = at::vec::maximum(vmax, V::loadu(s + c));
  T m = at::vec::vec_reduce_all<T>([](V& a, V& bb) { return at::vec::maximum(a, bb); }, vmax);
  for (; c < n; ++c) m = nan_max(m, s[c]);
  return m;
}

struct Strides {
  int64_t b, h, l;  // the last dim is contiguous
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// One attention problem of the call: batch element b, query rows [q0, q0 + nq) and keys
// [k0, k0 + nk) of that element, query row i (local) at position i + off, key j at j.
// A dense batch has one segment per element (q0 = k0 = 0); packed sequences (varlen) are
// segments of one element.
struct Segment {
  int64_t b, q0, nq, k0, nk, off;
};

// Everything about one call that the forward and the backward share. In: the storage type
// of query/key/value (and grad_out); T: the compute type of everything else.
template <typename In, typename T>
struct Problem {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, rep;  // Lq, Lk: rows of the whole tensors
  Strides sq, sk, sv;
  const In* q;
  const In* k;
  const In* v;
  const T* lam;      // [B, Hq, Lq] contiguous
  const T* keep;     // 1 - pi, [B, Hkv, Lk] contiguous
  const T* phi_rev;  // phi(delta) = phi_rev[phi_zero - delta] for every delta the call reads
  int64_t phi_zero;
  const bool* mask = nullptr;
  int64_t mb = 0, mh = 0, mq = 0, mk = 0;  // mask expanded to [B, Hq, Lq, Lk]: broadcast dims have stride 0
  std::vector<Segment> segs;
  int64_t dlo, dhi;  // allowed signed distances pos_q - pos_k: [dlo, dhi] (causal, window)
  T scale;
  const T* sinks = nullptr;  // [Hq] learned sink logits (one more term in each row's denominator), or none
  T softcap = T(0);          // > 0: the content logit is softcap tanh(scale <q, k> / softcap)

  Problem(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& lam_t,
          const at::Tensor& keep_t, const at::Tensor& phi_t, int64_t phi_zero_, const c10::optional<at::Tensor>& mask_t,
          const at::Tensor& seg_t, int64_t dlo_, int64_t dhi_, double scale_d,
          const c10::optional<at::Tensor>& sinks_t = c10::nullopt, double softcap_d = 0.0)
      : B(query.size(0)), Hq(query.size(1)), Hkv(key.size(1)), Lq(query.size(2)), Lk(key.size(2)),
        D(query.size(3)), Dv(value.size(3)), rep(query.size(1) / key.size(1)), sq(strides_of(query)),
        sk(strides_of(key)), sv(strides_of(value)), q(query.data_ptr<In>()), k(key.data_ptr<In>()),
        v(value.data_ptr<In>()), lam(lam_t.data_ptr<T>()), keep(keep_t.data_ptr<T>()), phi_rev(phi_t.data_ptr<T>()),
        phi_zero(phi_zero_), dlo(dlo_), dhi(dhi_), scale(static_cast<T>(scale_d)),
        softcap(static_cast<T>(softcap_d)) {
    if (sinks_t.has_value()) sinks = sinks_t->data_ptr<T>();
    if (mask_t.has_value()) {
      mask = mask_t->data_ptr<bool>();
      mb = mask_t->stride(0), mh = mask_t->stride(1), mq = mask_t->stride(2), mk = mask_t->stride(3);
    }
    const int64_t* sp = seg_t.data_ptr<int64_t>();
    for (int64_t x = 0; x < seg_t.size(0); ++x, sp += 6) segs.push_back({sp[0], sp[1], sp[2], sp[3], sp[4], sp[5]});
  }

  // Keys [key_begin(i), key_end(i)) of segment S that local row i may see (non-decreasing in i).
  int64_t key_begin(const Segment& S, int64_t i) const { return std::clamp<int64_t>(i + S.off - dhi, 0, S.nk); }
  int64_t key_end(const Segment& S, int64_t i) const { return std::clamp<int64_t>(i + S.off - dlo + 1, 0, S.nk); }

  // Row i (local) of a score block over the segment's keys [j0, j0 + n): s holds <q_i, k_j> on entry
  // (FWD: scale <q_i, k_j>, the scale taken by the GEMM's alpha) and
  // scale <q_i, k_j> - lambda_i (1 - pi_j) phi(delta_ij), or -inf where masked, on exit, for the columns
  // [c0, c1) the row may see; columns before c0 are -inf, those from c1 on are untouched. Returns c1.
  // FWD also returns the row's maximum over [c0, c1) in rmax (-inf when none), taken in the same
  // pass, so the forward reads its score row twice (here, then exp) instead of three times.
  // CAP (softcap > 0; a template flag so the plain path keeps its loop): the content term is
  // softcap tanh(scale <q_i, k_j> / softcap) and the bias is added after the cap (docs/maths.md);
  // with dcap, dcap[c] = 1 - tanh^2 there, the cap's derivative that the backward applies to dS
  // before it reaches q and k.
  template <bool CAP, bool FWD = false>
  int64_t logits(T* s, const Segment& S, int64_t h, int64_t i, int64_t j0, int64_t n, int64_t& c0,
                 T* dcap = nullptr, T* rmax = nullptr) const {
    using V = Vectorized<T>;
    constexpr int64_t W = V::size();
    const T neg_inf = -std::numeric_limits<T>::infinity();
    c0 = std::clamp<int64_t>(key_begin(S, i) - j0, 0, n);
    const int64_t c1 = std::max(c0, std::clamp<int64_t>(key_end(S, i) - j0, 0, n));
    std::fill(s, s + c0, neg_inf);
    const T* ph = phi_rev + (phi_zero - (i + S.off) + j0);
    const T* kk = keep + (S.b * Hkv + h / rep) * Lk + S.k0 + j0;
    const T li = lam[(S.b * Hq + h) * Lq + S.q0 + i];
    const V vneg_l(-li), vscale(scale);
    V vmax(neg_inf);
    T m = neg_inf;
    int64_t c = c0;
    if constexpr (CAP) {
      const T inner = FWD ? T(1) / softcap : scale / softcap;
      const V vinner(inner), vcap(softcap), vone(T(1));
      for (; c + W <= c1; c += W) {
        const V t = vtanh(V::loadu(s + c) * vinner);
        if (dcap != nullptr) (vone - t * t).store(dcap + c);
        const V x = at::vec::fmadd(vneg_l, V::loadu(kk + c) * V::loadu(ph + c), t * vcap);
        x.store(s + c);
        if constexpr (FWD) vmax = at::vec::maximum(vmax, x);
      }
      for (; c < c1; ++c) {
        const T t = std::tanh(s[c] * inner);
        if (dcap != nullptr) dcap[c] = T(1) - t * t;
        s[c] = softcap * t - li * (kk[c] * ph[c]);
        if constexpr (FWD) m = nan_max(m, s[c]);
      }
    } else {
      for (; c + W <= c1; c += W) {
        const V sc = FWD ? V::loadu(s + c) : V::loadu(s + c) * vscale;
        const V x = at::vec::fmadd(vneg_l, V::loadu(kk + c) * V::loadu(ph + c), sc);
        x.store(s + c);
        if constexpr (FWD) vmax = at::vec::maximum(vmax, x);
      }
      for (; c < c1; ++c) {
        s[c] = (FWD ? s[c] : s[c] * scale) - li * (kk[c] * ph[c]);
        if constexpr (FWD) m = nan_max(m, s[c]);
      }
    }
    if (mask != nullptr) {
      const bool* mr = mask + S.b * mb + h * mh + (S.q0 + i) * mq + (S.k0 + j0) * mk;
      for (int64_t x = c0; x < c1; ++x)
        if (!mr[x * mk]) s[x] = neg_inf;
    }
    if constexpr (FWD) {
      if (mask != nullptr) {
        m = c1 > c0 ? row_max(s + c0, c1 - c0) : neg_inf;
      } else {
        m = nan_max(m, at::vec::vec_reduce_all<T>([](V& a, V& bb) { return at::vec::maximum(a, bb); }, vmax));
      }
      *rmax = m;
    }
    return c1;
  }
};

// s[c] = exp(s[c] - shift) for c < n; returns the sum.
template <typename T>
T exp_shifted(T* s, int64_t n, T shift) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vm(shift);
  V vsum(T(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    V p = vexp(V::loadu(s + c) - vm);
    p.store(s + c);
    vsum = vsum + p;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& bb) { return a + bb; }, vsum);
  for (; c < n; ++c) {
    s[c] = std::exp(s[c] - shift);
    sum += s[c];
  }
  return sum;
}

// Work units are (segment, query block); causal blocks differ in cost, so within a
// segment the first and last blocks alternate and every thread's contiguous range of
// units gets a similar amount of work.
inline std::vector<std::pair<int64_t, int64_t>> query_blocks(const std::vector<Segment>& segs, int64_t QB) {
  std::vector<std::pair<int64_t, int64_t>> units;
  for (int64_t x = 0; x < static_cast<int64_t>(segs.size()); ++x) {
    const int64_t nqb = (segs[x].nq + QB - 1) / QB;
    for (int64_t t = 0; t < nqb; ++t) units.push_back({x, (t % 2 == 0) ? t / 2 : nqb - 1 - t / 2});
  }
  return units;
}

// G: the type of the GEMM operands (In for dot = 1, else T: blocks of In are widened).
// CAP: P.softcap > 0 (see Problem::logits).
// Row chunk of the forward's ragged (causal diagonal) blocks.
constexpr int64_t RC = 64;

template <typename In, typename T, typename G, bool CAP>
void forward_impl(const Problem<In, T>& P, at::Tensor& out_t, T* lse, int64_t QB, int64_t KB) {
  const Strides so = strides_of(out_t);
  T* out = out_t.data_ptr<T>();
  const int64_t D = P.D, Dv = P.Dv;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const auto units = query_blocks(P.segs, QB);
  const int64_t n_units = static_cast<int64_t>(units.size());

  at::parallel_for(0, n_units * P.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s_buf(QB * KB), o_buf(QB * Dv), m_buf(QB), l_buf(QB);
    std::vector<G> q_cvt, k_cvt, v_cvt, p_cvt;  // operands converted to G (unused when In == G == T)
    T* S = s_buf.data();
    T* O = o_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      // the query heads of a GQA group run one after the other on the same K/V blocks
      const int64_t h = item % P.Hq;
      const Segment& G_ = P.segs[units[item / P.Hq].first];
      const int64_t b = G_.b, hk = h / P.rep, i0 = units[item / P.Hq].second * QB, rows = std::min(QB, G_.nq - i0);
      const In* qp = P.q + b * P.sq.b + h * P.sq.h + (G_.q0 + i0) * P.sq.l;
      const In* kp = P.k + b * P.sk.b + hk * P.sk.h + G_.k0 * P.sk.l;
      const In* vp = P.v + b * P.sv.b + hk * P.sv.h + G_.k0 * P.sv.l;
      const Operand<G> Q = operand<G>(qp, rows, D, P.sq.l, q_cvt);
      // window and causal rule: the block's rows see keys [kbeg, kend) at most
      const int64_t kbeg = P.key_begin(G_, i0), kend = P.key_end(G_, i0 + rows - 1);
      std::fill(O, O + rows * Dv, T(0));
      std::fill(m_buf.begin(), m_buf.begin() + rows, neg_inf);
      std::fill(l_buf.begin(), l_buf.begin() + rows, T(0));
      for (int64_t j0 = kbeg; j0 < kend; j0 += KB) {
        const int64_t n = std::min(KB, kend - j0);
        const Operand<G> K = operand<G>(kp + j0 * P.sk.l, n, D, P.sk.l, k_cvt);
        const Operand<G> V = operand<G>(vp + j0 * P.sv.l, n, Dv, P.sv.l, v_cvt);
        // A block whose first row sees fewer keys than its last (the causal diagonal) runs its
        // products in chunks of RC rows, each over the keys its own last row sees, so the GEMMs
        // skip most of the masked triangle (QB = 256: ~6% of all products at L = 4096).
        const bool ragged = P.key_end(G_, i0) < j0 + n;
        const int64_t rc = ragged ? std::min<int64_t>(RC, rows) : rows;
        for (int64_t r0 = 0; r0 < rows; r0 += rc) {
          const int64_t nr = std::min(rc, rows - r0);
          const int64_t nn = std::clamp<int64_t>(P.key_end(G_, i0 + r0 + nr - 1) - j0, 0, n);
          if (nn == 0) {  // no row of the chunk sees a key here
            continue;
          }
          T* Sr = S + r0 * KB;
          // S[nr x nn] (row-major, ld KB) = scale Q K^T, i.e. column-major S^T = scale K Q^T
          gemm('T', 'N', nn, nr, D, P.scale, K.p, K.ld, Q.p + r0 * Q.ld, Q.ld, T(0), Sr, KB);
          for (int64_t r = r0; r < r0 + nr; ++r) {
            T* s = S + r * KB;
            int64_t c0;
            T rmax;
            const int64_t ncols = P.template logits<CAP, true>(s, G_, h, i0 + r, j0, nn, c0, nullptr, &rmax);
            if (rmax == neg_inf) {  // no allowed key for this row in this block
              std::fill(s, s + nn, T(0));
              continue;
            }
            const T m_old = m_buf[r], m_new = nan_max(m_old, rmax);
            const T alpha = m_old == neg_inf ? T(0) : std::exp(m_old - m_new);
            std::fill(s, s + c0, T(0));
            const T sum = exp_shifted(s + c0, ncols - c0, m_new);
            std::fill(s + ncols, s + nn, T(0));
            l_buf[r] = l_buf[r] * alpha + sum;
            m_buf[r] = m_new;
            if (alpha != T(1)) {
              T* o = O + r * Dv;
              for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
            }
          }
          // O[nr x Dv] += P[nr x nn] V[nn x Dv], i.e. column-major O^T += V^T P^T
          const Operand<G> Pm = operand<G>(static_cast<const T*>(Sr), nr, nn, KB, p_cvt);
          gemm('N', 'N', Dv, nr, nn, T(1), V.p, V.ld, Pm.p, Pm.ld, T(1), O + r0 * Dv, Dv);
        }
      }
      // A row that saw no key (all masked, outside the window or before the cache) is zeros, as
      // GAPE defines it; its log-sum-exp is +inf so that the backward's exp(s - lse) is 0 there.
      // A sink adds exp(sink_h) to the denominator of the other rows (no value: O is only rescaled),
      // and to their lse, so the backward's exp(s - lse) is the probability with the sink and the
      // sink's own share is exp(sink_h - lse). Both are formed at M = max(m, sink_h), finite, so a
      // sink far above the row's logits neither overflows nor loses the keys' share.
      T* op = out + b * so.b + h * so.h + (G_.q0 + i0) * so.l;
      const T* sink = P.sinks != nullptr ? P.sinks + h : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        const T l = l_buf[r], m = m_buf[r];
        T inv = T(0), row_lse = std::numeric_limits<T>::infinity();
        if (l > T(0)) {
          if (sink != nullptr) {
            const T M = std::max(m, *sink), a = std::exp(m - M), den = l * a + std::exp(*sink - M);
            inv = a / den;
            row_lse = M + std::log(den);
          } else {
            inv = T(1) / l;
            row_lse = m + std::log(l);
          }
        }
        for (int64_t d = 0; d < Dv; ++d) op[r * so.l + d] = O[r * Dv + d] * inv;
        if (lse != nullptr) lse[(b * P.Hq + h) * P.Lq + G_.q0 + i0 + r] = row_lse;
      }
    }
  });
}

// FlashAttention-2 backward with the GAPE bias, one pass per (batch, query head):
// for each query block and key block, P = exp(s - lse) is recomputed, then
// dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ += scale dS K,
// dK += scale dS^T Q, d lambda_i = -sum_j dS_ij (1 - pi_j) phi_ij (rows) and
// d pi_j = sum_i dS_ij lambda_i phi_ij (columns). dK, dV and d pi are written per
// query head (no two threads share a row) and summed over each GQA group by the caller.
// A sink needs nothing here: the forward's lse includes it, so P is the probability with the sink,
// and rowsum(dO O) = sum_j P_ij dP_ij still holds (the sink has no value); d sink = -sum_i
// exp(sink - lse_i) rowsum(dO O)_i is a row reduction the caller forms from lse and delta.
// CAP: the gates read dS (their bias is outside the cap); q and k read dS (1 - tanh^2).
template <typename In, typename T, typename G, bool CAP>
void backward_impl(const Problem<In, T>& P, const In* dout, Strides sdo, const T* lse, const T* delta, T* dq, T* dk_h,
                   T* dv_h, T* dlam, T* dpi_h, int64_t QB, int64_t KB) {
  const int64_t D = P.D, Dv = P.Dv, n_segs = static_cast<int64_t>(P.segs.size());
  // Items are (segment, query head). Segments of one batch element hold disjoint keys, so no
  // two threads write the same row of the per-head dK, dV and d pi.
  at::parallel_for(0, n_segs * P.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p_buf(QB * KB), ds_buf(QB * KB), dq_buf(QB * D), dcap_buf(CAP ? KB : 0);
    std::vector<G> q_cvt, do_cvt, k_cvt, v_cvt, p_cvt, ds_cvt;  // operands converted to G
    T* Pm = p_buf.data();
    T* dS = ds_buf.data();
    T* dQ = dq_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      const Segment& G_ = P.segs[item / P.Hq];
      const int64_t h = item % P.Hq, b = G_.b, hk = h / P.rep, bh = b * P.Hq + h;
      const In* kp = P.k + b * P.sk.b + hk * P.sk.h + G_.k0 * P.sk.l;
      const In* vp = P.v + b * P.sv.b + hk * P.sv.h + G_.k0 * P.sv.l;
      const T* keepp = P.keep + (b * P.Hkv + hk) * P.Lk + G_.k0;
      T* dkp = dk_h + (bh * P.Lk + G_.k0) * D;
      T* dvp = dv_h + (bh * P.Lk + G_.k0) * Dv;
      T* dpip = dpi_h + bh * P.Lk + G_.k0;
      const int64_t nqb = (G_.nq + QB - 1) / QB;
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * QB, rows = std::min(QB, G_.nq - i0), row0 = bh * P.Lq + G_.q0 + i0;
        const In* qp = P.q + b * P.sq.b + h * P.sq.h + (G_.q0 + i0) * P.sq.l;
        const In* dop = dout + b * sdo.b + h * sdo.h + (G_.q0 + i0) * sdo.l;
        const Operand<G> Q = operand<G>(qp, rows, D, P.sq.l, q_cvt);
        const Operand<G> dO = operand<G>(dop, rows, Dv, sdo.l, do_cvt);
        const T* lsep = lse + row0;
        const T* dlt = delta + row0;
        const T* lamp = P.lam + row0;
        T* dlamp = dlam + row0;
        std::fill(dQ, dQ + rows * D, T(0));
        const int64_t kbeg = P.key_begin(G_, i0), kend = P.key_end(G_, i0 + rows - 1);
        for (int64_t j0 = kbeg; j0 < kend; j0 += KB) {
          const int64_t n = std::min(KB, kend - j0);
          const Operand<G> K = operand<G>(kp + j0 * P.sk.l, n, D, P.sk.l, k_cvt);
          const Operand<G> V = operand<G>(vp + j0 * P.sv.l, n, Dv, P.sv.l, v_cvt);
          gemm('T', 'N', n, rows, D, T(1), K.p, K.ld, Q.p, Q.ld, T(0), Pm, KB);
          // dP[rows x n] = dO V^T
          gemm('T', 'N', n, rows, Dv, T(1), V.p, V.ld, dO.p, dO.ld, T(0), dS, KB);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            T* p = Pm + r * KB;
            T* ds = dS + r * KB;
            int64_t c0;
            const int64_t ncols = P.template logits<CAP>(p, G_, h, i, j0, n, c0, dcap_buf.data());
            std::fill(p, p + c0, T(0));
            if (ncols > c0) exp_shifted(p + c0, ncols - c0, lsep[r]);
            std::fill(p + ncols, p + n, T(0));
            const T* ph = P.phi_rev + (P.phi_zero - (i + G_.off) + j0);
            const T li = lamp[r];
            T dl = T(0);
            std::fill(ds, ds + c0, T(0));
            for (int64_t c = c0; c < ncols; ++c) {
              const T g = p[c] * (ds[c] - dlt[r]);
              if constexpr (!CAP) ds[c] = g;
              const T gp = g * ph[c];
              dl -= gp * keepp[j0 + c];
              dpip[j0 + c] += gp * li;
              if constexpr (CAP) ds[c] = g * dcap_buf[c];
            }
            std::fill(ds + ncols, ds + n, T(0));
            dlamp[r] += dl;
          }
          const Operand<G> Pg = operand<G>(static_cast<const T*>(Pm), rows, n, KB, p_cvt);
          const Operand<G> dSg = operand<G>(static_cast<const T*>(dS), rows, n, KB, ds_cvt);
          // dV[n x Dv] += P^T dO, i.e. column-major dV^T += dO^T P
          gemm('N', 'T', Dv, n, rows, T(1), dO.p, dO.ld, Pg.p, Pg.ld, T(1), dvp + j0 * Dv, Dv);
          // dK[n x D] += scale dS^T Q
          gemm('N', 'T', D, n, rows, P.scale, Q.p, Q.ld, dSg.p, dSg.ld, T(1), dkp + j0 * D, D);
          // dQ[rows x D] += scale dS K
          gemm('N', 'N', D, rows, n, P.scale, K.p, K.ld, dSg.p, dSg.ld, T(1), dQ, D);
        }
        std::copy(dQ, dQ + rows * D, dq + row0 * D);
      }
    }
  });
}

void check_common(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& query_gate,
                  const at::Tensor& keep, const at::Tensor& phi_rev, const c10::optional<at::Tensor>& mask,
                  const at::Tensor& segments, int64_t q_block, int64_t k_block) {
  // Shapes, dtypes, strides and the phi table's extent are checked in gape/kernels/attention_cpu.py;
  // these guard the pointer math.
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "gape: 4-d query/key/value expected");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "gape: query/key/value need a contiguous last dim");
  TORCH_CHECK(query_gate.is_contiguous() && keep.is_contiguous() && phi_rev.is_contiguous(),
              "gape: gates and phi table must be contiguous");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->dim() == 4), "gape: bool 4-d mask expected");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 6 &&
                  segments.is_contiguous(),
              "gape: segments must be a contiguous int64 [S, 6] tensor");
  TORCH_CHECK(q_block > 0 && k_block > 0, "gape: block sizes must be positive");
}

// Calls f with a value of each of (In, T, G) as in forward_impl for the query dtype and `dot`.
template <typename F>
void dispatch_types(at::ScalarType st, bool dot, F&& f) {
  switch (st) {
    case at::kFloat: return f(float(), float(), float());
    case at::kDouble: return f(double(), double(), double());
    case at::kBFloat16:
      if (dot) return f(c10::BFloat16(), float(), c10::BFloat16());
      return f(c10::BFloat16(), float(), float());
    case at::kHalf:
      if (dot) return f(c10::Half(), float(), c10::Half());
      return f(c10::Half(), float(), float());
    default: TORCH_CHECK(false, "gape: query/key/value must be float32, float64, bfloat16 or float16, got ", st);
  }
}

// Sinks and the soft-cap are validated in gape/kernels/attention_cpu.py; these guard the pointer math.
void check_terms(const at::Tensor& query, const c10::optional<at::Tensor>& sinks, double softcap) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "gape: softcap must be finite and >= 0 (0: none)");
  TORCH_CHECK(!sinks.has_value() || (sinks->dim() == 1 && sinks->size(0) == query.size(1) && sinks->is_contiguous()),
              "gape: sinks must be a contiguous [Hq] tensor");
}

void check_types(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& query_gate,
                 const at::Tensor& keep, const at::Tensor& phi_rev, bool dot,
                 const std::vector<const at::Tensor*>& compute) {
  const at::ScalarType st = query.scalar_type();
  const bool half = st == at::kBFloat16 || st == at::kHalf;
  const at::ScalarType ct = half ? at::kFloat : st;
  TORCH_CHECK(key.scalar_type() == st && value.scalar_type() == st, "gape: query/key/value must share one dtype");
  TORCH_CHECK(query_gate.scalar_type() == ct && keep.scalar_type() == ct && phi_rev.scalar_type() == ct,
              "gape: gates and phi table must be ", ct, " for ", st, " inputs");
  for (const at::Tensor* t : compute)
    TORCH_CHECK(t->scalar_type() == ct, "gape: out, lse, delta, sinks and gradient buffers must be ", ct, " for ", st,
                " inputs");
  if (dot) {
    TORCH_CHECK(half, "gape: dot=True is for bfloat16/float16 inputs, got ", st);
    TORCH_CHECK(st == at::kBFloat16 ? gemm_bf16bf16f32_ != nullptr : gemm_f16f16f32_ != nullptr,
                "gape: this BLAS has no ", st, " x ", st, " -> float GEMM; call with dot=False");
  }
}

void attention_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& query_gate, const at::Tensor& keep, const at::Tensor& phi_rev,
                       int64_t phi_zero, const c10::optional<at::Tensor>& mask, const at::Tensor& segments,
                       int64_t dlo, int64_t dhi, at::Tensor& out, const c10::optional<at::Tensor>& lse, double scale,
                       int64_t q_block, int64_t k_block, bool dot, const c10::optional<at::Tensor>& sinks,
                       double softcap) {
  check_common(query, key, value, query_gate, keep, phi_rev, mask, segments, q_block, k_block);
  check_terms(query, sinks, softcap);
  TORCH_CHECK(out.dim() == 4 && out.stride(3) == 1, "gape: out needs a contiguous last dim");
  TORCH_CHECK(!lse.has_value() || lse->is_contiguous(), "gape: lse must be contiguous");
  std::vector<const at::Tensor*> compute{&out};
  if (lse.has_value()) compute.push_back(&*lse);
  if (sinks.has_value()) compute.push_back(&*sinks);
  check_types(query, key, value, query_gate, keep, phi_rev, dot, compute);
  dispatch_types(query.scalar_type(), dot, [&](auto in, auto t, auto g) {
    using In = decltype(in);
    using T = decltype(t);
    using G = decltype(g);
    Problem<In, T> P(query, key, value, query_gate, keep, phi_rev, phi_zero, mask, segments, dlo, dhi, scale, sinks,
                     softcap);
    T* lse_p = lse.has_value() ? lse->data_ptr<T>() : nullptr;
    if (softcap > 0) forward_impl<In, T, G, true>(P, out, lse_p, q_block, k_block);
    else forward_impl<In, T, G, false>(P, out, lse_p, q_block, k_block);
  });
}

void attention_backward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const at::Tensor& query_gate, const at::Tensor& keep, const at::Tensor& phi_rev,
                        int64_t phi_zero, const c10::optional<at::Tensor>& mask, const at::Tensor& segments,
                        int64_t dlo, int64_t dhi, const at::Tensor& grad_out, const at::Tensor& lse,
                        const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk_h, at::Tensor& dv_h, at::Tensor& dlam,
                        at::Tensor& dpi_h, double scale, int64_t q_block, int64_t k_block, bool dot,
                        double softcap) {
  check_common(query, key, value, query_gate, keep, phi_rev, mask, segments, q_block, k_block);
  check_terms(query, c10::nullopt, softcap);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.stride(3) == 1, "gape: grad_out needs a contiguous last dim");
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type(), "gape: grad_out must have the query dtype");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&lse, &delta, &dq, &dk_h, &dv_h, &dlam, &dpi_h})
    TORCH_CHECK(t->is_contiguous(), "gape: lse, delta and the gradient buffers must be contiguous");
  check_types(query, key, value, query_gate, keep, phi_rev, dot, {&lse, &delta, &dq, &dk_h, &dv_h, &dlam, &dpi_h});
  dispatch_types(query.scalar_type(), dot, [&](auto in, auto t, auto g) {
    using In = decltype(in);
    using T = decltype(t);
    using G = decltype(g);
    Problem<In, T> P(query, key, value, query_gate, keep, phi_rev, phi_zero, mask, segments, dlo, dhi, scale,
                     c10::nullopt, softcap);
    auto run = [&](auto cap) {
      backward_impl<In, T, G, decltype(cap)::value>(
          P, grad_out.data_ptr<In>(), strides_of(grad_out), lse.data_ptr<T>(), delta.data_ptr<T>(), dq.data_ptr<T>(),
          dk_h.data_ptr<T>(), dv_h.data_ptr<T>(), dlam.data_ptr<T>(), dpi_h.data_ptr<T>(), q_block, k_block);
    };
    if (softcap > 0) run(std::true_type());
    else run(std::false_type());
  });
}

// Bit 0: a bfloat16 x bfloat16 -> float GEMM is linked; bit 1: the float16 one.
int64_t half_gemms() { return (gemm_bf16bf16f32_ != nullptr ? 1 : 0) | (gemm_f16f16f32_ != nullptr ? 2 : 0); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gape, m) {
  m.def(
      "cpu_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor query_gate, Tensor keep, Tensor phi_rev, "
      "int phi_zero, Tensor? mask, Tensor segments, int dlo, int dhi, Tensor(a!) out, Tensor(b!)? lse, float scale, "
      "int q_block, int k_block, bool dot=False, Tensor? sinks=None, float softcap=0.0) -> ()");
  m.def(
      "cpu_attention_bwd(Tensor query, Tensor key, Tensor value, Tensor query_gate, Tensor keep, Tensor phi_rev, "
      "int phi_zero, Tensor? mask, Tensor segments, int dlo, int dhi, Tensor grad_out, Tensor lse, Tensor delta, "
      "Tensor(a!) dq, Tensor(b!) dk_h, Tensor(c!) dv_h, Tensor(d!) dlam, Tensor(e!) dpi_h, float scale, int q_block, "
      "int k_block, bool dot=False, float softcap=0.0) -> ()");
  m.def("cpu_attention_half_gemms() -> int", &half_gemms);
}

TORCH_LIBRARY_IMPL(gape, CPU, m) {
  m.impl("cpu_attention_fwd", &attention_forward);
  m.impl("cpu_attention_bwd", &attention_backward);
}
