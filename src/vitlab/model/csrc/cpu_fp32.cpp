// fp32 kernels for CPUs without native bf16 (AVX2 + FMA: Intel before Sapphire Rapids, AMD Zen 2/3), where vitlab
// computes in fp32: the tanh-approximation GELU and its gradient, bias + GELU in place on a matmul's output
// (inference), the Dense layers' bias joined to GELU or to drop-path and the residual add (training, forward and
// backward), each in one pass, and softmax attention for short sequences.
//
// Why they exist: PyTorch's CPU tanh GELU runs at about a third of the speed of its erf GELU, and nn.Linear followed
// by GELU passes over the MLP's hidden activations three times (bias copied into the output, matmul, GELU) where
// the matmul alone plus this one pass will do. Written with ATen's Vectorized<float> and compiled with
// -DCPU_CAPABILITY_AVX2 -mavx2 -mfma, so it is 8 floats a vector. The tanh form uses 0.5 (1 + tanh(u / 2)) =
// sigmoid(u): gelu(x) = x sigmoid(u), u = 2 sqrt(2 / pi) (x + 0.044715 x^3), one exp per value.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr float kAlpha = 2.f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
constexpr float kBeta = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr int64_t kGrain = 1 << 14;  // values per parallel chunk
constexpr int64_t V = fVec::size();   // floats per vector: 8

// sigmoid(u) for u = 2 sqrt(2 / pi) (x + 0.044715 x^3); also du/dx when `du` is given.
inline fVec sigmoid_u(const fVec& x, fVec* du) {
  const fVec x2 = x * x, one(1.f);
  const fVec u = x * at::vec::fmadd(x2, fVec(kAlpha * kBeta), fVec(kAlpha));
  if (du) *du = at::vec::fmadd(x2, fVec(3.f * kAlpha * kBeta), fVec(kAlpha));
  // exp(-u) overflows to inf for u < -88: the sigmoid is then 0, as it should be.
  return one / (one + (fVec(0.f) - u).exp_u20());
}

inline fVec gelu_tanh(const fVec& x) { return x * sigmoid_u(x, nullptr); }
inline fVec gelu_erf(const fVec& x) { return x * fVec(0.5f) * (fVec(1.f) + (x * fVec(kInvSqrt2)).erf()); }

// y = f(x) over n values, vector by vector, the tail with a partial load and store.
template <typename F>
void map(const float* x, float* y, int64_t n, const F& f) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V <= end; i += V) f(fVec::loadu(x + i)).store(y + i);
    if (i < end) f(fVec::loadu(x + i, end - i)).store(y + i, end - i);
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "vitlab fp32 kernels: ",
              name, " must be a contiguous fp32 CPU tensor, got ", t.scalar_type(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

at::Tensor gelu_tanh_forward(const at::Tensor& x) {
  check(x, "x");
  auto y = at::empty_like(x);
  map(x.const_data_ptr<float>(), y.data_ptr<float>(), x.numel(), gelu_tanh);
  return y;
}

// d gelu / dx = s + x s (1 - s) du/dx, with s = sigmoid(u).
at::Tensor gelu_tanh_backward(const at::Tensor& dy, const at::Tensor& x) {
  check(x, "x");
  check(dy, "grad_output");
  TORCH_CHECK(dy.sizes() == x.sizes(), "vitlab gelu_tanh: grad_output ", dy.sizes(), " does not match x ", x.sizes());
  auto dx = at::empty_like(x);
  const float* xp = x.const_data_ptr<float>();
  const float* gp = dy.const_data_ptr<float>();
  float* out = dx.data_ptr<float>();
  auto slope_times = [](const fVec& xv, const fVec& g) {
    fVec du;
    const fVec s = sigmoid_u(xv, &du);
    return g * at::vec::fmadd(xv * s * (fVec(1.f) - s), du, s);
  };
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V <= end; i += V) slope_times(fVec::loadu(xp + i), fVec::loadu(gp + i)).store(out + i);
    if (i < end) slope_times(fVec::loadu(xp + i, end - i), fVec::loadu(gp + i, end - i)).store(out + i, end - i);
  });
  return dx;
}

