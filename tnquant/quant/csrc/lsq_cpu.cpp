// LSQ / LSQ+ fake quantization on the CPU: one pass forward, one pass backward.
//
// Loaded by tnquant/quant/cpu_kernel.py (torch.utils.cpp_extension.load). The
// tensor is seen as R rows of C elements, row r quantized with scale[r] (and
// zero point zp[r], rounded and clamped to [qmin, qmax] as in the eager path):
//
//   forward:  out = (clamp(round(x / s) + zp, qmin, qmax) - zp) * s
//   backward: d/dx  = grad where qmin <= round(x / s) + zp <= qmax, else 0
//             d/ds  = sum(grad * (round(v) - v)) inside, sum(grad * code) outside
//             d/dzp = sum(-grad * s) outside
//
// The forward values are those of the eager path bit for bit (the same IEEE
// divide, round, clamp and multiply per element; built with -ffp-contract=off).
// The scale and zero-point gradients are per-row sums taken in vector lanes,
// the eager sums in another order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// rounding: 0 nearest_even (torch.round), 1 half_up (floor + (v - floor >= 0.5)), 2 floor
template <typename T, int MODE>
inline T round_mode(T v) {
  if (MODE == 0) return std::nearbyint(v);
  const T low = std::floor(v);
  if (MODE == 1) return low + (v - low >= T(0.5) ? T(1) : T(0));
  return low;
}

template <typename T>
inline T clamp(T v, T lo, T hi) { return std::min(std::max(v, lo), hi); }

// rows per parallel task: about 32k elements each
inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

void check(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& zp) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (R, C) tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous() && scale.size(0) == x.size(0),
              "scale must be a contiguous (R,) tensor");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type(), "scale and x must share a dtype");
  TORCH_CHECK(zp.numel() == 0 || (zp.dim() == 1 && zp.is_contiguous() && zp.size(0) == x.size(0)
                                  && zp.scalar_type() == x.scalar_type()),
              "zero_point must be empty or a contiguous (R,) tensor of x's dtype");
}

// One row forward; the branch-free inner loop vectorizes (-O3, -fno-math-errno).
template <typename T, int MODE>
inline void forward_row(const T* x, T* out, int64_t n, T s, T z, T lo, T hi) {
  for (int64_t c = 0; c < n; ++c)
    out[c] = (clamp(round_mode<T, MODE>(x[c] / s) + z, lo, hi) - z) * s;
}

// One row backward: an `omp simd` reduction (built with -fopenmp-simd; no OpenMP runtime)
// lets the sums vectorize without allowing reassociation anywhere else.
template <typename T, int MODE, bool NEED_X>
inline void backward_row(const T* g, const T* x, T* gx, int64_t n, T s, T z, T lo, T hi,
                         T* sum_s, T* sum_z) {
  T acc_s = 0, acc_z = 0;
#pragma omp simd reduction(+ : acc_s, acc_z)
  for (int64_t c = 0; c < n; ++c) {
    const T v = x[c] / s;
    const T rounded = round_mode<T, MODE>(v);
    const T q = rounded + z;
    const bool inside = q >= lo && q <= hi;
    const T gc = g[c];
    if (NEED_X) gx[c] = inside ? gc : T(0);
    acc_s += gc * (inside ? rounded - v : clamp(q, lo, hi) - z);
    acc_z += inside ? T(0) : gc;
  }
  *sum_s = acc_s;
  *sum_z = -acc_z * s;  // d/dzp = -s outside
}

template <typename T, int MODE>
inline void backward_row(const T* g, const T* x, T* gx, int64_t n, T s, T z, T lo, T hi,
                         T* sum_s, T* sum_z) {
  if (gx) backward_row<T, MODE, true>(g, x, gx, n, s, z, lo, hi, sum_s, sum_z);
  else backward_row<T, MODE, false>(g, x, gx, n, s, z, lo, hi, sum_s, sum_z);
}

template <typename T>
void forward_all(const T* xp, const T* sp, const T* zpp, T* op, int64_t rows, int64_t cols,
                 T lo, T hi, int64_t mode) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T s = sp[r];
      const T z = zpp ? std::nearbyint(clamp(zpp[r], lo, hi)) : T(0);
      const T* xr = xp + r * cols;
      T* orow = op + r * cols;
      if (mode == 0) forward_row<T, 0>(xr, orow, cols, s, z, lo, hi);
      else if (mode == 1) forward_row<T, 1>(xr, orow, cols, s, z, lo, hi);
      else forward_row<T, 2>(xr, orow, cols, s, z, lo, hi);
    }
  });
}

template <typename T>
void backward_all(const T* gp, const T* xp, const T* sp, const T* zpp, T* gxp, T* gsp, T* gzp,
                  int64_t rows, int64_t cols, T lo, T hi, int64_t mode) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T s = sp[r];
      const T z = zpp ? std::nearbyint(clamp(zpp[r], lo, hi)) : T(0);
      const int64_t off = r * cols;
      T* gx = gxp ? gxp + off : nullptr;
      if (mode == 0)
        backward_row<T, 0>(gp + off, xp + off, gx, cols, s, z, lo, hi, gsp + r, gzp + r);
      else if (mode == 1)
        backward_row<T, 1>(gp + off, xp + off, gx, cols, s, z, lo, hi, gsp + r, gzp + r);
      else
        backward_row<T, 2>(gp + off, xp + off, gx, cols, s, z, lo, hi, gsp + r, gzp + r);
    }
  });
}

}  // namespace

torch::Tensor lsq_forward(torch::Tensor x, torch::Tensor scale, torch::Tensor zp,
                          int64_t qmin, int64_t qmax, int64_t mode) {
  check(x, scale, zp);
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lsq_forward", [&] {
    forward_all<scalar_t>(x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                          zp.numel() ? zp.data_ptr<scalar_t>() : nullptr,
                          out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                          static_cast<scalar_t>(qmin), static_cast<scalar_t>(qmax), mode);
  });
  return out;
}

// returns {grad_x (R, C) or undefined, grad_scale (R,), grad_zero_point (R,)}
std::vector<torch::Tensor> lsq_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor scale,
                                        torch::Tensor zp, int64_t qmin, int64_t qmax,
                                        int64_t mode, bool need_x) {
  check(x, scale, zp);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous()
              && grad.scalar_type() == x.scalar_type(), "grad must be contiguous, like x");
  auto gx = need_x ? torch::empty_like(x) : torch::Tensor();
  auto gs = torch::empty({x.size(0)}, x.options());
  auto gz = torch::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lsq_backward", [&] {
    backward_all<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                           scale.data_ptr<scalar_t>(),
                           zp.numel() ? zp.data_ptr<scalar_t>() : nullptr,
                           need_x ? gx.data_ptr<scalar_t>() : nullptr, gs.data_ptr<scalar_t>(),
                           gz.data_ptr<scalar_t>(), x.size(0), x.size(1),
                           static_cast<scalar_t>(qmin), static_cast<scalar_t>(qmax), mode);
  });
  return {gx, gs, gz};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_forward", &lsq_forward, "LSQ fake quantization, forward (CPU)");
  m.def("lsq_backward", &lsq_backward, "LSQ fake quantization, backward (CPU)");
}
