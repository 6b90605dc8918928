// RMSNorm and SwiGLU of a decoder block, forward and backward, each in one pass over memory on the CPU;
// and the rows of the LM head's cross-entropy (loss and gradient from the logits, one row in cache).
// Built at first use by tunelab/kernels/cpu_fused.py (torch.utils.cpp_extension), which documents the
// maths and the rounding points; this file is only the kernels.
//
// Element types: float32 or bfloat16 (held as uint16_t bits). Every value is computed in float32 and
// rounded to the tensor's dtype exactly where transformers' modules round it (round-to-nearest-even),
// so in bf16 the results equal the modules' up to the order of the float32 sums.

#include <torch/python.h>  // tensors, ATen and the pybind11 casters; not the C++ frontend (torch/all.h)
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensor_data.h"  // data<F32>, data<BF16>
#include "vector_math.h"  // v16, load16, store16, splat, exp16, max_of, sum_of; bfloat16: F32, BF16, round16

namespace {

constexpr int64_t ROWS_PER_TASK = 16;
constexpr int64_t ELEMENTS_PER_TASK = 16384;

// ---- RMSNorm: x (N, H), w (H,) -> y (N, H) in P, rstd (N,) float32 ----

template <typename X, typename W, typename P>
void rms_forward(const typename X::T* x, const typename W::T* w, typename P::T* y, float* rstd, int64_t rows,
                 int64_t hidden, float eps) {
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const typename X::T* xr = x + row * hidden;
      typename P::T* yr = y + row * hidden;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t h = 0; h < hidden; ++h) {
        const float v = X::load(xr, h);
        squares += v * v;
      }
      const float r = 1.f / std::sqrt(squares / float(hidden) + eps);
      rstd[row] = r;
#pragma omp simd
      for (int64_t h = 0; h < hidden; ++h) {
        const float normed = X::round(X::load(xr, h) * r);  // .to(input_dtype)
        P::store(yr, h, W::load(w, h) * normed);
      }
    }
  });
}

template <typename X, typename W, typename P>
void rms_backward(const typename P::T* grad_y, const typename X::T* x, const typename W::T* w, const float* rstd,
                  typename X::T* grad_x, float* grad_w_partials, int64_t rows, int64_t hidden) {
  const bool want_w = grad_w_partials != nullptr;
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    float* grad_w = want_w ? grad_w_partials + at::get_thread_num() * hidden : nullptr;
    std::vector<float> grad_n(hidden);
    for (int64_t row = begin; row < end; ++row) {
      const typename X::T* xr = x + row * hidden;
      const typename P::T* gr = grad_y + row * hidden;
      typename X::T* gxr = grad_x + row * hidden;
      const float r = rstd[row];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t h = 0; h < hidden; ++h) {
        const float g = X::round(P::load(gr, h) * W::load(w, h));  // grad of n_in = X(n): rounded to X
        grad_n[h] = g;
        dot += g * X::load(xr, h);
      }
      const float coefficient = r * r * r * dot / float(hidden);
#pragma omp simd
      for (int64_t h = 0; h < hidden; ++h) {
        X::store(gxr, h, r * grad_n[h] - coefficient * X::load(xr, h));
      }
      if (want_w) {
#pragma omp simd
        for (int64_t h = 0; h < hidden; ++h) {
          grad_w[h] += P::load(gr, h) * X::round(X::load(xr, h) * r);
        }
      }
    }
  });
}

bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cpu_fused: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, "cpu_fused: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "cpu_fused: ", name, " must be contiguous");
}

