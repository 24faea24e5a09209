// Softmax attention for bf16 on CPUs with AVX512-BF16, one (sample, head) at a time: softmax(scale q k^T) v and
// its gradient.
//
// Why it exists: at ViT sequence lengths (<= 256 tokens) PyTorch's CPU flash-attention kernel runs well below the
// matmul rate, and the same function built from torch ops pays for fp32 copies of q and k (torch has no CPU bf16
// matmul with an fp32 result; ATen's internal one runs at the fp32 rate without AMX), a separate softmax pass, a
// cast pass and a layout copy. Here every matmul of a (sample, head) is a small register-tiled loop over
// vdpbf16ps (bf16 pair products accumulated in fp32 lanes, the instruction oneDNN's bf16 kernels use), so the
// logits come out in fp32 at the bf16 rate; the softmax reads and writes the (N, N) block while it is in cache, the
// output is written straight into the (B, N, H, hd) layout the output projection reads, and the gradients into the
// (B, N, 3, H, hd) layout of the qkv projection. No operand is transposed element by element: the two backward
// products with a transposed (N, N) operand read its row-pair packing as its transpose.
//
// This file also holds the module's bindings, for cpu_gelu.cpp and cpu_layer_norm.cpp as well.
//
// Precision is that of PyTorch's fused kernel and of vitlab's torch-op path: logits, softmax and its gradient in
// fp32, probabilities and their gradient rounded to bf16 (nearest even) once for the matmuls, fp32 accumulation.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <limits>
#include <vector>

#if !defined(__AVX512BF16__)
#error "vitlab's CPU kernels are built with -mavx512bf16, on CPUs that have it"
#endif

namespace {

using at::BFloat16;
using fVec = at::vec::Vectorized<float>;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------- matmul
// B operands are packed as 32-bit (k, k+1) pairs, B[p][j] = (b[2p][j], b[2p+1][j]), the layout vdpbf16ps reads.
// A operands are read pair by pair: pair p of row r is the 32-bit word a[r * a_row + p * a_pair]. A bf16 row
// whose consecutive elements form the pairs has (a_row, a_pair) = (row stride / 2, 1); a matrix packed by row
// pairs, read as its own transpose, has (1, row stride): that is how P^T dO and dS^T q run without transposing.
using Pair = uint32_t __attribute__((__may_alias__));  // pairs are read from bf16 buffers

// C (R x 16 C, fp32, row stride ldc) = A (R rows of kp pairs) x B (kp x 16 C pairs, row stride ldb)
template <int R, int C>
inline void dot_tile(const Pair* a, int64_t a_row, int64_t a_pair, const uint32_t* b, int64_t ldb, int64_t kp,
                     float* c, int64_t ldc) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < C; ++x) acc[r][x] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh bv[C];
    for (int x = 0; x < C; ++x) bv[x] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16 * x);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_row + p * a_pair]));
      for (int x = 0; x < C; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], av, bv[x]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < C; ++x) _mm512_storeu_ps(c + r * ldc + 16 * x, acc[r][x]);
}

template <int R>
inline void dot_rows(const Pair* a, int64_t a_row, int64_t a_pair, const uint32_t* b, int64_t ldb, int64_t kp,
                     int64_t vectors, float* c, int64_t ldc) {
  int64_t x = 0;
  for (; x + 4 <= vectors; x += 4) dot_tile<R, 4>(a, a_row, a_pair, b + 16 * x, ldb, kp, c + 16 * x, ldc);
  switch (vectors - x) {
    case 3: dot_tile<R, 3>(a, a_row, a_pair, b + 16 * x, ldb, kp, c + 16 * x, ldc); break;
    case 2: dot_tile<R, 2>(a, a_row, a_pair, b + 16 * x, ldb, kp, c + 16 * x, ldc); break;
    case 1: dot_tile<R, 1>(a, a_row, a_pair, b + 16 * x, ldb, kp, c + 16 * x, ldc); break;
    default: break;
  }
}

