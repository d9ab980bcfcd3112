// jaxtune's attention for XLA:CPU, forward and backward, as jax.ffi custom calls.
//
// jaxtune/models/cpu_attention.py compiles this file on first use and falls back to XLA's attention
// when it cannot. Layouts are the model's own, so nothing is transposed around the call:
//   q, o, dq: B x L x H x K    k, v, dk, dv: B x L x G x K    seg, pos: B x L (int32)    lse: B x H x L
// H = G * R query heads share each kv head. Causal (the decoders, keys and queries the same tokens: training,
// or a prompt without a cache): query i attends to key j when j <= i, seg[j] == seg[i] > 0 and
// pos[j] <= pos[i]. Bidirectional (the encoders): to every key with seg[j] > 0, with optional dropout on
// the probabilities (see Spec). A query with no key gets zero output and gradient.
//
// Each (batch row, kv head) is one task on XLA's intra-op thread pool. Within it, blocks of BQ queries
// run against the keys they can see: scores and probabilities are BQ x (up to L) float32 tiles that
// stay in cache, the softmax's log-sum-exp is kept for the backward pass, which recomputes the
// probabilities (FlashAttention's scheme, with whole rows of keys rather than an online softmax).

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t BQ = 64;  // queries per block
constexpr float kNoKey = 1e30f;  // the log-sum-exp of a query without keys: every probability exp(s - 1e30) = 0

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// C (m x n, row stride ldc) = or += A B, with A(i, p) = a[i * ai + p * ap] and B (kk x n, row stride ldb).
// MR rows of C at a time in 2 x 8-wide registers per row; the column and row remainders run narrower.
template <int MR>
inline void rows(int64_t n, int64_t kk, const float* a, int64_t ai, int64_t ap, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v8 c0[MR], c1[MR];
    for (int r = 0; r < MR; ++r) {
      c0[r] = acc ? load8(c + r * ldc + j) : v8{};
      c1[r] = acc ? load8(c + r * ldc + j + 8) : v8{};
    }
    for (int64_t p = 0; p < kk; ++p) {
      const v8 b0 = load8(b + p * ldb + j), b1 = load8(b + p * ldb + j + 8);
      for (int r = 0; r < MR; ++r) {
        const float s = a[r * ai + p * ap];
        c0[r] += s * b0;
        c1[r] += s * b1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      store8(c + r * ldc + j, c0[r]);
      store8(c + r * ldc + j + 8, c1[r]);
    }
  }
  for (; j + 8 <= n; j += 8) {
    v8 c0[MR];
    for (int r = 0; r < MR; ++r) c0[r] = acc ? load8(c + r * ldc + j) : v8{};
    for (int64_t p = 0; p < kk; ++p) {
      const v8 b0 = load8(b + p * ldb + j);
      for (int r = 0; r < MR; ++r) c0[r] += a[r * ai + p * ap] * b0;
    }
    for (int r = 0; r < MR; ++r) store8(c + r * ldc + j, c0[r]);
  }
  for (; j < n; ++j) {
    for (int r = 0; r < MR; ++r) {
      float s = acc ? c[r * ldc + j] : 0.0f;
      for (int64_t p = 0; p < kk; ++p) s += a[r * ai + p * ap] * b[p * ldb + j];
      c[r * ldc + j] = s;
    }
  }
}

void gemm(int64_t m, int64_t n, int64_t kk, const float* a, int64_t ai, int64_t ap, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) rows<6>(n, kk, a + i * ai, ai, ap, b, ldb, c + i * ldc, ldc, acc);
  for (; i + 2 <= m; i += 2) rows<2>(n, kk, a + i * ai, ai, ap, b, ldb, c + i * ldc, ldc, acc);
  for (; i < m; ++i) rows<1>(n, kk, a + i * ai, ai, ap, b, ldb, c + i * ldc, ldc, acc);
}

