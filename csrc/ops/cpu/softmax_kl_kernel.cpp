// CPU kernels of softmax_kl and its backward: one task per block of rows.
//
// float32, float16 and bfloat16 rows (the latter two widened to float32 row by row) run a vectorized
// two-pass kernel: pass 1 takes the row maxima, pass 2 the exponentials and their sums, 8 classes per
// vector. The backward keeps the exponentials of pass 2 in its output buffers and forms the KL and both
// gradients from them, so it evaluates 2 exponentials per class, like the forward. The vector code is
// compiled twice, for AVX2+FMA and for the baseline ISA, and the AVX2 copy runs where the CPU has it
// (and ATen's ATEN_CPU_CAPABILITY does not ask for "default"). The vectors, their exp and the split of a
// row into whole vectors and a tail are vec.h's; the rows, blocks and ops of softmax_kl are here.
//
// The per-row formulas are math.h's: the row's KLState (maxima, sums of exponentials, p-weighted sum
// of a - b) gives the forward value through math::kl_value and the log-normalizers through
// math::lse_a / lse_b; the backward sums math::kl_term's p_c (log p_c - log q_c) and applies
// math::kl_grad's gradient formulas. The only difference is how p_c and q_c are obtained:
// exp(a_c - max_a) / sum_a from pass 2 instead of exp(a_c - lse_a) again (the same value to float32
// rounding). Teacher classes of probability 0 (a logit of -inf, or one whose exponential underflows) give
// p_c == 0 exactly and contribute 0, and a NaN logit makes its row NaN, as in math.h.
//
// float64 rows keep the scalar math.h path (online KLState in 8 interleaved lanes).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../math.h"

#include "vec.h"

namespace rslad_fast {
namespace {

// Rows per task: a [128, 10] batch is one task (threads would cost more than they save).
int64_t row_grain(int64_t classes) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1)); }

// ------------------------------------------------------------------ scalar path (float64)

// The row is folded into kLanes interleaved states merged as a tree at the end, like the CUDA kernel's
// 32 lanes: shorter sequential sums (more accurate for wide rows) and independent chains for the CPU.
constexpr int kLanes = 8;

template <typename scalar_t, typename acc_t>
math::KLState<acc_t> row_state(const scalar_t* s, const scalar_t* t, int64_t classes, acc_t inv_temp) {
  math::KLState<acc_t> st[kLanes];
  for (int k = 0; k < kLanes; ++k) st[k] = math::kl_init<acc_t>();
  for (int64_t c = 0; c < classes; ++c) {
    math::kl_update<acc_t>(st[c % kLanes], static_cast<acc_t>(t[c]) * inv_temp, static_cast<acc_t>(s[c]) * inv_temp);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) st[k] = math::kl_merge(st[k], st[k + width]);
  }
  return st[0];
}

// Sum of the per-class KL terms, with the same lane split.
template <typename scalar_t, typename acc_t>
acc_t row_kl_sum(const scalar_t* s, const scalar_t* t, int64_t classes, acc_t inv_temp, acc_t la, acc_t lb) {
  acc_t part[kLanes] = {};
  for (int64_t c = 0; c < classes; ++c) {
    part[c % kLanes] +=
        math::kl_term<acc_t>(static_cast<acc_t>(t[c]) * inv_temp, static_cast<acc_t>(s[c]) * inv_temp, la, lb);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) part[k] += part[k + width];
  }
  return part[0];
}

// Sum of the KL values of rows [begin, end), each also written to out[r] when out is given.
template <typename scalar_t, typename acc_t>
acc_t scalar_forward_block(const scalar_t* sp, const scalar_t* tp, int64_t classes, acc_t inv_temp, int64_t begin,
                           int64_t end, scalar_t* out) {
  acc_t acc = 0;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t kl = math::kl_value(row_state<scalar_t, acc_t>(sp + r * classes, tp + r * classes, classes, inv_temp));
    if (out != nullptr) out[r] = static_cast<scalar_t>(kl);
    acc += kl;
  }
  return acc;
}