std::vector<torch::Tensor> rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_float(x, "x");
  check_float(w, "weight");
  const int64_t hidden = w.numel();
  TORCH_CHECK(x.size(-1) == hidden, "cpu_fused: x's last dim ", x.size(-1), " != weight's ", hidden);
  const int64_t rows = x.numel() / hidden;
  const auto out_dtype = is_bf16(x) && is_bf16(w) ? torch::kBFloat16 : torch::kFloat32;
  auto y = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  auto rstd = torch::empty({rows}, x.options().dtype(torch::kFloat32));
  float* r = rstd.data_ptr<float>();
  const float e = float(eps);
  if (is_bf16(x) && is_bf16(w)) {
    rms_forward<BF16, BF16, BF16>(data<BF16>(x), data<BF16>(w), data<BF16>(y), r, rows, hidden, e);
  } else if (is_bf16(x)) {
    rms_forward<BF16, F32, F32>(data<BF16>(x), data<F32>(w), data<F32>(y), r, rows, hidden, e);
  } else if (is_bf16(w)) {
    rms_forward<F32, BF16, F32>(data<F32>(x), data<BF16>(w), data<F32>(y), r, rows, hidden, e);
  } else {
    rms_forward<F32, F32, F32>(data<F32>(x), data<F32>(w), data<F32>(y), r, rows, hidden, e);
  }
  return {y, rstd};
}

std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                             const torch::Tensor& w, const torch::Tensor& rstd, bool want_w) {
  check_float(x, "x");
  check_float(w, "weight");
  check_float(grad_y, "grad_y");
  const int64_t hidden = w.numel();
  const int64_t rows = x.numel() / hidden;
  const auto out_dtype = is_bf16(x) && is_bf16(w) ? torch::kBFloat16 : torch::kFloat32;
  TORCH_CHECK(grad_y.scalar_type() == out_dtype && grad_y.sizes() == x.sizes(), "cpu_fused: grad_y must match y");
  auto grad_x = torch::empty_like(x);
  torch::Tensor partials;
  if (want_w) partials = torch::zeros({at::get_num_threads(), hidden}, x.options().dtype(torch::kFloat32));
  const float* r = rstd.data_ptr<float>();
  float* gw = want_w ? partials.data_ptr<float>() : nullptr;
  if (is_bf16(x) && is_bf16(w)) {
    rms_backward<BF16, BF16, BF16>(data<BF16>(grad_y), data<BF16>(x), data<BF16>(w), r, data<BF16>(grad_x), gw,
                                   rows, hidden);
  } else if (is_bf16(x)) {
    rms_backward<BF16, F32, F32>(data<F32>(grad_y), data<BF16>(x), data<F32>(w), r, data<BF16>(grad_x), gw, rows,
                                 hidden);
  } else if (is_bf16(w)) {
    rms_backward<F32, BF16, F32>(data<F32>(grad_y), data<F32>(x), data<BF16>(w), r, data<F32>(grad_x), gw, rows,
                                 hidden);
  } else {
    rms_backward<F32, F32, F32>(data<F32>(grad_y), data<F32>(x), data<F32>(w), r, data<F32>(grad_x), gw, rows,
                                hidden);
  }
  if (!want_w) return {grad_x};
  return {grad_x, partials.sum(0).to(w.scalar_type())};
}

// ---- SwiGLU: gate, up (same shape and dtype) -> silu(gate) * up ----
// 16 elements at a time (vector_math.h); bfloat16 lanes are widened to float32 and rounded back.

// sigmoid(x) = 1 / (1 + e^-x), through e^-|x| so that the exponent never overflows.
TUNELAB_VINLINE v16 sigmoid16(v16 x) {
  const v16 magnitude = (v16)((vu16)x & 0x7fffffffu);
  const v16 e = exp16(-magnitude);
  const v16 r = 1.f / (1.f + e);
  return where_greater(splat(0.f), x, e * r, r);  // x < 0: e^x / (1 + e^x)
}

