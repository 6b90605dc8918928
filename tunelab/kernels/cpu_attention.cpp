// Causal attention within the examples of a packed row, forward and backward, on the CPU in float32.
// Built at first use by tunelab/kernels/cpu_attention.py (torch.utils.cpp_extension), which documents
// the maths; this file is only the kernel.
//
// Layout: q, out, grad_out (N, H, D); k, v (N, Hkv, D); lse (H, N) float32; all contiguous. q, k, v,
// out, grad_out and the gradients share one element type E: float32 or bfloat16 (F32, BF16 of
// vector_math.h). bfloat16 inputs are widened as they are read, every sum runs in float32, and the
// outputs are rounded once as they are written.
// Examples: offsets cu (B + 1,), int64. H = G * Hkv: query head h reads key/value head h / G.
//
// One task is one (example, key/value head): its G query heads share one packed copy of K and V,
// and in backward their dK, dV accumulate without races. Tasks are handed out longest example
// first from a shared counter, since their costs go as T^2.
//
// Within a task, query rows go in blocks of R = 8 against key blocks of JB = 32:
//   S = (scale q) K^T      8 x 32 tile, 16 vector accumulators, one K tile row per d
//   P = exp(S - lse)       16 lanes at a time (exp16), causal keys only
//   O = P V                4 rows x D at a time (2 rows for D = 128)
// Vectors are GCC/Clang vector types of 16 floats, which the compiler maps onto the machine's SIMD
// registers (one AVX-512 register, two AVX2 registers, four NEON ones).

#include <torch/python.h>  // tensors, ATen and the pybind11 casters; not the C++ frontend (torch/all.h)
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "tensor_data.h"  // data<F32>, data<BF16>
#include "vector_math.h"  // v16, load16, store16, splat, exp16, max_of, sum_of; F32, BF16

namespace {

constexpr int R = 8;    // query rows per block
constexpr int JB = 32;  // keys per tile

struct Examples {
  std::vector<int64_t> start;  // B + 1 offsets
  std::vector<int64_t> order;  // tasks (example * Hkv + kv head), longest example first
};

Examples examples_of(const torch::Tensor& cu, int64_t kv_heads) {
  Examples ex;
  const auto cu_a = cu.accessor<int64_t, 1>();
  for (int64_t b = 0; b < cu.size(0); ++b) ex.start.push_back(cu_a[b]);
  const int64_t count = (int64_t)ex.start.size() - 1;
  ex.order.resize(count * kv_heads);
  std::iota(ex.order.begin(), ex.order.end(), 0);
  std::stable_sort(ex.order.begin(), ex.order.end(), [&](int64_t a, int64_t b) {
    const int64_t ea = a / kv_heads, eb = b / kv_heads;
    return ex.start[ea + 1] - ex.start[ea] > ex.start[eb + 1] - ex.start[eb];
  });
  return ex;
}

// Run body(task) for every task, each thread taking the next one from a shared counter.
template <typename F>
void for_each_task(const Examples& ex, F body) {
  std::atomic<int64_t> next{0};
  const int64_t total = (int64_t)ex.order.size();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < total; i = next++) body(ex.order[i]);
  });
}

// K (or V) rows of one example and key/value head, packed as tiles of JB keys: tile t holds
// x[t * JB + jj][d] at t * D * JB + d * JB + jj (zero beyond T).
template <int D, typename E>
void pack_tiles(const typename E::T* src, int64_t c0, int64_t T, int64_t kv_heads, int64_t kvh, float* tiles) {
  for (int64_t j = 0; j < T; ++j) {
    const typename E::T* x = src + ((c0 + j) * kv_heads + kvh) * D;
    float* tile = tiles + (j / JB) * (D * JB) + (j % JB);
    for (int d = 0; d < D; ++d) tile[d * JB] = E::load(x, d);
  }
}

// One row of D elements converted between element types (rounded to nearest even where written as bfloat16).
template <int D, typename From, typename To>
inline void convert_row(const From* src, To* dst) {
  for (int b = 0; b < D / 16; ++b) store16(dst + 16 * b, load16(src + 16 * b));
}

// The same rows, plain float32: rows[j * D + d].
template <int D, typename E>
void copy_rows(const typename E::T* src, int64_t c0, int64_t T, int64_t kv_heads, int64_t kvh, float* rows) {
  for (int64_t j = 0; j < T; ++j) convert_row<D>(src + ((c0 + j) * kv_heads + kvh) * D, rows + j * D);
}

