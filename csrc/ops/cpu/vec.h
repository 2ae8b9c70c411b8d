// Vector helpers of the CPU kernels: 8-float vectors in GCC/Clang's generic vector extensions, and the
// choice between the kernels' two compiled copies.
//
// Everything here is always inlined, so it is compiled for the ISA of the function that uses it: the
// kernels compile their row loops twice, once plain (baseline ISA) and once with RSLAD_TARGET_AVX2 (AVX2 +
// FMA), and use_avx2() picks the copy at run time. Without GCC vector extensions (RSLAD_CPU_VEC undefined)
// the kernels keep their scalar path.
#pragma once

#include <ATen/Version.h>

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__GNUC__)  // GCC and Clang: generic vector extensions
#define RSLAD_CPU_VEC 1
#define RSLAD_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define RSLAD_CPU_AVX2 1
#define RSLAD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
// 32-byte vectors passed between always-inlined helpers: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#ifdef RSLAD_CPU_VEC
namespace rslad_fast {
namespace vec {

constexpr int kW = 8;  // floats per vector (one AVX2 register; two SSE or NEON registers elsewhere)
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

RSLAD_ALWAYS_INLINE f8 splat(float x) { return f8{} + x; }
RSLAD_ALWAYS_INLINE f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
RSLAD_ALWAYS_INLINE void store(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
// The first n (< kW) floats of p, the other lanes set to fill.
// (Written lane by lane over all kW lanes: a loop up to n would be compiled into a call to memcpy.)
RSLAD_ALWAYS_INLINE f8 load_part(const float* p, int n, float fill) {
  f8 v;
#pragma GCC unroll 8
  for (int i = 0; i < kW; ++i) v[i] = i < n ? p[i] : fill;
  return v;
}
RSLAD_ALWAYS_INLINE void store_part(float* p, f8 v, int n) {
#pragma GCC unroll 8
  for (int i = 0; i < kW; ++i) {
    if (i < n) p[i] = v[i];
  }
}
RSLAD_ALWAYS_INLINE f8 vmax(f8 a, f8 b) { return a > b ? a : b; }
// math::weighted, lane by lane: w * d, and exactly 0 where the probability w is 0 (a teacher logit of -inf
// gives w == 0 and d == -inf).
RSLAD_ALWAYS_INLINE f8 vweighted(f8 w, f8 d) { return w == splat(0.0f) ? splat(0.0f) : w * d; }
// Lanes reduced as a tree (lane k with lane k+4, then k+2, then k+1), the order of the scalar path's merge.
RSLAD_ALWAYS_INLINE float hsum(f8 v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }
RSLAD_ALWAYS_INLINE float hmax(f8 v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x), float32, for the arguments the kernels need (x <= 0: a logit minus its row maximum). Cephes'
// expf: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), a degree-6 polynomial for exp(r) (about
// 1 ulp), and 2^n written into the exponent bits. Below log(FLT_MIN) the result is exactly 0, so a class
// whose probability underflows contributes exactly 0; -inf gives 0 and NaN stays NaN.
RSLAD_ALWAYS_INLINE f8 vexp(f8 x) {
  const f8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f8 t = x * 1.44269504088896341f + magic;
  const f8 n = t - magic;
  f8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  i8 bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // (n + 127) << 23: the float 2^n
  f8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const f8 y = p * scale;
  return x < -87.33654475f ? splat(0.0f) : y;
}

// How a row of `classes` floats splits into vectors: `full` classes in whole vectors, then `rem` more.
// Rows of at least kW classes take the last rem as the vector of the row's last kW classes, whose first
// kW - rem lanes repeat classes already seen and are masked out of sums (`live`); shorter rows load their
// rem classes into a padded vector.
struct RowSplit {
  int64_t full;
  int rem;
  bool overlap;
  i8 live;

  RSLAD_ALWAYS_INLINE explicit RowSplit(int64_t classes)
      : full(classes - classes % kW), rem(static_cast<int>(classes % kW)), overlap(classes >= kW) {
    const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    live = overlap ? lane >= kW - rem : lane < rem;
  }
  // The tail vector of row p (padding lanes, for short rows, set to fill).
  RSLAD_ALWAYS_INLINE f8 tail(const float* p, int64_t classes, float fill) const {
    return overlap ? load(p + classes - kW) : load_part(p + full, rem, fill);
  }
  // Writes the tail vector: the repeated lanes get the values the whole vectors wrote there.
  RSLAD_ALWAYS_INLINE void store_tail(float* p, int64_t classes, f8 v) const {
    if (overlap) {
      store(p + classes - kW, v);
    } else {
      store_part(p + full, v, rem);
    }
  }
  RSLAD_ALWAYS_INLINE f8 mask(f8 v) const { return live ? v : splat(0.0f); }
};

// Whether to run the AVX2 copy: the CPU has AVX2 and FMA, and ATen runs at AVX2 or above (so
// ATEN_CPU_CAPABILITY=default also selects the baseline copy here).
inline bool use_avx2() {
#ifdef RSLAD_CPU_AVX2
  static const bool yes = [] {
    __builtin_cpu_init();
    const std::string cap = at::get_cpu_capability();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && (cap == "AVX2" || cap == "AVX512");
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace vec
}  // namespace rslad_fast
#endif  // RSLAD_CPU_VEC
