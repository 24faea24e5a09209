// The tanh-approximation GELU (the official ViT code's, and vitlab's default) and its gradient, for bf16 and fp32
// CPU tensors, in one pass each.
//
// Why it exists: PyTorch's CPU tanh GELU runs at about a third of the speed of its erf GELU, which made the
// activation ~12% of the small-scratch preset's training step (docs/speed.md point 4; scripts/dev/kernel_timing.py). It is written here with the identity
// 0.5 (1 + tanh(u / 2)) = sigmoid(u): gelu(x) = x sigmoid(u), u = 2 sqrt(2 / pi) (x + 0.044715 x^3), one exp per
// value, in fp32, the result rounded once (nearest even), as PyTorch computes it for bf16.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

namespace vitlab {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr float kAlpha = 2.f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
constexpr float kBeta = 0.044715f;
constexpr int64_t kGrain = 1 << 14;  // values per parallel chunk

// 16 values (the first `count`) as fp32, and back; masked at the tail.
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// sigmoid(u) for u = 2 sqrt(2 / pi) (x + 0.044715 x^3); also du/dx when `du` is given.
inline fVec sigmoid_u(const fVec& x, fVec* du) {
  const fVec x2 = x * x, one(1.f);
  const fVec u = x * at::vec::fmadd(x2, fVec(kAlpha * kBeta), fVec(kAlpha));
  if (du) *du = at::vec::fmadd(x2, fVec(3.f * kAlpha * kBeta), fVec(kAlpha));
  // exp(-u) overflows to inf for u < -88: the sigmoid is then 0, as it should be.
  return one / (one + (fVec(0.f) - u).exp_u20());
}

template <typename T>
void forward_impl(const T* x, T* y, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 m = end - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - i)) - 1);
      const fVec xv(load16(x + i, m));
      store16(y + i, xv * sigmoid_u(xv, nullptr), m);
    }
  });
}

// d gelu / dx = s + x s (1 - s) du/dx, with s = sigmoid(u).
template <typename T>
void backward_impl(const T* dy, const T* x, T* dx, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 m = end - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - i)) - 1);
      const fVec xv(load16(x + i, m)), g(load16(dy + i, m));
      fVec du;
      const fVec s = sigmoid_u(xv, &du);
      const fVec slope = at::vec::fmadd(xv * s * (fVec(1.f) - s), du, s);
      store16(dx + i, g * slope, m);
    }
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat),
              "vitlab gelu_tanh: ", name, " must be a bf16 or fp32 CPU tensor, got ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "vitlab gelu_tanh: ", name, " must be contiguous");
}

}  // namespace

at::Tensor gelu_tanh_forward(const at::Tensor& x) {
  check(x, "x");
  auto y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    forward_impl(x.const_data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), x.numel());
  else
    forward_impl(x.const_data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

at::Tensor gelu_tanh_backward(const at::Tensor& dy, const at::Tensor& x) {
  check(x, "x");
  check(dy, "grad_output");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "vitlab gelu_tanh: grad_output ",
              dy.sizes(), " ", dy.scalar_type(), " does not match x ", x.sizes(), " ", x.scalar_type());
  auto dx = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    backward_impl(dy.const_data_ptr<at::BFloat16>(), x.const_data_ptr<at::BFloat16>(), dx.data_ptr<at::BFloat16>(),
                  x.numel());
  else
    backward_impl(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), dx.data_ptr<float>(), x.numel());
  return dx;
}

}  // namespace vitlab