// Gradients of rows [begin, end); row r's factor is g[r * g_stride] (g_stride 0 for a reduced loss).
template <typename scalar_t, typename acc_t>
void scalar_backward_block(const scalar_t* sp, const scalar_t* tp, const acc_t* g, int64_t g_stride, int64_t classes,
                           acc_t inv_temp, int64_t begin, int64_t end, scalar_t* gsp, scalar_t* gtp) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* srow = sp + r * classes;
    const scalar_t* trow = tp + r * classes;
    const math::KLState<acc_t> st = row_state<scalar_t, acc_t>(srow, trow, classes, inv_temp);
    const acc_t la = math::lse_a(st), lb = math::lse_b(st);
    const acc_t kl = row_kl_sum<scalar_t, acc_t>(srow, trow, classes, inv_temp, la, lb);
    const acc_t gr = g[r * g_stride];
    for (int64_t c = 0; c < classes; ++c) {
      acc_t gs, gt;
      math::kl_grad<acc_t>(static_cast<acc_t>(trow[c]) * inv_temp, static_cast<acc_t>(srow[c]) * inv_temp, la, lb, kl,
                           gr, &gs, &gt);
      gsp[r * classes + c] = static_cast<scalar_t>(gs);
      gtp[r * classes + c] = static_cast<scalar_t>(gt);
    }
  }
}