// Runs `block(arrays, i)` on every 16-element block of [begin, end) of the arrays in `arrays`; the last,
// partial block is copied into zero-padded buffers first and the first `outputs` arrays copied
// back, so the tail takes the same arithmetic as the rest.
template <typename T, size_t N, typename Block>
void in_blocks_of_16(int64_t begin, int64_t end, std::array<T*, N> arrays, size_t outputs, Block block) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) block(arrays, i);
  if (i == end) return;
  const int64_t rest = end - i;
  T buffers[N][16] = {};
  std::array<T*, N> padded;
  for (size_t a = 0; a < N; ++a) {
    std::memcpy(buffers[a], arrays[a] + i, rest * sizeof(T));
    padded[a] = buffers[a];
  }
  block(padded, 0);
  for (size_t a = 0; a < outputs; ++a) std::memcpy(arrays[a] + i, buffers[a], rest * sizeof(T));
}

template <typename D>
void swiglu_forward_kernel(const typename D::T* gate, const typename D::T* up, typename D::T* out, int64_t n) {
  using T = typename D::T;
  at::parallel_for(0, n, ELEMENTS_PER_TASK, [&](int64_t begin, int64_t end) {
    std::array<T*, 3> arrays = {out, const_cast<T*>(gate), const_cast<T*>(up)};
    in_blocks_of_16(begin, end, arrays, 1, [](std::array<T*, 3> a, int64_t i) {
      const v16 g = load16(a[1] + i);
      const v16 activated = round16<T>(g * sigmoid16(g));  // act_fn(gate), in D
      store16(a[0] + i, activated * load16(a[2] + i));
    });
  });
}

template <typename D>
void swiglu_backward_kernel(const typename D::T* grad, const typename D::T* gate, const typename D::T* up,
                            typename D::T* grad_gate, typename D::T* grad_up, int64_t n) {
  using T = typename D::T;
  at::parallel_for(0, n, ELEMENTS_PER_TASK, [&](int64_t begin, int64_t end) {
    std::array<T*, 5> arrays = {grad_gate, grad_up, const_cast<T*>(grad), const_cast<T*>(gate),
                                const_cast<T*>(up)};
    in_blocks_of_16(begin, end, arrays, 2, [](std::array<T*, 5> a, int64_t i) {
      const v16 g = load16(a[3] + i);
      const v16 d = load16(a[2] + i);
      const v16 s = sigmoid16(g);
      const v16 grad_activated = round16<T>(d * load16(a[4] + i));  // grad of act * up w.r.t. act, in D
      store16(a[1] + i, d * round16<T>(g * s));
      store16(a[0] + i, grad_activated * s * (1.f + g * (1.f - s)));  // silu'(g) = s (1 + g (1 - s))
    });
  });
}

void check_pair(const torch::Tensor& gate, const torch::Tensor& up) {
  check_float(gate, "gate");
  check_float(up, "up");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.sizes() == up.sizes(),
              "cpu_fused: gate and up must have the same shape and dtype");
}

torch::Tensor swiglu_forward(const torch::Tensor& gate, const torch::Tensor& up) {
  check_pair(gate, up);
  auto out = torch::empty_like(gate);
  if (is_bf16(gate)) {
    swiglu_forward_kernel<BF16>(data<BF16>(gate), data<BF16>(up), data<BF16>(out), gate.numel());
  } else {
    swiglu_forward_kernel<F32>(data<F32>(gate), data<F32>(up), data<F32>(out), gate.numel());
  }
  return out;
}

std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& grad, const torch::Tensor& gate,
                                           const torch::Tensor& up) {
  check_pair(gate, up);
  check_pair(grad, gate);
  auto grad_gate = torch::empty_like(gate);
  auto grad_up = torch::empty_like(up);
  const int64_t n = gate.numel();
  if (is_bf16(gate)) {
    swiglu_backward_kernel<BF16>(data<BF16>(grad), data<BF16>(gate), data<BF16>(up), data<BF16>(grad_gate),
                                 data<BF16>(grad_up), n);
  } else {
    swiglu_backward_kernel<F32>(data<F32>(grad), data<F32>(gate), data<F32>(up), data<F32>(grad_gate),
                                data<F32>(grad_up), n);
  }
  return {grad_gate, grad_up};
}

}  // namespace

