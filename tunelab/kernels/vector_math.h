// 16 float32 lanes as GCC/Clang vector types (one AVX-512 register, two AVX2 ones, four NEON ones),
// shared by tunelab's C++ CPU kernels (cpu_attention.cpp, cpu_fused.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

inline v16 splat(float x) { return v16{} + x; }

// exp(x) for x <= 0: 2^y with y = x log2(e), split as 2^n 2^f (n = floor(y + 1/2), |f| <= 1/2),
// 2^f by its degree-6 Taylor polynomial (relative error below 2e-7), 2^n by the exponent bits.
inline v16 exp16(v16 x) {
  const v16 lowest = splat(-87.f);  // exp(-87) ~ 1.6e-38, still a normal float
  x = x < lowest ? lowest : x;
  const v16 y = x * 1.4426950408889634f;
  const v16 shifted = y + 0.5f;
  vi16 n = __builtin_convertvector(shifted, vi16);          // truncates toward zero
  n = n + (vi16)(__builtin_convertvector(n, v16) > shifted);  // floor: a true lane is -1
  const v16 f = y - __builtin_convertvector(n, v16);
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

}  // namespace