namespace {

inline fVec gelu_any(const fVec& x, bool tanh_form) { return tanh_form ? gelu_tanh(x) : gelu_erf(x); }

// d gelu / dx at x: tanh form s + x s (1 - s) du/dx; erf form Phi(x) + x phi(x).
inline fVec gelu_slope(const fVec& x, bool tanh_form) {
  if (tanh_form) {
    fVec du;
    const fVec s = sigmoid_u(x, &du);
    return at::vec::fmadd(x * s * (fVec(1.f) - s), du, s);
  }
  const fVec cdf = fVec(0.5f) * (fVec(1.f) + (x * fVec(kInvSqrt2)).erf());
  const fVec pdf = (x * x * fVec(-0.5f)).exp() * fVec(0.3989422804014327f);
  return at::vec::fmadd(x, pdf, cdf);
}

bool tanh_of(const std::string& approximate, const char* fn) {
  TORCH_CHECK(approximate == "tanh" || approximate == "none", "vitlab ", fn, ": approximate must be 'tanh' or ",
              "'none', got '", approximate, "'");
  return approximate == "tanh";
}

void check_rows(const at::Tensor& t, const at::Tensor& bias, const char* fn, const char* name) {
  check(t, name);
  check(bias, "bias");
  TORCH_CHECK(t.dim() >= 2 && bias.dim() == 1 && bias.size(0) == t.size(-1), "vitlab ", fn, ": ", name,
              " must be (..., N) with bias (N), got ", t.sizes(), " and ", bias.sizes());
}

// h = gelu(z + bias) row by row for (M, N) z and h (the same buffer for in place), bias (N).
void bias_gelu_rows(const float* zp, float* hp, const float* bp, int64_t M, int64_t N, bool tanh_form) {
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* zr = zp + r * N;
      float* hr = hp + r * N;
      int64_t j = 0;
      for (; j + V <= N; j += V) gelu_any(fVec::loadu(zr + j) + fVec::loadu(bp + j), tanh_form).store(hr + j);
      if (j < N)
        gelu_any(fVec::loadu(zr + j, N - j) + fVec::loadu(bp + j, N - j), tanh_form).store(hr + j, N - j);
    }
  });
}

}  // namespace

// h <- gelu(h + bias) in place, h (M, N) contiguous, bias (N); approximate "tanh" or "none" (erf).
at::Tensor bias_gelu_(at::Tensor h, const at::Tensor& bias, const std::string& approximate) {
  check(h, "h");
  check(bias, "bias");
  TORCH_CHECK(h.dim() == 2 && bias.dim() == 1 && bias.size(0) == h.size(1), "vitlab bias_gelu_: h must be (M, N) ",
              "and bias (N), got ", h.sizes(), " and ", bias.sizes());
  const bool tanh_form = tanh_of(approximate, "bias_gelu_");
  bias_gelu_rows(h.data_ptr<float>(), h.data_ptr<float>(), bias.const_data_ptr<float>(), h.size(0), h.size(1),
                 tanh_form);
  return h;
}

// ------------------------------------------------------------------------------------- training epilogues
// A Dense layer's bias and what follows it, in one pass over the matmul's output instead of three: nn.Linear
// copies the bias into its output before the matmul, then GELU (fc1), or drop-path's scaling and the residual
// add (proj, fc2), each pass over the activations again. Their backward passes also compute the bias gradient
// (the column sums) in the same pass: each thread accumulates its rows into its own row of a (threads, N) buffer,
// summed at the end. At the CIFAR model's shapes those passes were about 15% of an fp32 step (torch.profiler, 32 px).

// h = gelu(z + bias) for z (..., N), a new tensor; z is left as it is (the backward reads it).
at::Tensor bias_gelu_forward(const at::Tensor& z, const at::Tensor& bias, const std::string& approximate) {
  check_rows(z, bias, "bias_gelu_forward", "z");
  const bool tanh_form = tanh_of(approximate, "bias_gelu_forward");
  auto h = at::empty_like(z);
  const int64_t N = z.size(-1);
  bias_gelu_rows(z.const_data_ptr<float>(), h.data_ptr<float>(), bias.const_data_ptr<float>(), z.numel() / N, N,
                 tanh_form);
  return h;
}