// Runs f(0) .. f(n - 1) on the calling thread and the pool's. The shared state outlives the call, so a
// pool task that starts after all work is claimed finds none and touches nothing of the caller's.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F f) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// What one call computes: its dims, the mask (segment-causal, or bidirectional over the keys whose seg > 0)
// and dropout on the probabilities (bidirectional only): keep element (b, h, i, j) of the B x H x L x L
// probabilities when hash(its flat index) < threshold, then scale by 1 / keep, as layers.keep_mask does.
struct Spec {
  int64_t B, L, H, G, R, K;
  bool causal;
  uint32_t k0, k1, threshold;
  float keep;  // 1 - rate; 0: no dropout
  float scale;
};

Spec spec_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, int64_t causal,
             const ffi::Buffer<ffi::U32>& key, int64_t threshold, float keep) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const uint32_t* kp = key.typed_data();
  return Spec{qd[0], qd[1], qd[2], kd[2], qd[2] / kd[2], qd[3], causal != 0, kp[0], kp[1],
              static_cast<uint32_t>(threshold), keep, 1.0f / std::sqrt(static_cast<float>(qd[3]))};
}

inline uint32_t mix32(uint32_t x) {  // lowbias32, as layers._mix32
  x = (x ^ (x >> 16)) * 0x7FEB352Du;
  x = (x ^ (x >> 15)) * 0x846CA68Bu;
  return x ^ (x >> 16);
}

// factor[j] = kept ? 1 / keep : 0 for keys [0, n) of query i of head h in batch row b.
void dropout_factors(const Spec& d, int64_t b, int64_t h, int64_t i, float* factor, int64_t n) {
  const uint32_t base = static_cast<uint32_t>(((b * d.H + h) * d.L + i) * d.L) + d.k0, k1 = d.k1;
  const uint32_t threshold = d.threshold;
  const float inv = 1.0f / d.keep;  // p * (1 / keep): within an ulp of XLA's p / keep
  for (int64_t j = 0; j < n; ++j)
    factor[j] = mix32(mix32(base + static_cast<uint32_t>(j)) ^ k1) < threshold ? inv : 0.0f;
}

// dst (K x n, row stride ld) = src rows 0..n of one kv head (row stride G * K), transposed.
void transpose_head(const float* src, int64_t n, int64_t K, int64_t src_stride, float* dst, int64_t ld) {
  for (int64_t s = 0; s < n; ++s)
    for (int64_t c = 0; c < K; ++c) dst[c * ld + s] = src[s * src_stride + c];
}

inline int64_t keys_of(const Spec& d, int64_t i) { return d.causal ? i + 1 : d.L; }  // keys [0, n) query i sees