// out[r][j] = sum_d a[r][d] tiles[j][d] for r < R, j < jmax (rounded up to JB), into out (R x Tp).
template <int D>
void rows_times_keys(const float (*a)[D], const float* tiles, int64_t jmax, int64_t Tp, float* out) {
  for (int64_t j0 = 0; j0 < jmax; j0 += JB) {
    v16 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16{};
    const float* tile = tiles + (j0 / JB) * (D * JB);
    for (int d = 0; d < D; ++d) {
      const v16 k0 = load16(tile + d * JB), k1 = load16(tile + d * JB + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += a[r][d] * k0;
        acc[r][1] += a[r][d] * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store16(out + r * Tp + j0, acc[r][0]);
      store16(out + r * Tp + j0 + 16, acc[r][1]);
    }
  }
}

// dst row r = factor * sum_{j < jmax} w[r][j] x[j] for r < rows (w is R x Tp, x is T x D rows).
template <int D>
void weights_times_rows(const float* w, int64_t Tp, const float* x, int64_t jmax, int64_t rows, float factor,
                        float* dst, int64_t dst_stride) {
  constexpr int NV = D / 16;
  constexpr int RB = NV > 4 ? 2 : 4;  // rows at a time: RB * NV accumulators
  for (int r0 = 0; r0 < rows; r0 += RB) {
    v16 acc[RB][NV];
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < NV; ++b) acc[r][b] = v16{};
    for (int64_t j = 0; j < jmax; ++j) {
      v16 xj[NV];
      for (int b = 0; b < NV; ++b) xj[b] = load16(x + j * D + 16 * b);
      for (int r = 0; r < RB; ++r) {
        const float wr = w[(r0 + r) * Tp + j];
        for (int b = 0; b < NV; ++b) acc[r][b] += wr * xj[b];
      }
    }
    for (int r = r0; r < std::min<int64_t>(r0 + RB, rows); ++r)
      for (int b = 0; b < NV; ++b) store16(dst + r * dst_stride + 16 * b, acc[r - r0][b] * factor);
  }
}

// Row i's probabilities in place: p_j = exp(s_j - lse) for j < n, 0 for n <= j < jmax.
inline void probabilities(float* s, int64_t n, int64_t jmax, float lse) {
  const int64_t n16 = (n + 15) / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) store16(s + j, exp16(load16(s + j) - lse));
  for (int64_t j = n; j < std::max(n16, jmax); ++j) s[j] = 0.f;
}

template <int D, typename E>
std::vector<torch::Tensor> forward_d(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& cu, double scale) {
  const int64_t N = q.size(0), H = q.size(1), Hkv = k.size(1), G = H / Hkv;
  auto out = torch::empty_like(q);
  auto lse = torch::empty({H, N}, q.options().dtype(torch::kFloat32));
  const Examples ex = examples_of(cu, Hkv);
  const typename E::T *qp = data<E>(q), *kp = data<E>(k), *vp = data<E>(v);
  typename E::T* op = data<E>(out);
  float* lp = lse.data_ptr<float>();
  const float sc = (float)scale;
  for_each_task(ex, [&](int64_t task) {
    const int64_t e = task / Hkv, kvh = task % Hkv, c0 = ex.start[e], T = ex.start[e + 1] - c0;
    const int64_t Tp = (T + JB - 1) / JB * JB;
    std::vector<float> k_tiles(D * Tp, 0.f), v_rows(Tp * D, 0.f), s(R * Tp);
    pack_tiles<D, E>(kp, c0, T, Hkv, kvh, k_tiles.data());
    copy_rows<D, E>(vp, c0, T, Hkv, kvh, v_rows.data());
    for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
      for (int64_t i0 = 0; i0 < T; i0 += R) {
        const int64_t rows = std::min<int64_t>(R, T - i0), jmax = i0 + rows;
        float qs[R][D];
        for (int r = 0; r < R; ++r) {
          if (r < rows) {
            const typename E::T* src = qp + ((c0 + i0 + r) * H + h) * D;
            for (int d = 0; d < D; ++d) qs[r][d] = E::load(src, d) * sc;
          } else {
            std::fill(qs[r], qs[r] + D, 0.f);
          }
        }
        rows_times_keys<D>(qs, k_tiles.data(), jmax, Tp, s.data());
        for (int r = 0; r < R; ++r) {
          float* row = &s[r * Tp];
          if (r >= rows) {
            std::fill(row, row + jmax, 0.f);
            continue;
          }
          const int64_t n = i0 + r + 1, n16 = (n + 15) / 16 * 16;  // causal: keys 0 .. i
          std::fill(row + n, row + n16, -INFINITY);
          v16 mv = splat(-INFINITY);
          for (int64_t j = 0; j < n16; j += 16) {
            const v16 x = load16(row + j);
            mv = where_greater(x, mv, x, mv);
          }
          const float m = max_of(mv);
          probabilities(row, n, jmax, m);
          v16 lv = v16{};
          for (int64_t j = 0; j < n16; j += 16) lv += load16(row + j);
          const float l = sum_of(lv);
          const v16 inv = splat(1.f / l);
          for (int64_t j = 0; j < n16; j += 16) store16(row + j, load16(row + j) * inv);
          lp[h * N + c0 + i0 + r] = m + std::log(l);
        }
        float o[R][D];
        weights_times_rows<D>(s.data(), Tp, v_rows.data(), jmax, rows, 1.f, &o[0][0], D);
        for (int r = 0; r < rows; ++r) convert_row<D>(o[r], op + ((c0 + i0 + r) * H + h) * D);
      }
    }
  });
  return {out, lse};
}