// ------------------------------------------------------------------ vectorized path (float32 math)
#ifdef RSLAD_CPU_VEC
// The softmax-KL rows in vec.h's vectors.
namespace kl_vec {

using namespace vec;

// A float row's maxima and exponential sums: the fields of math::KLState.
struct RowExp {
  float max_a, sum_a, dot, max_b, sum_b;
};

// Two passes over a row of teacher logits t and student logits s (a = t/T, b = s/T): the maxima, then
// sum exp(a - max_a), sum exp(a - max_a) (a - b) and sum exp(b - max_b) in kW lanes. With kStore the
// exponentials are also written to ea and eb. a - b is formed as (t - s) * (1/T): exactly 0 where the
// logits are equal (so identical rows give KL == 0), whether or not the compiler fuses a multiply-add.
template <bool kStore>
RSLAD_ALWAYS_INLINE RowExp row_exp(const float* s, const float* t, int64_t classes, float inv_temp, float* ea,
                                   float* eb) {
  const RowSplit split(classes);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  f8 mt = splat(neg_inf), ms = splat(neg_inf);
  for (int64_t c = 0; c < split.full; c += kW) {
    mt = vmax(mt, load(t + c));
    ms = vmax(ms, load(s + c));
  }
  if (split.rem) {
    mt = vmax(mt, split.tail(t, classes, neg_inf));
    ms = vmax(ms, split.tail(s, classes, neg_inf));
  }
  const float t_max = hmax(mt), s_max = hmax(ms);
  // T > 0, and rounding is monotonic: max(t) / T (as t * (1/T)) is exactly the maximum of a.
  const float max_a = t_max * inv_temp, max_b = s_max * inv_temp;
  const f8 vinv = splat(inv_temp), vmax_a = splat(max_a), vmax_b = splat(max_b);
  f8 sum_a = splat(0.0f), dot = splat(0.0f), sum_b = splat(0.0f);
  for (int64_t c = 0; c < split.full; c += kW) {
    const f8 tc = load(t + c), sc = load(s + c);
    const f8 ea_ = vexp(tc * vinv - vmax_a), eb_ = vexp(sc * vinv - vmax_b);
    sum_a += ea_;
    dot += vweighted(ea_, (tc - sc) * vinv);
    sum_b += eb_;
    if (kStore) {
      store(ea + c, ea_);
      store(eb + c, eb_);
    }
  }
  if (split.rem) {
    // Padding lanes of short rows hold the row maximum (exp(0): no overflow).
    const f8 tc = split.tail(t, classes, t_max), sc = split.tail(s, classes, s_max);
    const f8 ea_ = vexp(tc * vinv - vmax_a), eb_ = vexp(sc * vinv - vmax_b);
    const f8 ea_live = split.mask(ea_);
    sum_a += ea_live;
    dot += vweighted(ea_live, (tc - sc) * vinv);
    sum_b += split.mask(eb_);
    if (kStore) {
      split.store_tail(ea, classes, ea_);
      split.store_tail(eb, classes, eb_);
    }
  }
  return RowExp{max_a, hsum(sum_a), hsum(dot), max_b, hsum(sum_b)};
}

RSLAD_ALWAYS_INLINE math::KLState<float> to_state(const RowExp& e) {
  return math::KLState<float>{e.max_a, e.sum_a, e.dot, e.max_b, e.sum_b};
}

RSLAD_ALWAYS_INLINE float row_forward(const float* s, const float* t, int64_t classes, float inv_temp) {
  return math::kl_value(to_state(row_exp<false>(s, t, classes, inv_temp, nullptr, nullptr)));
}

// Gradients of g * KL(row) (g already holds scale / T) into gs and gt, which may not alias s or t.
RSLAD_ALWAYS_INLINE void row_backward(const float* s, const float* t, int64_t classes, float inv_temp, float g,
                                      float* gs, float* gt) {
  // exp(a - max_a) goes to gt and exp(b - max_b) to gs until the last pass overwrites them.
  const math::KLState<float> st = to_state(row_exp<true>(s, t, classes, inv_temp, gt, gs));
  const float la = math::lse_a(st), lb = math::lse_b(st);
  const float inv_sum_a = 1.0f / st.sum_a, inv_sum_b = 1.0f / st.sum_b;
  const RowSplit split(classes);
  const f8 vinv = splat(inv_temp), vla = splat(la), vlb = splat(lb), visa = splat(inv_sum_a), visb = splat(inv_sum_b);
  // KL = sum_c p_c (log p_c - log q_c) (math::kl_term). Padding lanes of short rows: p = 0.
  f8 kl_lanes = splat(0.0f);
  for (int64_t c = 0; c < split.full; c += kW) {
    const f8 log_p = load(t + c) * vinv - vla, log_q = load(s + c) * vinv - vlb;
    kl_lanes += vweighted(load(gt + c) * visa, log_p - log_q);
  }
  f8 tail_log_ratio = splat(0.0f), tail_p = splat(0.0f), tail_q = splat(0.0f);
  if (split.rem) {
    tail_log_ratio = (split.tail(t, classes, 0.0f) * vinv - vla) - (split.tail(s, classes, 0.0f) * vinv - vlb);
    tail_p = split.tail(gt, classes, 0.0f) * visa;
    tail_q = split.tail(gs, classes, 0.0f) * visb;
    kl_lanes += split.mask(vweighted(tail_p, tail_log_ratio));
  }
  const float kl_row = hsum(kl_lanes);
  const f8 kl = splat(kl_row), vg = splat(g);
  // math::kl_grad's teacher gradient where p_c == 0: 0, or NaN in a row with a NaN logit.
  const f8 p0_grad = splat(kl_row == kl_row ? 0.0f : kl_row);
  // math::kl_grad: g (q_c - p_c) and g p_c ((log p_c - log q_c) - KL). The tail (read above, before the
  // whole vectors overwrite the exponentials it overlaps) is written last.
  for (int64_t c = 0; c < split.full; c += kW) {
    const f8 log_p = load(t + c) * vinv - vla, log_q = load(s + c) * vinv - vlb;
    const f8 p = load(gt + c) * visa, q = load(gs + c) * visb;
    store(gs + c, vg * (q - p));
    store(gt + c, p == splat(0.0f) ? p0_grad : vg * p * ((log_p - log_q) - kl));
  }
  if (split.rem) {
    split.store_tail(gs, classes, vg * (tail_q - tail_p));
    split.store_tail(gt, classes, tail_p == splat(0.0f) ? p0_grad : vg * tail_p * (tail_log_ratio - kl));
  }
}

// Rows of a reduced floating type widened to float32, one row at a time, into buf.
template <typename scalar_t>
RSLAD_ALWAYS_INLINE void widen(const scalar_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
RSLAD_ALWAYS_INLINE float forward_block(const scalar_t* sp, const scalar_t* tp, int64_t classes, float inv_temp,
                                        int64_t begin, int64_t end, scalar_t* out) {
  float acc = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t r = begin; r < end; ++r) {
      const float kl = row_forward(sp + r * classes, tp + r * classes, classes, inv_temp);
      if (out != nullptr) out[r] = kl;
      acc += kl;
    }
  } else {
    std::vector<float> buf(2 * classes);
    float* s = buf.data();
    float* t = s + classes;
    for (int64_t r = begin; r < end; ++r) {
      widen(sp + r * classes, classes, s);
      widen(tp + r * classes, classes, t);
      const float kl = row_forward(s, t, classes, inv_temp);
      if (out != nullptr) out[r] = static_cast<scalar_t>(kl);
      acc += kl;
    }
  }
  return acc;
}