// (dz, dbias) of bias_gelu_forward: dz = g gelu'(z + bias), dbias = column sums of dz.
std::vector<at::Tensor> bias_gelu_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& bias,
                                           const std::string& approximate) {
  check_rows(z, bias, "bias_gelu_backward", "z");
  check(g, "grad_output");
  TORCH_CHECK(g.sizes() == z.sizes(), "vitlab bias_gelu_backward: grad_output ", g.sizes(), " does not match z ",
              z.sizes());
  const bool tanh_form = tanh_of(approximate, "bias_gelu_backward");
  auto dz = at::empty_like(z);
  const int64_t N = z.size(-1), M = z.numel() / N;
  TORCH_CHECK(N % V == 0, "vitlab bias_gelu_backward: the last dimension must be a multiple of ", V, ", got ", N);
  auto partial = at::zeros({at::get_num_threads(), N}, z.options());
  const float* zp = z.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  float* dp = dz.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / N), [&](int64_t begin, int64_t end) {
    float* acc = pp + at::get_thread_num() * N;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < N; j += V) {
        const fVec d = fVec::loadu(gp + r * N + j) * gelu_slope(fVec::loadu(zp + r * N + j) + fVec::loadu(bp + j),
                                                                 tanh_form);
        d.store(dp + r * N + j);
        (fVec::loadu(acc + j) + d).store(acc + j);
      }
    }
  });
  return {dz, partial.sum(0)};
}

namespace {

// The per-sample drop-path scale of (B, R, N) activations, or none: a (B,) fp32 tensor.
const float* mask_of(const c10::optional<at::Tensor>& mask, int64_t B, const char* fn) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  check(*mask, "mask");
  TORCH_CHECK(mask->numel() == B, "vitlab ", fn, ": mask must hold one scale per sample (", B, "), got ",
              mask->sizes());
  return mask->const_data_ptr<float>();
}

}  // namespace

// out = x + mask[b] (y + bias) for x, y (B, ..., N): the residual add of a drop-path-scaled Dense branch; mask is
// (B,) or None (no drop path).
at::Tensor bias_residual_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bias,
                                 const c10::optional<at::Tensor>& mask) {
  check_rows(y, bias, "bias_residual_forward", "y");
  check(x, "x");
  TORCH_CHECK(x.sizes() == y.sizes(), "vitlab bias_residual_forward: x ", x.sizes(), " does not match y ", y.sizes());
  const int64_t B = x.size(0), N = x.size(-1), M = x.numel() / N, R = M / B;
  const float* m = mask_of(mask, B, "bias_residual_forward");
  auto out = at::empty_like(x);
  const float* xp = x.const_data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const fVec scale(m ? m[r / R] : 1.f);
      const float *xr = xp + r * N, *yr = yp + r * N;
      float* orow = op + r * N;
      int64_t j = 0;
      for (; j + V <= N; j += V)
        at::vec::fmadd(scale, fVec::loadu(yr + j) + fVec::loadu(bp + j), fVec::loadu(xr + j)).store(orow + j);
      if (j < N)
        at::vec::fmadd(scale, fVec::loadu(yr + j, N - j) + fVec::loadu(bp + j, N - j), fVec::loadu(xr + j, N - j))
            .store(orow + j, N - j);
    }
  });
  return out;
}