// C (m x 16 vectors, fp32, row stride ldc) = A (m rows of kp pairs, strides a_row, a_pair) x B (kp x 16 vectors)
void pair_matmul(int64_t m, int64_t kp, int64_t vectors, const Pair* a, int64_t a_row, int64_t a_pair,
                 const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) dot_rows<4>(a + i * a_row, a_row, a_pair, b, ldb, kp, vectors, c + i * ldc, ldc);
  const Pair* at = a + i * a_row;
  switch (m - i) {
    case 3: dot_rows<3>(at, a_row, a_pair, b, ldb, kp, vectors, c + i * ldc, ldc); break;
    case 2: dot_rows<2>(at, a_row, a_pair, b, ldb, kp, vectors, c + i * ldc, ldc); break;
    case 1: dot_rows<1>(at, a_row, a_pair, b, ldb, kp, vectors, c + i * ldc, ldc); break;
    default: break;
  }
}

// The same with A given as bf16 rows (row stride lda, even) whose consecutive elements form the pairs.
inline void row_matmul(int64_t m, int64_t kp, int64_t vectors, const BFloat16* a, int64_t lda, const uint32_t* b,
                       int64_t ldb, float* c, int64_t ldc) {
  pair_matmul(m, kp, vectors, reinterpret_cast<const Pair*>(a), lda / 2, 1, b, ldb, c, ldc);
}

// ---------------------------------------------------------------------------------------------------- packing
// dst[p][j] = (y[j][2p], y[j][2p+1]) for y (n x d, row stride ld, both even), columns n..np-1 zero (np a multiple
// of 16): the transpose of y read as 32-bit pairs, gathered 16 rows at a time. Packs k (v) so that q k^T (dO v^T)
// is a pair_matmul.
void pack_transposed_pairs(const BFloat16* y, int64_t ld, int64_t n, int64_t d, int64_t np, uint32_t* dst) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(ld / 2)));
  for (int64_t j = 0; j < np; j += 16) {
    const __mmask16 live = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const BFloat16* base = y + j * ld;
    for (int64_t p = 0; p < d / 2; ++p)
      _mm512_storeu_si512(dst + p * np + j,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, base + 2 * p, 4));
  }
}

inline __m512i interleave(__m256i lo, __m256i hi) {  // 16 pairs (lo[c], hi[c]) from two rows of 16 bf16
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

// dst[m][c] = (y[2m][c], y[2m+1][c]) for the first `cols` (a multiple of 16) columns of y (n rows, row stride ld,
// bf16 or fp32 rounded to bf16); a missing last row (n odd) is zero. Packs v (k, q, P, dS) as a B operand.
void pack_row_pairs(const BFloat16* y, int64_t ld, int64_t n, int64_t cols, uint32_t* dst, int64_t ldd) {
  for (int64_t m = 0; m < (n + 1) / 2; ++m) {
    const BFloat16* r0 = y + 2 * m * ld;
    const BFloat16* r1 = 2 * m + 1 < n ? r0 + ld : nullptr;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
      const __m256i hi = r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + m * ldd + c, interleave(lo, hi));
    }
  }
}

void pack_row_pairs(const float* y, int64_t ld, int64_t n, int64_t cols, uint32_t* dst, int64_t ldd) {
  for (int64_t m = 0; m < (n + 1) / 2; ++m) {
    const float* r0 = y + 2 * m * ld;
    const float* r1 = 2 * m + 1 < n ? r0 + ld : nullptr;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + c));
      const __m256i hi = r1 ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r1 + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + m * ldd + c, interleave(lo, hi));
    }
  }
}

// Rows of dst (row stride ldd) = src (rows x cols, row stride lds) rounded to bf16.
inline void store_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, BFloat16* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i) at::vec::convert(src + i * lds, dst + i * ldd, cols);
}

// Rows of dst (row stride ld) = src's n rows (row stride ld, padding columns zero) rounded to bf16: the zero
// padding is the partner of the last pair when n is odd and dst is an A operand.
void rows_to_bf16(const float* src, int64_t n, int64_t ld, BFloat16* dst) {
  for (int64_t r = 0; r < n; ++r) at::vec::convert(src + r * ld, dst + r * ld, ld);
}