template <int D, typename E>
std::vector<torch::Tensor> backward_d(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& out, const torch::Tensor& grad_out,
                                      const torch::Tensor& lse, const torch::Tensor& cu, double scale) {
  constexpr int NV = D / 16;
  const int64_t N = q.size(0), H = q.size(1), Hkv = k.size(1), G = H / Hkv;
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  const Examples ex = examples_of(cu, Hkv);
  const typename E::T *qp = data<E>(q), *kp = data<E>(k), *vp = data<E>(v);
  const typename E::T *opp = data<E>(out), *gp = data<E>(grad_out);
  const float* lp = lse.data_ptr<float>();
  typename E::T *dqp = data<E>(dq), *dkp = data<E>(dk), *dvp = data<E>(dv);
  const float sc = (float)scale;
  for_each_task(ex, [&](int64_t task) {
    const int64_t e = task / Hkv, kvh = task % Hkv, c0 = ex.start[e], T = ex.start[e + 1] - c0;
    const int64_t Tp = (T + JB - 1) / JB * JB;
    std::vector<float> k_tiles(D * Tp, 0.f), v_tiles(D * Tp, 0.f), k_rows(Tp * D, 0.f);
    std::vector<float> p(R * Tp), dp(R * Tp), dk_acc(T * D, 0.f), dv_acc(T * D, 0.f);
    pack_tiles<D, E>(kp, c0, T, Hkv, kvh, k_tiles.data());
    copy_rows<D, E>(kp, c0, T, Hkv, kvh, k_rows.data());
    pack_tiles<D, E>(vp, c0, T, Hkv, kvh, v_tiles.data());
    for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
      for (int64_t i0 = 0; i0 < T; i0 += R) {
        const int64_t rows = std::min<int64_t>(R, T - i0), jmax = i0 + rows;
        float qs[R][D], go[R][D], delta[R];
        for (int r = 0; r < R; ++r) {
          if (r >= rows) {
            std::fill(qs[r], qs[r] + D, 0.f);
            std::fill(go[r], go[r] + D, 0.f);
            delta[r] = 0.f;
            continue;
          }
          const int64_t at = ((c0 + i0 + r) * H + h) * D;
          v16 dot = v16{};
          for (int b = 0; b < D / 16; ++b) {
            const v16 g = load16(gp + at + 16 * b);
            store16(&qs[r][16 * b], load16(qp + at + 16 * b) * sc);
            store16(&go[r][16 * b], g);
            dot += g * load16(opp + at + 16 * b);
          }
          delta[r] = sum_of(dot);  // rowsum(dO * O)
        }
        rows_times_keys<D>(qs, k_tiles.data(), jmax, Tp, p.data());  // S
        rows_times_keys<D>(go, v_tiles.data(), jmax, Tp, dp.data());  // dP = dO V^T
        for (int r = 0; r < R; ++r) {
          float* pr = &p[r * Tp];
          float* dr = &dp[r * Tp];
          if (r >= rows) {
            std::fill(pr, pr + jmax, 0.f);
            std::fill(dr, dr + jmax, 0.f);
            continue;
          }
          const int64_t n = i0 + r + 1, n16 = (n + 15) / 16 * 16;
          probabilities(pr, n, jmax, lp[h * N + c0 + i0 + r]);
          for (int64_t j = 0; j < n16; j += 16) store16(dr + j, load16(pr + j) * (load16(dr + j) - delta[r]));
          for (int64_t j = n; j < std::max(n16, jmax); ++j) dr[j] = 0.f;
        }
        // dK_j += sum_r dS_rj (scale q_r), dV_j += sum_r P_rj dO_r
        for (int64_t j = 0; j < jmax; ++j) {
          v16 gk[NV], gv[NV];
          for (int b = 0; b < NV; ++b) {
            gk[b] = load16(&dk_acc[j * D + 16 * b]);
            gv[b] = load16(&dv_acc[j * D + 16 * b]);
          }
          for (int r = 0; r < rows; ++r) {
            const float ds = dp[r * Tp + j], pr = p[r * Tp + j];
            for (int b = 0; b < NV; ++b) {
              gk[b] += ds * load16(&qs[r][16 * b]);
              gv[b] += pr * load16(&go[r][16 * b]);
            }
          }
          for (int b = 0; b < NV; ++b) {
            store16(&dk_acc[j * D + 16 * b], gk[b]);
            store16(&dv_acc[j * D + 16 * b], gv[b]);
          }
        }
        // dQ_r = scale sum_j dS_rj K_j
        float dq_rows[R][D];
        weights_times_rows<D>(dp.data(), Tp, k_rows.data(), jmax, rows, sc, &dq_rows[0][0], D);
        for (int r = 0; r < rows; ++r) convert_row<D>(dq_rows[r], dqp + ((c0 + i0 + r) * H + h) * D);
      }
    }
    for (int64_t j = 0; j < T; ++j) {
      convert_row<D>(&dk_acc[j * D], dkp + ((c0 + j) * Hkv + kvh) * D);
      convert_row<D>(&dv_acc[j * D], dvp + ((c0 + j) * Hkv + kvh) * D);
    }
  });
  return {dq, dk, dv};
}