// (dy, dbias) of bias_residual_forward for the gradient g of out: dy = mask[b] g (g itself without a mask),
// dbias = column sums of dy. (dx is g.)
std::vector<at::Tensor> bias_residual_backward(const at::Tensor& g, const c10::optional<at::Tensor>& mask) {
  check(g, "grad_output");
  TORCH_CHECK(g.dim() >= 2, "vitlab bias_residual_backward: grad_output must be (B, ..., N), got ", g.sizes());
  const int64_t B = g.size(0), N = g.size(-1), M = g.numel() / N, R = M / B;
  TORCH_CHECK(N % V == 0, "vitlab bias_residual_backward: the last dimension must be a multiple of ", V, ", got ", N);
  const float* m = mask_of(mask, B, "bias_residual_backward");
  at::Tensor dy = m ? at::empty_like(g) : g;
  auto partial = at::zeros({at::get_num_threads(), N}, g.options());
  const float* gp = g.const_data_ptr<float>();
  float* dp = m ? dy.data_ptr<float>() : nullptr;
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / N), [&](int64_t begin, int64_t end) {
    float* acc = pp + at::get_thread_num() * N;
    for (int64_t r = begin; r < end; ++r) {
      const fVec scale(m ? m[r / R] : 1.f);
      for (int64_t j = 0; j < N; j += V) {
        fVec d = fVec::loadu(gp + r * N + j);
        if (m) {
          d = d * scale;
          d.store(dp + r * N + j);
        }
        (fVec::loadu(acc + j) + d).store(acc + j);
      }
    }
  });
  return {dy, partial.sum(0)};
}

// ---------------------------------------------------------------------------------------------------- attention
// softmax(scale q k^T) v for the qkv projection's output (B, N, 3, H, hd), one (sample, head) at a time with its
// (N, N) matrices in cache, the matmuls as register-blocked FMA loops: SDPA's CPU kernel runs these short sequences
// (64 tokens, head dim 32: the CIFAR model) far below the matmul rate. The output is written in the (B, N, H, hd)
// layout the output projection reads; the backward recomputes the probabilities (nothing but qkv is saved) and
// returns one gradient in qkv's layout (separate dq, dk, dv would be stacked again by autograd).
namespace {

struct Mat {  // a row-major view: element (i, j) at p[i * ld + j]
  float* p;
  int64_t ld;
  float* operator[](int64_t i) const { return p + i * ld; }
};
struct CMat {
  const float* p;
  int64_t ld;
  const float* operator[](int64_t i) const { return p + i * ld; }
};

// C (M, Np) = A (M, K) B (K, Np), Np a multiple of V; rows of 4 by columns of 2 vectors in registers.
void mm_nn_wide(CMat A, CMat B, Mat C, int64_t M, int64_t K, int64_t Np) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    int64_t j = 0;
    for (; j + 2 * V <= Np; j += 2 * V) {
      fVec acc[4][2] = {};
      for (int64_t k = 0; k < K; ++k) {
        const fVec b0 = fVec::loadu(B[k] + j), b1 = fVec::loadu(B[k] + j + V);
        for (int r = 0; r < 4; ++r) {
          const fVec a(A[i + r][k]);
          acc[r][0] = at::vec::fmadd(a, b0, acc[r][0]);
          acc[r][1] = at::vec::fmadd(a, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        acc[r][0].store(C[i + r] + j);
        acc[r][1].store(C[i + r] + j + V);
      }
    }
    for (; j < Np; j += V) {
      fVec acc[4] = {};
      for (int64_t k = 0; k < K; ++k) {
        const fVec b0 = fVec::loadu(B[k] + j);
        for (int r = 0; r < 4; ++r) acc[r] = at::vec::fmadd(fVec(A[i + r][k]), b0, acc[r]);
      }
      for (int r = 0; r < 4; ++r) acc[r].store(C[i + r] + j);
    }
  }
  for (; i < M; ++i) {
    for (int64_t j = 0; j < Np; j += V) {
      fVec acc(0.f);
      for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(fVec(A[i][k]), fVec::loadu(B[k] + j), acc);
      acc.store(C[i] + j);
    }
  }
}

template <bool TransA>
inline float at_(CMat A, int64_t i, int64_t k) { return TransA ? A[k][i] : A[i][k]; }

// C (M, Nc) = op(A) (M, K) B (K, Nc) for a narrow Nc (a head dimension, a multiple of V), op(A) = A or A^T (then A
// is stored (K, M)): rows of 2 by 4 vectors in registers.
template <bool TransA>
void mm_nn_narrow(CMat A, CMat B, Mat C, int64_t M, int64_t K, int64_t Nc) {
  int64_t i = 0;
  for (; i + 2 <= M; i += 2) {
    int64_t j = 0;
    for (; j + 4 * V <= Nc; j += 4 * V) {
      fVec acc[2][4] = {};
      for (int64_t k = 0; k < K; ++k) {
        const fVec a0(at_<TransA>(A, i, k)), a1(at_<TransA>(A, i + 1, k));
        for (int c = 0; c < 4; ++c) {
          const fVec b = fVec::loadu(B[k] + j + c * V);
          acc[0][c] = at::vec::fmadd(a0, b, acc[0][c]);
          acc[1][c] = at::vec::fmadd(a1, b, acc[1][c]);
        }
      }
      for (int c = 0; c < 4; ++c) {
        acc[0][c].store(C[i] + j + c * V);
        acc[1][c].store(C[i + 1] + j + c * V);
      }
    }
    for (; j < Nc; j += V) {
      fVec acc0(0.f), acc1(0.f);
      for (int64_t k = 0; k < K; ++k) {
        const fVec b = fVec::loadu(B[k] + j);
        acc0 = at::vec::fmadd(fVec(at_<TransA>(A, i, k)), b, acc0);
        acc1 = at::vec::fmadd(fVec(at_<TransA>(A, i + 1, k)), b, acc1);
      }
      acc0.store(C[i] + j);
      acc1.store(C[i + 1] + j);
    }
  }
  for (; i < M; ++i) {
    for (int64_t j = 0; j < Nc; j += V) {
      fVec acc(0.f);
      for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(fVec(at_<TransA>(A, i, k)), fVec::loadu(B[k] + j), acc);
      acc.store(C[i] + j);
    }
  }
}

// dst (cols, rows_ld) <- src (rows, cols) transposed; columns rows..ld of dst zeroed.
void transpose(CMat src, int64_t rows, int64_t cols, Mat dst, int64_t padded_rows) {
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst[c];
    for (int64_t r = 0; r < rows; ++r) d[r] = src[r][c];
    for (int64_t r = rows; r < padded_rows; ++r) d[r] = 0.f;
  }
}