// ---------------------------------------------------------------------------------------------------- softmax
// Over one row r of ld columns (a multiple of 16; fp32 logits without the scale, valid in the first n):
// r = exp(scale * (r - max(r))), the padding columns n..ld-1 set to 0; returns the row's sum. The padding takes
// part as -inf (exp_u20 maps it to 0), so every loop runs on whole vectors: a scalar exp on the last n % 16
// columns took as long as the vector work on the other 192 at 197 tokens.
inline float exp_row(float* r, int64_t n, int64_t ld, float scale) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t j = n; j < ld; ++j) r[j] = -inf;
  // Two accumulators per reduction: one would chain every vector's max (add) to the previous one's latency.
  __m512 mx0 = _mm512_set1_ps(-inf), mx1 = mx0;
  int64_t j = 0;
  for (; j + 32 <= ld; j += 32) {
    mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(r + j));
    mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(r + j + 16));
  }
  if (j < ld) mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(r + j));
  // exp(scale * (s - max)) = exp(scale * s - scale * max): one fused multiply-add per element.
  const fVec vscale(scale), vshift(-scale * _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)));
  fVec sum0(0.f), sum1(0.f);
  for (j = 0; j + 32 <= ld; j += 32) {
    const fVec e0 = at::vec::fmadd(fVec::loadu(r + j), vscale, vshift).exp_u20();
    const fVec e1 = at::vec::fmadd(fVec::loadu(r + j + 16), vscale, vshift).exp_u20();
    e0.store(r + j);
    e1.store(r + j + 16);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  if (j < ld) {
    const fVec e = at::vec::fmadd(fVec::loadu(r + j), vscale, vshift).exp_u20();
    e.store(r + j);
    sum0 = sum0 + e;
  }
  return _mm512_reduce_add_ps(sum0 + sum1);
}

// In place over `rows` rows of s (row stride ld): s = softmax(scale * s), padding columns 0 (the backward keeps P
// in fp32 for the softmax gradient).
void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    float* r = s + i * ld;
    const fVec vinv(1.f / exp_row(r, n, ld, scale));
    for (int64_t j = 0; j < ld; j += fVec::size()) (fVec::loadu(r + j) * vinv).store(r + j);
  }
}

// p = softmax(scale * s) rounded to bf16, row by row (both row stride ld): the normalisation rides on the rounding
// pass, and s is left holding the unnormalised exponentials.
void softmax_rows_to_bf16(float* s, int64_t rows, int64_t n, int64_t ld, float scale, BFloat16* p) {
  for (int64_t i = 0; i < rows; ++i) {
    float* r = s + i * ld;
    const __m512 vinv = _mm512_set1_ps(1.f / exp_row(r, n, ld, scale));
    for (int64_t j = 0; j < ld; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i * ld + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(r + j), vinv)));
  }
}

// dp = p * (dp - sum(p * dp)) * scale over one row of ld (a multiple of 16) columns: the softmax gradient with the
// scale of the logits. Padding columns hold p = 0 and stay 0.
inline void softmax_grad_row(const float* p, float* dp, int64_t ld, float scale) {
  const int64_t V = fVec::size();
  fVec acc(0.f);
  for (int64_t j = 0; j < ld; j += V) acc = at::vec::fmadd(fVec::loadu(p + j), fVec::loadu(dp + j), acc);
  const fVec vdot(_mm512_reduce_add_ps(acc)), vscale(scale);
  for (int64_t j = 0; j < ld; j += V) (fVec::loadu(p + j) * (fVec::loadu(dp + j) - vdot) * vscale).store(dp + j);
}

// Asks for n rows of d bf16 values (row stride ld) to be brought into L2: the next (sample, head)'s q, k, v while
// this one computes. They are strided rows of the qkv projection, and waiting for them took ~8% of the forward
// (perf).
inline void prefetch_rows(const BFloat16* t, int64_t ld, int64_t n, int64_t d) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; c += 32) _mm_prefetch(reinterpret_cast<const char*>(t + j * ld + c), _MM_HINT_T1);
}