void check(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cu) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16,
              "cpu_attention: q, k, v must be float32 or bfloat16");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == q.scalar_type() && t->is_contiguous() && t->device().is_cpu(),
                "cpu_attention: q, k, v must be contiguous (N, heads, D) CPU tensors of one dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2), "cpu_attention: shapes");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "cpu_attention: query heads must be a multiple of key/value heads");
  TORCH_CHECK(cu.dim() == 1 && cu.scalar_type() == torch::kInt64, "cpu_attention: cu must be int64 (B + 1,)");
}

#define TUNELAB_BY_HEAD_DIM(D_VALUE, CALL)                                            \
  switch (D_VALUE) {                                                                  \
    case 16: { constexpr int D = 16; return CALL; }                                   \
    case 32: { constexpr int D = 32; return CALL; }                                   \
    case 64: { constexpr int D = 64; return CALL; }                                   \
    case 128: { constexpr int D = 128; return CALL; }                                 \
    default: TORCH_CHECK(false, "cpu_attention: head dim must be 16, 32, 64 or 128"); \
  }

// CALL for the element type of `t` (E) and the head dim of q (D).
#define TUNELAB_BY_TYPE_AND_HEAD_DIM(t, D_VALUE, CALL)                             \
  if ((t).scalar_type() == torch::kBFloat16) {                                     \
    using E = BF16;                                                                \
    TUNELAB_BY_HEAD_DIM(D_VALUE, CALL)                                             \
  } else {                                                                         \
    using E = F32;                                                                 \
    TUNELAB_BY_HEAD_DIM(D_VALUE, CALL)                                             \
  }

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu,
                                   double scale) {
  check(q, k, v, cu);
  TUNELAB_BY_TYPE_AND_HEAD_DIM(q, q.size(2), (forward_d<D, E>(q, k, v, cu, scale)));
}

std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                                    torch::Tensor grad_out, torch::Tensor lse, torch::Tensor cu, double scale) {
  check(q, k, v, cu);
  TORCH_CHECK(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes() && out.is_contiguous() &&
                  grad_out.is_contiguous() && out.scalar_type() == q.scalar_type() &&
                  grad_out.scalar_type() == q.scalar_type(),
              "cpu_attention: out and grad_out must be contiguous, shaped like q and of its dtype");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.is_contiguous(), "cpu_attention: lse must be float32");
  TUNELAB_BY_TYPE_AND_HEAD_DIM(q, q.size(2), (backward_d<D, E>(q, k, v, out, grad_out, lse, cu, scale)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal attention per packed example: (out, lse)");
  m.def("backward", &backward, "gradients of q, k, v");
}
