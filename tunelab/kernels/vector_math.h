// 16 float32 lanes as GCC/Clang vector types (one AVX-512 register, two AVX2 ones, four NEON ones),
// and bfloat16 loads and stores through them, shared by tunelab's C++ CPU kernels (cpu_attention.cpp,
// cpu_fused.cpp).
//
// Arithmetic on 16 lanes compiles to two AVX2 instructions per operation, but GCC 12 turns a
// comparison or a `?:` select of 64-byte vectors into 16 scalar compares and moves where the
// target lacks AVX-512 (and a function taking or returning one, not inlined, into stores and loads
// through the stack). So every comparison here goes through `where_greater`, which without AVX-512
// compares and selects the two 8-lane halves, and the helpers are always inlined. Each lane's
// arithmetic is the same either way: the results are the same bits on every CPU (and as before
// this was written, but for the sign of a NaN out of SwiGLU). On a Zen 3 EPYC (AVX2) exp16 had been
// a function call with 16 scalar `vcomiss`/`vmaxss`; SwiGLU's forward and backward on a (1400, 1376)
// float32 pair took 9.8 ms before and 3.8 ms after (transformers' chain: 10 ms), the cross-entropy
// rows of 1,024 x 8,192 logits 48 ms before and 31 ms after (the chain: 53 ms). The attention
// kernel's time is in its tiles' accumulators, not here: unchanged (82 ms forward, one layer).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

#define TUNELAB_VINLINE inline __attribute__((always_inline))

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));

// Lane-wise `a > b ? x : y` (false where a or b is NaN), for float32 and uint32 lanes; without
// AVX-512, on the two 8-lane halves (see the top of this file).
#ifdef __AVX512F__
template <typename V>
TUNELAB_VINLINE V where_greater(V a, V b, V x, V y) {
  return a > b ? x : y;
}
#else
template <typename V>
TUNELAB_VINLINE V where_greater(V a, V b, V x, V y) {
  typedef std::remove_cvref_t<decltype(a[0])> Lane;
  typedef Lane half __attribute__((vector_size(32)));
  half ah[2], bh[2], xh[2], yh[2];
  std::memcpy(ah, &a, sizeof(a));
  std::memcpy(bh, &b, sizeof(b));
  std::memcpy(xh, &x, sizeof(x));
  std::memcpy(yh, &y, sizeof(y));
  const half out[2] = {ah[0] > bh[0] ? xh[0] : yh[0], ah[1] > bh[1] ? xh[1] : yh[1]};
  V result;
  std::memcpy(&result, out, sizeof(result));
  return result;
}
#endif

TUNELAB_VINLINE v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

TUNELAB_VINLINE void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

TUNELAB_VINLINE v16 splat(float x) { return v16{} + x; }

// The largest of the 16 lanes, and their sum (lane 0 first, then 1, ...).
TUNELAB_VINLINE float max_of(v16 v) {
  float m = v[0];
  for (int k = 1; k < 16; ++k) m = std::max(m, v[k]);
  return m;
}

TUNELAB_VINLINE float sum_of(v16 v) {
  float total = 0.f;
  for (int k = 0; k < 16; ++k) total += v[k];
  return total;
}

// exp(x) for x <= 0: 2^y with y = x log2(e), split as 2^n 2^f (n = floor(y + 1/2), |f| <= 1/2),
// 2^f by its degree-6 Taylor polynomial (relative error below 2e-7), 2^n by the exponent bits.
TUNELAB_VINLINE v16 exp16(v16 x) {
  const v16 lowest = splat(-87.f);  // exp(-87) ~ 1.6e-38, still a normal float
  x = where_greater(lowest, x, lowest, x);
  const v16 y = x * 1.4426950408889634f;
  const v16 shifted = y + 0.5f;
  v16 whole = __builtin_convertvector(__builtin_convertvector(shifted, vi16), v16);  // truncated
  whole = where_greater(whole, shifted, whole - 1.f, whole);                          // floor
  const vi16 n = __builtin_convertvector(whole, vi16);
  const v16 f = y - whole;
  v16 p = f * 1.5403530393381609e-4f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const vi16 bits = (n + 127) << 23;
  v16 power;
  std::memcpy(&power, &bits, sizeof(power));
  return p * power;
}

// ---- bfloat16, held as uint16_t bits: widened to float32 exactly, rounded to nearest even ----

TUNELAB_VINLINE float from_bf16(uint16_t bits) {
  const uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

TUNELAB_VINLINE uint16_t to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7fffffffu) > 0x7f800000u) return uint16_t((word >> 16) | 0x40u);  // NaN stays NaN
  word += 0x7fffu + ((word >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(word >> 16);
}

// Loads, stores and rounds for the two element types.
struct F32 {
  using T = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return from_bf16(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = to_bf16(v); }
  static float round(float v) { return from_bf16(to_bf16(v)); }
};

typedef uint16_t vh16 __attribute__((vector_size(32)));

TUNELAB_VINLINE v16 load16(const uint16_t* p) {
  vh16 half;
  std::memcpy(&half, p, sizeof(half));
  return (v16)(__builtin_convertvector(half, vu16) << 16);
}

// The float32 lanes rounded to bfloat16 and back (F32: unchanged), in registers.
template <typename T>
TUNELAB_VINLINE v16 round16(v16 v);

template <>
TUNELAB_VINLINE v16 round16<float>(v16 v) {
  return v;
}

template <>
TUNELAB_VINLINE v16 round16<uint16_t>(v16 v) {
  const vu16 word = (vu16)v;
  const vu16 rounded = (word + 0x7fffu + ((word >> 16) & 1u)) & 0xffff0000u;
  const vu16 quiet_nan = (word | 0x00400000u) & 0xffff0000u;
  return (v16)where_greater<vu16>(word & 0x7fffffffu, vu16{} + 0x7f800000u, quiet_nan, rounded);
}

// The lanes rounded to bfloat16 (round16), their upper halves stored.
TUNELAB_VINLINE void store16(uint16_t* p, v16 v) {
  const vh16 half = __builtin_convertvector((vu16)round16<uint16_t>(v) >> 16, vh16);
  std::memcpy(p, &half, sizeof(half));
}

}  // namespace