struct View {  // a (B, H, N, hd) bf16 tensor whose last dimension is dense
  const BFloat16* data;
  int64_t sb, sh, sn;
  explicit View(const at::Tensor& t)
      : data(t.const_data_ptr<BFloat16>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)) {}
  const BFloat16* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 4,
              "vitlab cpu attention: ", name, " must be a 4-D bf16 CPU tensor (B, H, N, hd)");
  TORCH_CHECK(t.sizes() == like.sizes(), "vitlab cpu attention: ", name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(t.stride(3) == 1, "vitlab cpu attention: ", name, "'s last dimension must be dense");
  // Rows are read as 32-bit pairs of bf16 values, so every row must start on a pair.
  TORCH_CHECK(t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0 && t.storage_offset() % 2 == 0,
              "vitlab cpu attention: ", name, " must have even strides and offset (rows start on bf16 pairs), got "
              "strides ", t.strides(), " and offset ", t.storage_offset());
}

// Returns (B, H, N, hd), a view of a dense (B, N, H, hd) tensor: heads merged for the output projection for free.
at::Tensor attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check(q, "q", q);
  check(k, "k", q);
  check(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), hd = q.size(3);
  TORCH_CHECK(hd % 16 == 0, "vitlab cpu attention: the head dimension must be a multiple of 16, got ", hd);
  auto out = at::empty({B, N, H, hd}, q.options());
  BFloat16* o = out.data_ptr<BFloat16>();
  const View Q(q), K(k), Vv(v);
  const int64_t np = round_up(N, 16), pairs = (N + 1) / 2;
  // Query rows go through in blocks: the block's logits, probabilities and outputs stay in L1 between the steps.
  const int64_t block = std::min<int64_t>(N, 16);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(block * np), ov(block * hd);
    std::vector<BFloat16> p(block * np);
    std::vector<uint32_t> kt(hd / 2 * np), vr(pairs * hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      if (i + 1 < end)
        for (const View* t : {&Q, &K, &Vv}) prefetch_rows(t->at((i + 1) / H, (i + 1) % H), t->sn, N, hd);
      pack_transposed_pairs(K.at(b, h), K.sn, N, hd, np, kt.data());
      pack_row_pairs(Vv.at(b, h), Vv.sn, N, hd, vr.data(), hd);
      for (int64_t r = 0; r < N; r += block) {
        const int64_t rows = std::min(block, N - r);
        row_matmul(rows, hd / 2, np / 16, Q.at(b, h) + r * Q.sn, Q.sn, kt.data(), np, s.data(), np);  // logits
        softmax_rows_to_bf16(s.data(), rows, N, np, static_cast<float>(scale), p.data());
        row_matmul(rows, pairs, hd / 16, p.data(), np, vr.data(), hd, ov.data(), hd);
        store_rows(ov.data(), hd, rows, hd, o + ((b * N + r) * H + h) * hd, H * hd);
      }
    }
  });
  return out.permute({0, 2, 1, 3});
}