// Scaled, masked scores of queries [i0, i1) against keys [0, n) -> probabilities in place. The forward
// pass computes each row's log-sum-exp into lse; the backward pass reads it back and recomputes exp(s - lse).
// Masked scores become -kNoKey, whose exp is 0 whatever the row's log-sum-exp, so no loop needs a branch.
void probabilities(const Spec& d, float* s, int64_t ld, int64_t i0, int64_t i1, int64_t n, const int32_t* seg,
                   const int32_t* pos, float* lse, bool given) {
  for (int64_t i = i0; i < i1; ++i) {
    float* row = s + (i - i0) * ld;
    const int64_t end = keys_of(d, i);
    const int32_t si = seg[i], pi = pos[i];
    if (d.causal) {
      for (int64_t j = 0; j < end; ++j) row[j] = (si > 0 && seg[j] == si && pos[j] <= pi) ? row[j] * d.scale : -kNoKey;
    } else {
      for (int64_t j = 0; j < end; ++j) row[j] = seg[j] > 0 ? row[j] * d.scale : -kNoKey;
    }
    if (given) {
      const float l = lse[i];
      for (int64_t j = 0; j < end; ++j) row[j] = std::exp(row[j] - l);
    } else {
      float m = -kNoKey, sum = 0.0f;
      for (int64_t j = 0; j < end; ++j) m = std::max(m, row[j]);
      for (int64_t j = 0; j < end; ++j) {
        row[j] = std::exp(row[j] - m);
        sum += row[j];
      }
      if (m == -kNoKey) {  // no key: every entry is exp(0) = 1 so far
        lse[i] = kNoKey;
        for (int64_t j = 0; j < end; ++j) row[j] = 0.0f;
      } else {
        lse[i] = m + std::log(sum);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < end; ++j) row[j] *= inv;
      }
    }
    for (int64_t j = end; j < n; ++j) row[j] = 0.0f;
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::U32> key,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, int64_t causal, int64_t threshold,
                   float keep) {
  const Spec d = spec_of(q, k, causal, key, threshold, keep);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *segp = seg.typed_data(), *posp = pos.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  const int64_t qs = d.H * d.K, ks = d.G * d.K;  // row strides
  parallel_for(pool, d.B * d.G, [&](int64_t task) {
    const int64_t b = task / d.G, g = task % d.G;
    std::vector<float> kt(d.K * d.L), s(BQ * d.L), factor(d.keep > 0.0f ? d.L : 0);
    const float* kb = kp + b * d.L * ks + g * d.K;
    const float* vb = vp + b * d.L * ks + g * d.K;
    transpose_head(kb, d.L, d.K, ks, kt.data(), d.L);
    for (int64_t r = 0; r < d.R; ++r) {
      const int64_t h = g * d.R + r;
      const float* qb = qp + b * d.L * qs + h * d.K;
      float* ob = op + b * d.L * qs + h * d.K;
      float* lb = lp + (b * d.H + h) * d.L;
      for (int64_t i0 = 0; i0 < d.L; i0 += BQ) {
        const int64_t i1 = std::min(i0 + BQ, d.L), n = keys_of(d, i1 - 1);
        gemm(i1 - i0, n, d.K, qb + i0 * qs, qs, 1, kt.data(), d.L, s.data(), d.L, false);
        probabilities(d, s.data(), d.L, i0, i1, n, segp + b * d.L, posp + b * d.L, lb, false);
        if (d.keep > 0.0f) {
          for (int64_t i = i0; i < i1; ++i) {
            float* row = s.data() + (i - i0) * d.L;
            dropout_factors(d, b, h, i, factor.data(), n);
            for (int64_t j = 0; j < n; ++j) row[j] *= factor[j];
          }
        }
        gemm(i1 - i0, d.K, n, s.data(), d.L, 1, vb, ks, ob + i0 * qs, qs, false);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::U32> key,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t causal, int64_t threshold, float keep) {
  const Spec d = spec_of(q, k, causal, key, threshold, keep);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *opp = o.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  const int32_t *segp = seg.typed_data(), *posp = pos.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int64_t qs = d.H * d.K, ks = d.G * d.K;
  const bool dropout = d.keep > 0.0f;
  parallel_for(pool, d.B * d.G, [&](int64_t task) {
    const int64_t b = task / d.G, g = task % d.G;
    std::vector<float> kt(d.K * d.L), vt(d.K * d.L), p(BQ * d.L), dp(BQ * d.L), delta(BQ);
    std::vector<float> kept(dropout ? BQ * d.L : 0), factor(dropout ? d.L : 0), dkacc(d.L * d.K, 0.0f), dvacc(d.L * d.K, 0.0f);
    const float* kb = kp + b * d.L * ks + g * d.K;
    const float* vb = vp + b * d.L * ks + g * d.K;
    transpose_head(kb, d.L, d.K, ks, kt.data(), d.L);
    transpose_head(vb, d.L, d.K, ks, vt.data(), d.L);
    const int32_t *sb = segp + b * d.L, *pb = posp + b * d.L;
    for (int64_t r = 0; r < d.R; ++r) {
      const int64_t h = g * d.R + r;
      const float* qb = qp + b * d.L * qs + h * d.K;
      const float* ob = opp + b * d.L * qs + h * d.K;
      const float* dob = dop + b * d.L * qs + h * d.K;
      float* dqb = dqp + b * d.L * qs + h * d.K;
      float* lb = const_cast<float*>(lp + (b * d.H + h) * d.L);
      for (int64_t i0 = 0; i0 < d.L; i0 += BQ) {
        const int64_t i1 = std::min(i0 + BQ, d.L), m = i1 - i0, n = keys_of(d, i1 - 1);
        gemm(m, n, d.K, qb + i0 * qs, qs, 1, kt.data(), d.L, p.data(), d.L, false);
        probabilities(d, p.data(), d.L, i0, i1, n, sb, pb, lb, true);
        gemm(m, n, d.K, dob + i0 * qs, qs, 1, vt.data(), d.L, dp.data(), d.L, false);  // dO V^T
        const float* pv = p.data();  // the probabilities that multiplied V
        if (dropout) {  // dP = (dO V^T) * mask / keep, and V saw the dropped P
          for (int64_t i = 0; i < m; ++i) {
            float *dpr = dp.data() + i * d.L, *kr = kept.data() + i * d.L;
            const float* pr = p.data() + i * d.L;
            dropout_factors(d, b, h, i0 + i, factor.data(), n);
            for (int64_t j = 0; j < n; ++j) {
              dpr[j] *= factor[j];
              kr[j] = pr[j] * factor[j];
            }
          }
          pv = kept.data();
        }
        for (int64_t i = 0; i < m; ++i) {
          float acc = 0.0f;
          for (int64_t c = 0; c < d.K; ++c) acc += dob[(i0 + i) * qs + c] * ob[(i0 + i) * qs + c];
          delta[i] = acc;
        }
        for (int64_t i = 0; i < m; ++i) {  // dS = P (dP - rowsum(dO o)) / sqrt(K)
          float* dpr = dp.data() + i * d.L;
          const float* pr = p.data() + i * d.L;
          for (int64_t j = 0; j < n; ++j) dpr[j] = pr[j] * (dpr[j] - delta[i]) * d.scale;
        }
        gemm(n, d.K, m, pv, 1, d.L, dob + i0 * qs, qs, dvacc.data(), d.K, true);  // dV += P^T dO
        gemm(m, d.K, n, dp.data(), d.L, 1, kb, ks, dqb + i0 * qs, qs, false);  // dQ = dS K
        gemm(n, d.K, m, dp.data(), 1, d.L, qb + i0 * qs, qs, dkacc.data(), d.K, true);  // dK += dS^T Q
      }
    }
    float* dkb = dkp + b * d.L * ks + g * d.K;
    float* dvb = dvp + b * d.L * ks + g * d.K;
    for (int64_t s = 0; s < d.L; ++s) {
      std::memcpy(dkb + s * ks, dkacc.data() + s * d.K, d.K * sizeof(float));
      std::memcpy(dvb + s * ks, dvacc.data() + s * d.K, d.K * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

// The inputs both calls begin with (pool; q, k, v, seg, pos, dropout key) and the attributes they end with.
auto Inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::U32>>();
}

template <typename Binding>
auto WithAttrs(Binding binding) {
  return std::move(binding).template Attr<int64_t>("causal").template Attr<int64_t>("threshold").template Attr<float>(
      "keep");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneAttentionForward, Forward,
                              WithAttrs(Inputs().Ret<ffi::Buffer<ffi::F32>>()  // o
                                            .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneAttentionBackward, Backward,
                              WithAttrs(Inputs()
                                            .Arg<ffi::Buffer<ffi::F32>>()  // o
                                            .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                            .Arg<ffi::Buffer<ffi::F32>>()  // do
                                            .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                            .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                            .Ret<ffi::Buffer<ffi::F32>>()));  // dv
