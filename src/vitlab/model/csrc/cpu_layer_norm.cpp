// LayerNorm of an fp32 tensor with a bf16 result, and its gradient from a bf16 one: what a pre-norm block computes
// under CPU bf16 autocast (LayerNorm in fp32, its output cast to bf16 for the Dense layer that reads it), without
// the cast passes.
//
// Why it exists: autocast runs LayerNorm in fp32 and the next Dense layer casts its output to bf16; the backward
// casts the bf16 gradient back to fp32 for LayerNorm's own backward. Those two passes over (tokens, width) were 16 of
// the 25 full-size casts in a step of the small-scratch preset's training. Here the
// forward writes bf16 directly and the backward reads the bf16 gradient directly; the arithmetic is LayerNorm's in
// fp32 (biased variance, eps inside the square root), the output rounded once (nearest even).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace vitlab {
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

inline __m512 load_bf16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, p));
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), "vitlab layer_norm: ", name,
              " must be a contiguous ", dtype, " CPU tensor, got ", t.scalar_type(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

// y = bf16(layer_norm(x) * weight + bias) over the last dimension; also returns the rows' mean and 1/std (fp32).
std::vector<at::Tensor> layer_norm_bf16_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                double eps) {
  check(x, "x", at::kFloat);
  check(weight, "weight", at::kFloat);
  check(bias, "bias", at::kFloat);
  const int64_t D = x.size(-1), M = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(D > 0 && weight.numel() == D && bias.numel() == D, "vitlab layer_norm: weight and bias must have ",
              D, " values (x's last dimension), got ", weight.numel(), " and ", bias.numel());
  auto y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  auto mean = at::empty({M}, x.options()), rstd = at::empty({M}, x.options());
  const float *xp = x.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(), *b = bias.const_data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * D;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < D; j += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(tail_mask(D - j), row + j));
      const float mu = _mm512_reduce_add_ps(sum) / D;
      const __m512 vmu = _mm512_set1_ps(mu);
      __m512 sq = _mm512_setzero_ps();
      for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 m = tail_mask(D - j);
        const __m512 c = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, row + j), vmu);
        sq = _mm512_fmadd_ps(c, c, sq);
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(sq) / D + static_cast<float>(eps));
      mp[r] = mu;
      rp[r] = inv;
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 m = tail_mask(D - j);
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vmu), vinv);
        const __m512 out = _mm512_fmadd_ps(xhat, _mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, b + j));
        _mm256_mask_storeu_epi16(yp + r * D + j, m, (__m256i)_mm512_cvtneps_pbh(out));
      }
    }
  });
  return {y, mean, rstd};
}

// (dx fp32, dweight, dbias) from dy (bf16) and the forward's x, weight, mean, rstd:
// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy weight, xhat = (x - mean) rstd;
// dweight = sum over rows of dy xhat, dbias = sum over rows of dy (per-thread partial sums, added at the end).
std::vector<at::Tensor> layer_norm_bf16_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& mean, const at::Tensor& rstd) {
  check(dy, "grad_output", at::kBFloat16);
  check(x, "x", at::kFloat);
  check(weight, "weight", at::kFloat);
  TORCH_CHECK(dy.sizes() == x.sizes(), "vitlab layer_norm: grad_output has shape ", dy.sizes(), ", expected ",
              x.sizes());
  const int64_t D = x.size(-1), M = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(mean.numel() == M && rstd.numel() == M, "vitlab layer_norm: mean and rstd must have ", M, " values");
  auto dx = at::empty_like(x);
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  auto partial = at::zeros({T, 2, D}, x.options());  // per chunk: dweight, dbias
  const float *xp = x.const_data_ptr<float>(), *w = weight.const_data_ptr<float>();
  const float *mp = mean.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
  const at::BFloat16* dyp = dy.const_data_ptr<at::BFloat16>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      float *dw = pp + t * 2 * D, *db = dw + D;
      for (int64_t r = t * M / T; r < (t + 1) * M / T; ++r) {
        const float* row = xp + r * D;
        const at::BFloat16* grow = dyp + r * D;
        const __m512 vmu = _mm512_set1_ps(mp[r]), vinv = _mm512_set1_ps(rp[r]);
        __m512 sg = _mm512_setzero_ps(), sgx = _mm512_setzero_ps();
        for (int64_t j = 0; j < D; j += 16) {
          const __mmask16 m = tail_mask(D - j);
          const __m512 xhat = _mm512_maskz_mul_ps(m, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vmu), vinv);
          const __m512 g = load_bf16(grow + j, m);
          _mm512_mask_storeu_ps(dw + j, m, _mm512_fmadd_ps(g, xhat, _mm512_maskz_loadu_ps(m, dw + j)));
          _mm512_mask_storeu_ps(db + j, m, _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, db + j)));
          const __m512 gw = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + j));
          sg = _mm512_add_ps(sg, gw);
          sgx = _mm512_fmadd_ps(gw, xhat, sgx);
        }
        const __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(sg) / D);
        const __m512 c = _mm512_set1_ps(_mm512_reduce_add_ps(sgx) / D);
        for (int64_t j = 0; j < D; j += 16) {
          const __mmask16 m = tail_mask(D - j);
          const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vmu), vinv);
          const __m512 gw = _mm512_mul_ps(load_bf16(grow + j, m), _mm512_maskz_loadu_ps(m, w + j));
          // rstd * (gw - mean(gw) - xhat * mean(gw * xhat))
          const __m512 d = _mm512_mul_ps(vinv, _mm512_sub_ps(_mm512_sub_ps(gw, a), _mm512_mul_ps(xhat, c)));
          _mm512_mask_storeu_ps(dxp + r * D + j, m, d);
        }
      }
    }
  });
  auto sums = partial.sum(0);  // 2, D
  return {dx, sums[0], sums[1]};
}

}  // namespace vitlab