template <typename scalar_t>
RSLAD_ALWAYS_INLINE void backward_block(const scalar_t* sp, const scalar_t* tp, const float* g, int64_t g_stride,
                                        int64_t classes, float inv_temp, int64_t begin, int64_t end, scalar_t* gsp,
                                        scalar_t* gtp) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * classes;
      row_backward(sp + o, tp + o, classes, inv_temp, g[r * g_stride], gsp + o, gtp + o);
    }
  } else {
    std::vector<float> buf(4 * classes);
    float* s = buf.data();
    float* t = s + classes;
    float* gs = t + classes;
    float* gt = gs + classes;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * classes;
      widen(sp + o, classes, s);
      widen(tp + o, classes, t);
      row_backward(s, t, classes, inv_temp, g[r * g_stride], gs, gt);
      for (int64_t c = 0; c < classes; ++c) {
        gsp[o + c] = static_cast<scalar_t>(gs[c]);
        gtp[o + c] = static_cast<scalar_t>(gt[c]);
      }
    }
  }
}

// The same code, compiled for the baseline ISA and for AVX2 + FMA.
template <typename scalar_t>
float forward_block_base(const scalar_t* sp, const scalar_t* tp, int64_t classes, float inv_temp, int64_t begin,
                         int64_t end, scalar_t* out) {
  return forward_block(sp, tp, classes, inv_temp, begin, end, out);
}
template <typename scalar_t>
void backward_block_base(const scalar_t* sp, const scalar_t* tp, const float* g, int64_t g_stride, int64_t classes,
                         float inv_temp, int64_t begin, int64_t end, scalar_t* gsp, scalar_t* gtp) {
  backward_block(sp, tp, g, g_stride, classes, inv_temp, begin, end, gsp, gtp);
}
#ifdef RSLAD_CPU_AVX2
template <typename scalar_t>
RSLAD_TARGET_AVX2 float forward_block_avx2(const scalar_t* sp, const scalar_t* tp, int64_t classes, float inv_temp,
                                           int64_t begin, int64_t end, scalar_t* out) {
  return forward_block(sp, tp, classes, inv_temp, begin, end, out);
}
template <typename scalar_t>
RSLAD_TARGET_AVX2 void backward_block_avx2(const scalar_t* sp, const scalar_t* tp, const float* g, int64_t g_stride,
                                           int64_t classes, float inv_temp, int64_t begin, int64_t end, scalar_t* gsp,
                                           scalar_t* gtp) {
  backward_block(sp, tp, g, g_stride, classes, inv_temp, begin, end, gsp, gtp);
}
#endif

}  // namespace kl_vec
#endif  // RSLAD_CPU_VEC

// Sum of the KL values of rows [begin, end) (acc_t), each also written to out[r] when out is given.
template <typename scalar_t, typename acc_t>
acc_t forward_rows(const scalar_t* sp, const scalar_t* tp, int64_t classes, acc_t inv_temp, int64_t begin, int64_t end,
                   scalar_t* out) {
#ifdef RSLAD_CPU_VEC
  if constexpr (std::is_same_v<acc_t, float>) {
#ifdef RSLAD_CPU_AVX2
    if (vec::use_avx2()) return kl_vec::forward_block_avx2<scalar_t>(sp, tp, classes, inv_temp, begin, end, out);
#endif
    return kl_vec::forward_block_base<scalar_t>(sp, tp, classes, inv_temp, begin, end, out);
  }
#endif
  return scalar_forward_block<scalar_t, acc_t>(sp, tp, classes, inv_temp, begin, end, out);
}