// Gradients of attention_forward as one dense (B, N, 3, H, hd) tensor, dq, dk and dv side by side: the layout of
// the qkv projection's output, so its gradient needs no copy. The probabilities are recomputed from q and k (the
// forward saves nothing but q, k, v). Every matmul reads its operands as they lie or packed by row pairs; the two
// with a transposed (N, N) operand (P^T dO, dS^T q) read the row-pair packing as its transpose.
at::Tensor attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                              double scale) {
  check(q, "q", q);
  check(k, "k", q);
  check(v, "v", q);
  check(dout, "grad_output", q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), hd = q.size(3);
  TORCH_CHECK(hd % 16 == 0, "vitlab cpu attention: the head dimension must be a multiple of 16, got ", hd);
  auto dqkv = at::empty({B, N, 3, H, hd}, q.options());
  BFloat16* dqkv_ = dqkv.data_ptr<BFloat16>();
  const View Q(q), K(k), Vv(v), dO(dout);
  const float fscale = static_cast<float>(scale);
  const int64_t np = round_up(N, 16), pairs = (N + 1) / 2, ld = 3 * H * hd;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(N * np), dp(N * np), t(N * hd);
    std::vector<BFloat16> ds(N * np);
    std::vector<uint32_t> kt(hd / 2 * np), rows(pairs * np), operand(pairs * hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      if (i + 1 < end)
        for (const View* t : {&Q, &K, &Vv, &dO}) prefetch_rows(t->at((i + 1) / H, (i + 1) % H), t->sn, N, hd);
      BFloat16* dq = dqkv_ + b * N * ld + h * hd;  // row n of dq at dq + n * ld; dk and dv H * hd further on
      BFloat16 *dk = dq + H * hd, *dv = dk + H * hd;
      const BFloat16 *qp = Q.at(b, h), *kp = K.at(b, h), *vp = Vv.at(b, h), *dop = dO.at(b, h);
      const Pair* packed = reinterpret_cast<const Pair*>(rows.data());
      // The probabilities P in fp32, as in the forward.
      pack_transposed_pairs(kp, K.sn, N, hd, np, kt.data());
      row_matmul(N, hd / 2, np / 16, qp, Q.sn, kt.data(), np, s.data(), np);
      softmax_rows(s.data(), N, N, np, fscale);
      // dv = P^T dO: A is P packed by row pairs, read transposed.
      pack_row_pairs(s.data(), np, N, np, rows.data(), np);
      pack_row_pairs(dop, dO.sn, N, hd, operand.data(), hd);
      pair_matmul(N, pairs, hd / 16, packed, 1, np, operand.data(), hd, t.data(), hd);
      store_rows(t.data(), hd, N, hd, dv, ld);
      // dP = dO v^T in fp32; dS = P * (dP - rowsum(P * dP)) * scale, the softmax gradient, in fp32.
      pack_transposed_pairs(vp, Vv.sn, N, hd, np, kt.data());
      row_matmul(N, hd / 2, np / 16, dop, dO.sn, kt.data(), np, dp.data(), np);
      for (int64_t r = 0; r < N; ++r) softmax_grad_row(s.data() + r * np, dp.data() + r * np, np, fscale);
      // dq = dS k
      rows_to_bf16(dp.data(), N, np, ds.data());
      pack_row_pairs(kp, K.sn, N, hd, operand.data(), hd);
      row_matmul(N, pairs, hd / 16, ds.data(), np, operand.data(), hd, t.data(), hd);
      store_rows(t.data(), hd, N, hd, dq, ld);
      // dk = dS^T q: A is dS packed by row pairs, read transposed.
      pack_row_pairs(dp.data(), np, N, np, rows.data(), np);
      pack_row_pairs(qp, Q.sn, N, hd, operand.data(), hd);
      pair_matmul(N, pairs, hd / 16, packed, 1, np, operand.data(), hd, t.data(), hd);
      store_rows(t.data(), hd, N, hd, dk, ld);
    }
  });
  return dqkv;
}

}  // namespace

namespace vitlab {  // cpu_gelu.cpp and cpu_layer_norm.cpp, built into the same module
at::Tensor gelu_tanh_forward(const at::Tensor& x);
at::Tensor gelu_tanh_backward(const at::Tensor& dy, const at::Tensor& x);
std::vector<at::Tensor> layer_norm_bf16_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                double eps);
std::vector<at::Tensor> layer_norm_bf16_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& mean, const at::Tensor& rstd);
}  // namespace vitlab

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &attention_forward, "softmax(scale q k^T) v for bf16 (B, H, N, hd) on the CPU");
  m.def("gelu_tanh_forward", &vitlab::gelu_tanh_forward, "tanh-approximation GELU, bf16 or fp32, on the CPU");
  m.def("gelu_tanh_backward", &vitlab::gelu_tanh_backward, "gradient of gelu_tanh_forward: (grad_output, x)");
  m.def("layer_norm_bf16_forward", &vitlab::layer_norm_bf16_forward,
        "(bf16 y, mean, rstd) of LayerNorm over an fp32 tensor's last dimension");
  m.def("layer_norm_bf16_backward", &vitlab::layer_norm_bf16_backward,
        "(dx, dweight, dbias) of layer_norm_bf16_forward from a bf16 gradient");
  m.def("attention_backward", &attention_backward, "(dq, dk, dv) of attention_forward as one (B, N, 3, H, hd) tensor");
}