// Each row of S (N, Np) <- softmax(scale S) over its first N entries, zero in the padding.
void softmax_rows(Mat S, int64_t N, int64_t Np, float scale) {
  for (int64_t i = 0; i < N; ++i) {
    float* s = S[i];
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < N; ++j) m = std::max(m, s[j]);
    const fVec ms(m * scale), sc(scale);
    fVec sum(0.f);
    for (int64_t j = 0; j < Np; j += V) {
      fVec e = at::vec::fmsub(fVec::loadu(s + j), sc, ms).exp_u20();
      if (j + V > N) {  // the padding columns of the last vector
        alignas(64) float tmp[V];
        e.store(tmp);
        for (int64_t t = N - j; t < V; ++t) tmp[t] = 0.f;
        e = fVec::loadu(tmp);
      }
      e.store(s + j);
      sum = sum + e;
    }
    const fVec inv(1.f / at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, sum));
    for (int64_t j = 0; j < Np; j += V) (fVec::loadu(s + j) * inv).store(s + j);
  }
}

struct Dims {
  int64_t B, N, H, hd, Np;  // Np: N rounded up to whole vectors
  int64_t sb, sn, s3, sh;   // qkv strides (elements)
};

Dims dims_of(const at::Tensor& qkv) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 5 && qkv.size(2) == 3 &&
                  qkv.stride(4) == 1,
              "vitlab attention: qkv must be an fp32 CPU tensor (B, N, 3, H, hd) with a dense last dimension, got ",
              qkv.scalar_type(), " ", qkv.sizes(), " strides ", qkv.strides());
  TORCH_CHECK(qkv.size(4) % V == 0, "vitlab attention: the head dimension must be a multiple of ", V, ", got ",
              qkv.size(4));
  const int64_t N = qkv.size(1);
  return {qkv.size(0), N, qkv.size(3), qkv.size(4), (N + V - 1) / V * V,
          qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3)};
}