template <typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* sp, const scalar_t* tp, const acc_t* g, int64_t g_stride, int64_t classes,
                   acc_t inv_temp, int64_t begin, int64_t end, scalar_t* gsp, scalar_t* gtp) {
#ifdef RSLAD_CPU_VEC
  if constexpr (std::is_same_v<acc_t, float>) {
#ifdef RSLAD_CPU_AVX2
    if (vec::use_avx2()) {
      kl_vec::backward_block_avx2<scalar_t>(sp, tp, g, g_stride, classes, inv_temp, begin, end, gsp, gtp);
      return;
    }
#endif
    kl_vec::backward_block_base<scalar_t>(sp, tp, g, g_stride, classes, inv_temp, begin, end, gsp, gtp);
    return;
  }
#endif
  scalar_backward_block<scalar_t, acc_t>(sp, tp, g, g_stride, classes, inv_temp, begin, end, gsp, gtp);
}

// ------------------------------------------------------------------ ops

at::Tensor softmax_kl_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                          c10::string_view reduction_name) {
  const KLInputs in = kl_inputs(student, teacher, temperature, reduction_name);
  const int64_t rows = in.rows, classes = in.classes;
  const at::Tensor &s = in.s, &t = in.t;
  at::Tensor out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_temp = acc_t(1) / static_cast<acc_t>(temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const int64_t grain = row_grain(classes);
    if (in.reduction == math::kNone) {
      out = at::empty({rows}, s.options());
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, acc_t>(sp, tp, classes, inv_temp, begin, end, op);
      });
      return;
    }
    // Per-task partial sums over fixed blocks of rows, added in task order, so the result does not
    // depend on the number of threads or their scheduling.
    const int64_t tasks = rows == 0 ? 0 : (rows + grain - 1) / grain;
    acc_t total = 0;
    if (tasks == 1) {
      total = forward_rows<scalar_t, acc_t>(sp, tp, classes, inv_temp, 0, rows, nullptr);
    } else {
      std::vector<acc_t> partial(tasks, acc_t(0));
      at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
        for (int64_t task = tb; task < te; ++task) {
          partial[task] = forward_rows<scalar_t, acc_t>(sp, tp, classes, inv_temp, task * grain,
                                                        std::min(rows, (task + 1) * grain), nullptr);
        }
      });
      for (acc_t p : partial) total += p;
    }
    total *= math::reduction_scale<acc_t>(in.reduction, rows, classes);
    out = at::scalar_tensor(static_cast<double>(total), s.options());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cpu(const at::Tensor& grad_output, const at::Tensor& student,
                                                           const at::Tensor& teacher, double temperature,
                                                           c10::string_view reduction_name) {
  const KLBackwardInputs in = kl_backward_inputs(grad_output, student, teacher, temperature, reduction_name);
  const int64_t rows = in.rows, classes = in.classes;
  if (rows == 0) return {in.grad_s, in.grad_t};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.s.scalar_type(), "softmax_kl_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_temp = acc_t(1) / static_cast<acc_t>(temperature);
    const scalar_t* sp = in.s.const_data_ptr<scalar_t>();
    const scalar_t* tp = in.t.const_data_ptr<scalar_t>();
    const scalar_t* gop = in.grad_output.const_data_ptr<scalar_t>();
    scalar_t* gsp = in.grad_s.data_ptr<scalar_t>();
    scalar_t* gtp = in.grad_t.data_ptr<scalar_t>();
    // Each row's factor scale / T: grad_output[r] / T for "none", grad_output * reduction scale / T else.
    const acc_t reduced_scale = math::reduction_scale<acc_t>(in.reduction, rows, classes);
    std::vector<acc_t> factors;
    acc_t factor = 0;
    const acc_t* g = &factor;
    int64_t g_stride = 0;
    if (in.reduction == math::kNone) {
      factors.resize(rows);
      for (int64_t r = 0; r < rows; ++r) factors[r] = static_cast<acc_t>(gop[r]) * acc_t(1) * inv_temp;
      g = factors.data();
      g_stride = 1;
    } else {
      factor = static_cast<acc_t>(gop[0]) * reduced_scale * inv_temp;
    }
    at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t, acc_t>(sp, tp, g, g_stride, classes, inv_temp, begin, end, gsp, gtp);
    });
  });
  return {in.grad_s, in.grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(rslad_fast, CPU, m) {
  m.impl("softmax_kl", &softmax_kl_cpu);
  m.impl("_softmax_kl_backward", &softmax_kl_backward_cpu);
}

}  // namespace rslad_fast
