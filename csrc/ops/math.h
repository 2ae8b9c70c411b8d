// Per-element and per-row math shared by the CPU and the CUDA kernels.
//
// Every formula the kernels compute lives here, as inline host-device functions, so that the CPU tests
// (which run everywhere) exercise exactly the arithmetic that runs on the GPU. The kernels themselves only
// move data and reduce partial states.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RSLAD_HD __host__ __device__ __forceinline__
#else
#define RSLAD_HD inline
#endif

namespace rslad_fast {
namespace math {

template <typename T>
RSLAD_HD T sign(T g) {
  // torch.sign semantics: sign(0) == 0 (and NaN gradients give 0, never a step into NaN).
  return static_cast<T>((g > T(0)) - (g < T(0)));
}

template <typename T>
RSLAD_HD T clamp(T v, T lo, T hi) {
  // Same order as torch.clamp(v, lo, hi): max first, then min. A NaN in any argument gives NaN, as torch.clamp,
  // torch.max and torch.min give: v < NaN is false, so a NaN bound (x_nat -/+ eps) needs its own test.
  v = (v < lo || lo != lo) ? lo : v;
  return (v > hi || hi != hi) ? hi : v;
}

// One PGD step for one element, in the accumulation type T:
//   clamp(clamp(x_adv + alpha*sign(grad), x_nat - eps, x_nat + eps), lo, hi)
// The projection is computed as min/max against x_nat -/+ eps, exactly as the official RSLAD, TRADES and
// ARD codes write it, so float32 results are bitwise equal to the eager composite. NaN in x_adv or x_nat
// gives NaN, as there; a NaN gradient steps by sign(NaN) == 0, as torch.sign.
template <typename T>
RSLAD_HD T pgd_step(T x_adv, T grad, T x_nat, T eps, T alpha, T lo, T hi) {
  T stepped = x_adv + alpha * sign(grad);
  T projected = clamp(stepped, x_nat - eps, x_nat + eps);
  return clamp(projected, lo, hi);
}

// Running state of the single-pass softmax-KL over one row.
//
// With a = teacher/T and b = student/T, p = softmax(a), q = softmax(b):
//   KL(p || q) = sum_c p_c (a_c - b_c) - lse(a) + lse(b)
// lse(a), lse(b) and the p-weighted sum of (a - b) are all accumulated online, rescaling by the running
// maximum as in the online softmax, so each logit is read once and any finite logits give a finite result.
// Teacher classes of probability 0 (a logit of -inf, or one whose exponential underflows) contribute exactly
// 0, whatever the student says there (weighted()); a student logit of -inf where p_c > 0 gives KL = +inf.
// A NaN logit makes sum_a or sum_b NaN, and with them the row's KL and gradients.
template <typename T>
struct KLState {
  T max_a;  // running max of a
  T sum_a;  // sum exp(a - max_a)
  T dot;    // sum exp(a - max_a) * (a - b)
  T max_b;  // running max of b
  T sum_b;  // sum exp(b - max_b)
};

template <typename T>
RSLAD_HD KLState<T> kl_init() {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  return KLState<T>{neg_inf, T(0), T(0), neg_inf, T(0)};
}

// Explicit float/double overloads: the float versions stay in single precision on both host and device.
RSLAD_HD float exp_(float v) { return ::expf(v); }
RSLAD_HD double exp_(double v) { return ::exp(v); }
RSLAD_HD float log_(float v) { return ::logf(v); }
RSLAD_HD double log_(double v) { return ::log(v); }

// w * d for a probability weight w >= 0, and exactly 0 where w is 0: the term p_c (a_c - b_c) of a class of
// teacher probability 0 is 0 even where a_c - b_c is infinite (0 * inf would be NaN). NaN weights stay NaN.
template <typename T>
RSLAD_HD T weighted(T w, T d) {
  return w == T(0) ? T(0) : w * d;
}

// Add one class (a, b) to the state.
// A logit of -inf adds exp(-inf) == 0 and is skipped: with a running maximum still at -inf it would form
// exp(-inf - -inf) == NaN. A NaN logit fails both comparisons and adds exp(NaN) == NaN to its sum.
template <typename T>
RSLAD_HD void kl_update(KLState<T>& s, T a, T b) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (a > s.max_a) {
    // New maximum: rescale what was accumulated so far (exp(-inf) == 0 on the first element).
    T r = exp_(s.max_a - a);
    s.sum_a = s.sum_a * r + T(1);
    s.dot = weighted(r, s.dot) + (a - b);
    s.max_a = a;
  } else if (a != neg_inf) {
    T w = exp_(a - s.max_a);
    s.sum_a += w;
    s.dot += weighted(w, a - b);
  }
  if (b > s.max_b) {
    s.sum_b = s.sum_b * exp_(s.max_b - b) + T(1);
    s.max_b = b;
  } else if (b != neg_inf) {
    s.sum_b += exp_(b - s.max_b);
  }
}

// Merge two partial states (parallel reduction of one row across threads).
template <typename T>
RSLAD_HD KLState<T> kl_merge(const KLState<T>& x, const KLState<T>& y) {
  KLState<T> out;
  if (x.sum_a == T(0)) {
    out.max_a = y.max_a;
    out.sum_a = y.sum_a;
    out.dot = y.dot;
  } else if (y.sum_a == T(0)) {
    out.max_a = x.max_a;
    out.sum_a = x.sum_a;
    out.dot = x.dot;
  } else {
    T m = x.max_a > y.max_a ? x.max_a : y.max_a;
    T rx = exp_(x.max_a - m), ry = exp_(y.max_a - m);
    out.max_a = m;
    out.sum_a = x.sum_a * rx + y.sum_a * ry;
    out.dot = weighted(rx, x.dot) + weighted(ry, y.dot);
  }
  if (x.sum_b == T(0)) {
    out.max_b = y.max_b;
    out.sum_b = y.sum_b;
  } else if (y.sum_b == T(0)) {
    out.max_b = x.max_b;
    out.sum_b = x.sum_b;
  } else {
    T m = x.max_b > y.max_b ? x.max_b : y.max_b;
    out.max_b = m;
    out.sum_b = x.sum_b * exp_(x.max_b - m) + y.sum_b * exp_(y.max_b - m);
  }
  return out;
}

template <typename T>
RSLAD_HD T lse_a(const KLState<T>& s) {
  return s.max_a + log_(s.sum_a);
}

template <typename T>
RSLAD_HD T lse_b(const KLState<T>& s) {
  return s.max_b + log_(s.sum_b);
}

// KL(p || q) of the row.
template <typename T>
RSLAD_HD T kl_value(const KLState<T>& s) {
  T v = s.dot / s.sum_a - lse_a(s) + lse_b(s);
  // Rounding can leave a tiny negative number where p == q; KL is never negative. (NaN passes.)
  return v < T(0) ? T(0) : v;
}

// One class's term p_c (log p_c - log q_c), given the row's log-normalizers. The backward sums these in a
// second pass instead of using kl_value: the gradient of the teacher logits multiplies p_c by
// (log p_c - log q_c - KL), which amplifies the cancellation error of the single-pass KL.
template <typename T>
RSLAD_HD T kl_term(T a, T b, T lse_a_, T lse_b_) {
  T log_p = a - lse_a_;
  return weighted(exp_(log_p), log_p - (b - lse_b_));
}

// Gradients of scale * KL(p || q) for one class, given the row's log-normalizers and its KL value:
//   d/d student_c = scale/T * (q_c - p_c)
//   d/d teacher_c = scale/T * p_c * ((log p_c - log q_c) - KL)
// log p and log q are formed in log space, and a class of p_c == 0 gets an exact 0, never 0 * inf.
template <typename T>
RSLAD_HD void kl_grad(T a, T b, T lse_a_, T lse_b_, T kl, T scale_over_temp, T* grad_student, T* grad_teacher) {
  T log_p = a - lse_a_;
  T log_q = b - lse_b_;
  T p = exp_(log_p);
  T q = exp_(log_q);
  *grad_student = scale_over_temp * (q - p);
  // p_c == 0 gives 0 (its log ratio may be -inf, or -inf - -inf where q_c == 0 too), except in a row whose KL
  // is NaN (a NaN logit): there every gradient is NaN.
  *grad_teacher = p == T(0) ? (kl == kl ? T(0) : kl) : scale_over_temp * p * ((log_p - log_q) - kl);
}

// Reductions, in the order of the op schema's string argument.
enum Reduction : int { kNone = 0, kSum = 1, kBatchMean = 2, kMean = 3 };

// The factor by which a row's KL enters the reduced loss ("mean" is the official RSLAD code's
// KLDivLoss default: the elementwise mean over B*C).
template <typename T>
RSLAD_HD T reduction_scale(int reduction, long long rows, long long classes) {
  switch (reduction) {
    case kBatchMean:
      return rows > 0 ? T(1) / T(rows) : T(0);
    case kMean:
      return rows > 0 ? T(1) / (T(rows) * T(classes)) : T(0);
    default:
      return T(1);
  }
}

}  // namespace math
}  // namespace rslad_fast