// q, k or v (which = 0, 1, 2) of sample b, head h as an (N, hd) view.
inline CMat part(const float* base, const Dims& d, int64_t b, int64_t which, int64_t h) {
  return {base + b * d.sb + which * d.s3 + h * d.sh, d.sn};
}

}  // namespace

// With `save_probs`, the probabilities are also returned, (B, H, N, Np) with zero padding columns, so that the
// backward need not recompute them: the recomputation (q k^T and the softmax again) was about a third of the
// backward's time at the CIFAR model's shapes. They cost B H N Np floats per block (8 MB for a batch of 128 at
// 64 tokens, 4 heads).
std::vector<at::Tensor> attention_forward_impl(const at::Tensor& qkv, double scale, bool save_probs) {
  const Dims d = dims_of(qkv);
  auto out = at::empty({d.B, d.N, d.H, d.hd}, qkv.options());  // B, N, H, hd
  at::Tensor probs = save_probs ? at::empty({d.B, d.H, d.N, d.Np}, qkv.options()) : at::Tensor();
  const float* base = qkv.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* pb = save_probs ? probs.data_ptr<float>() : nullptr;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(d.hd * d.Np), local(save_probs ? 0 : d.N * d.Np);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.H, h = task % d.H;
      float* s = save_probs ? pb + task * d.N * d.Np : local.data();
      transpose(part(base, d, b, 1, h), d.N, d.hd, {kt.data(), d.Np}, d.Np);  // hd, Np
      mm_nn_wide(part(base, d, b, 0, h), {kt.data(), d.Np}, {s, d.Np}, d.N, d.hd, d.Np);  // N, Np
      softmax_rows({s, d.Np}, d.N, d.Np, static_cast<float>(scale));
      mm_nn_narrow<false>({s, d.Np}, part(base, d, b, 2, h), {o + (b * d.N * d.H + h) * d.hd, d.H * d.hd}, d.N,
                   d.N, d.hd);
    }
  });
  if (save_probs) return {out, probs};
  return {out};
}

at::Tensor attention_forward(const at::Tensor& qkv, double scale) { return attention_forward_impl(qkv, scale, false)[0]; }

std::vector<at::Tensor> attention_forward_probs(const at::Tensor& qkv, double scale) {
  return attention_forward_impl(qkv, scale, true);
}