// ---- Cross-entropy rows: logits z (n, V), targets y (n,) int64 -> loss (n,) float32 = lse - z_y and,
// with `want_grad`, g = softmax(z) - onehot(y) (n, V) in z's dtype. Per row, in float32: the max m,
// s = sum exp(z - m) (exp16), lse = m + log s; g = exp(z - m) / s, minus 1 at y, rounded once. A row
// is read three times, but at V x 2 bytes (96 KB for 49,152 tokens) it is in cache after the first.

inline float exp1(float x) { return exp16(splat(x))[0]; }  // the same exponential, one lane

template <typename D>
void xent_kernel(const typename D::T* z, const int64_t* y, float* loss, typename D::T* grad, int64_t rows,
                 int64_t V) {
  const int64_t blocks_end = V / 16 * 16;  // the rest (V mod 16 elements) one at a time
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* row = z + r * V;
      v16 max16 = splat(-INFINITY);
      for (int64_t i = 0; i < blocks_end; i += 16) {
        const v16 v = load16(row + i);
        max16 = where_greater(v, max16, v, max16);
      }
      float m = max_of(max16);
      for (int64_t i = blocks_end; i < V; ++i) m = std::max(m, D::load(row, i));
      v16 sum16 = splat(0.f);
      for (int64_t i = 0; i < blocks_end; i += 16) sum16 += exp16(load16(row + i) - m);
      float s = sum_of(sum16);
      for (int64_t i = blocks_end; i < V; ++i) s += exp1(D::load(row, i) - m);
      const int64_t target = y[r];
      const float z_target = D::load(row, target);  // read before grad (possibly z itself) overwrites it
      loss[r] = m + std::log(s) - z_target;
      if (grad == nullptr) continue;
      auto* grad_row = grad + r * V;
      const v16 sum = splat(s);
      for (int64_t i = 0; i < blocks_end; i += 16) store16(grad_row + i, exp16(load16(row + i) - m) / sum);
      for (int64_t i = blocks_end; i < V; ++i) D::store(grad_row, i, exp1(D::load(row, i) - m) / s);
      D::store(grad_row, target, exp1(z_target - m) / s - 1.f);
    }
  });
}

// in_place: the gradient overwrites z, row by row (each element is read before it is written).
std::vector<torch::Tensor> cross_entropy_rows(torch::Tensor z, const torch::Tensor& y, bool want_grad,
                                              bool in_place) {
  check_float(z, "logits");
  TORCH_CHECK(z.dim() == 2, "cpu_fused: logits must be (rows, vocabulary)");
  TORCH_CHECK(y.scalar_type() == torch::kInt64 && y.dim() == 1 && y.size(0) == z.size(0) && y.is_contiguous(),
              "cpu_fused: targets must be contiguous int64 (rows,)");
  const int64_t V = z.size(1);
  TORCH_CHECK(y.numel() == 0 || (y.min().item<int64_t>() >= 0 && y.max().item<int64_t>() < V),
              "cpu_fused: a target lies outside the vocabulary");
  auto loss = torch::empty({z.size(0)}, z.options().dtype(torch::kFloat32));
  auto grad = want_grad ? (in_place ? z : torch::empty_like(z)) : torch::Tensor();
  const int64_t* targets = y.data_ptr<int64_t>();
  if (is_bf16(z)) {
    xent_kernel<BF16>(data<BF16>(z), targets, loss.data_ptr<float>(), want_grad ? data<BF16>(grad) : nullptr,
                      z.size(0), V);
  } else {
    xent_kernel<F32>(data<F32>(z), targets, loss.data_ptr<float>(), want_grad ? data<F32>(grad) : nullptr,
                     z.size(0), V);
  }
  return {loss, grad};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm forward: (y, rstd)");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm backward: (grad_x[, grad_w])");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up");
  m.def("swiglu_backward", &swiglu_backward, "(grad_gate, grad_up)");
  m.def("cross_entropy_rows", &cross_entropy_rows, "(lse - z_y per row, softmax(z) - onehot(y) [in z's place] or undefined)");
}