// dS = P o (dP - rowsum(P o dP)) with dP = dO V^T; dq = scale dS k, dk = scale dS^T q, dv = P^T dO. P is
// recomputed from qkv, or read from `saved_probs` (attention_forward_probs's second result).
at::Tensor attention_backward(const at::Tensor& qkv, const at::Tensor& dout, double scale,
                              const c10::optional<at::Tensor>& saved_probs) {
  const Dims d = dims_of(qkv);
  const bool saved = saved_probs.has_value() && saved_probs->defined();
  if (saved) {
    const at::Tensor& sp = *saved_probs;
    TORCH_CHECK(sp.scalar_type() == at::kFloat && sp.is_contiguous() && sp.dim() == 4 && sp.size(0) == d.B &&
                    sp.size(1) == d.H && sp.size(2) == d.N && sp.size(3) == d.Np,
                "vitlab attention: saved probabilities must be contiguous fp32 (", d.B, ", ", d.H, ", ", d.N, ", ",
                d.Np, "), got ", sp.scalar_type(), " ", sp.sizes());
  }
  const float* sp_base = saved ? saved_probs->const_data_ptr<float>() : nullptr;
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.dim() == 4 && dout.size(0) == d.B && dout.size(1) == d.H &&
                  dout.size(2) == d.N && dout.size(3) == d.hd && dout.stride(3) == 1,
              "vitlab attention: grad_output must be fp32 (B, H, N, hd) with a dense last dimension, got ",
              dout.sizes(), " strides ", dout.strides());
  auto dqkv = at::empty({d.B, d.N, 3, d.H, d.hd}, qkv.options());
  const Dims g{d.B, d.N, d.H, d.hd, d.Np, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2), dqkv.stride(3)};
  const float* base = qkv.const_data_ptr<float>();
  const float* dob = dout.const_data_ptr<float>();
  float* gb = dqkv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(saved ? 0 : d.hd * d.Np), vt(d.hd * d.Np), p_local(saved ? 0 : d.N * d.Np), dp(d.N * d.Np);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.H, h = task % d.H;
      const CMat q = part(base, d, b, 0, h), k = part(base, d, b, 1, h), v = part(base, d, b, 2, h);
      const CMat go{dob + b * dout.stride(0) + h * dout.stride(1), dout.stride(2)};
      auto grad = [&](int64_t which) { return Mat{gb + b * g.sb + which * g.s3 + h * g.sh, g.sn}; };
      const float* pp = saved ? sp_base + task * d.N * d.Np : p_local.data();
      if (!saved) {
        transpose(k, d.N, d.hd, {kt.data(), d.Np}, d.Np);
        mm_nn_wide(q, {kt.data(), d.Np}, {p_local.data(), d.Np}, d.N, d.hd, d.Np);  // logits
        softmax_rows({p_local.data(), d.Np}, d.N, d.Np, sc);                      // P
      }
      transpose(v, d.N, d.hd, {vt.data(), d.Np}, d.Np);
      mm_nn_wide(go, {vt.data(), d.Np}, {dp.data(), d.Np}, d.N, d.hd, d.Np);  // dP = dO V^T
      for (int64_t i = 0; i < d.N; ++i) {  // dP <- scale dS
        const float* pi = pp + i * d.Np;
        float* di = dp.data() + i * d.Np;
        fVec acc(0.f);
        for (int64_t j = 0; j < d.Np; j += V) acc = at::vec::fmadd(fVec::loadu(pi + j), fVec::loadu(di + j), acc);
        const fVec D(at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc)), s(sc);
        for (int64_t j = 0; j < d.Np; j += V)
          (fVec::loadu(pi + j) * (fVec::loadu(di + j) - D) * s).store(di + j);
      }
      mm_nn_narrow<false>({dp.data(), d.Np}, k, grad(0), d.N, d.N, d.hd);  // dq = scale dS k
      mm_nn_narrow<true>({dp.data(), d.Np}, q, grad(1), d.N, d.N, d.hd);   // dk = scale dS^T q
      mm_nn_narrow<true>({pp, d.Np}, go, grad(2), d.N, d.N, d.hd);         // dv = P^T dO
    }
  });
  return dqkv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gelu_tanh_forward", &gelu_tanh_forward, "tanh-approximation GELU of a contiguous fp32 CPU tensor");
  m.def("gelu_tanh_backward", &gelu_tanh_backward, "gradient of gelu_tanh_forward: (grad_output, x)");
  m.def("attention_forward", &attention_forward,
        "softmax(scale q k^T) v of fp32 qkv (B, N, 3, H, hd), returned as (B, N, H, hd)");
  m.def("attention_forward_probs", &attention_forward_probs,
        "attention_forward's output and its probabilities (B, H, N, N rounded up to 8, zero padding)");
  m.def("attention_backward", &attention_backward, "(dq, dk, dv) of attention_forward as one (B, N, 3, H, hd) tensor",
        py::arg("qkv"), py::arg("dout"), py::arg("scale"), py::arg("saved_probs") = py::none());
  m.def("bias_gelu_forward", &bias_gelu_forward, "gelu(z + bias) for fp32 (..., N) z, a new tensor",
        py::arg("z"), py::arg("bias"), py::arg("approximate"));
  m.def("bias_gelu_backward", &bias_gelu_backward, "(dz, dbias) of bias_gelu_forward: (grad_output, z, bias, approximate)");
  m.def("bias_residual_forward", &bias_residual_forward, "x + mask[b] (y + bias) for fp32 (B, ..., N) x and y",
        py::arg("x"), py::arg("y"), py::arg("bias"), py::arg("mask") = py::none());
  m.def("bias_residual_backward", &bias_residual_backward, "(dy, dbias) of bias_residual_forward for grad_output g",
        py::arg("grad_output"), py::arg("mask") = py::none());
  m.def("bias_gelu_", &bias_gelu_, "h <- gelu(h + bias) in place for fp32 (M, N) h; approximate 'tanh' or 'none'");
}
