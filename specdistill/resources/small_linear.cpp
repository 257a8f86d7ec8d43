// Linear layers over a few rows (decode and verification passes) on x86 CPUs with AVX2 + FMA.
//
// y[m, n] = dot(x[m, :], w[n, :]) (+ bias[n]) for M <= a few dozen rows, w in nn.Linear's (N, K) layout.
// Why: at such M a BLAS GEMM costs almost M times a GEMV (measured 65 / 104 / 133 ms for 1 / 2 / 5 rows
// over the embedded target's linears, one thread), so verifying a draft cost ~1.5x a plain step. Here
// every weight row is read from memory once (with software prefetch) and applied to all M rows while
// it is in registers, so a pass over 5 tokens costs about what a pass over 1 does.
//
// Determinism: each output is the same sequence of 8-wide FMAs over k followed by the same horizontal
// sum, whatever M, the row blocking or the thread split, so a row's result is bit-identical whether it
// is computed alone (a plain decoding step) or among others (a verification pass).
// Weights may also be bf16 (used for drafters, whose weights are ours to round): widened to fp32 exactly
// in registers, so memory traffic halves and the arithmetic is unchanged.
// Compiled once at run time by specdistill/cpu_kernels.py (torch.utils.cpp_extension).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

// Weight element types: fp32, or bf16 stored as uint16 (the drafter's drafting copy: half the bytes,
// widened to fp32 exactly by a 16-bit shift, so the math stays fp32).
struct F32 {
  typedef float T;
  static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
};
struct BF16 {
  typedef uint16_t T;
  static inline __m256 load8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};

// y[m, n] for m in [0, MB), n in [n, n + R): dot(x[m, :K], w[n, :K]) (+ bias[n]); K % 8 == 0.
// R rows of w at a time share each load of x. Every (m, n) is summed in the same order whatever MB/R.
#ifndef PFD
#define PFD 4  // prefetch the weight rows this many row blocks ahead
#endif
template <class W, int MB, int R>
static inline void rows(const float* x, int64_t K, const typename W::T* w, const float* bias, float* y,
                        int64_t ldy, int64_t n) {
  __m256 acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  const typename W::T* wr = w + n * K;
  // one prefetch per 64-byte line: every 16 fp32 or 32 bf16 elements
  const int64_t line = 64 / sizeof(typename W::T) - 1;
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      wv[r] = W::load8(wr + r * K + k);
      if ((k & line) == 0) _mm_prefetch((const char*)(wr + (r + PFD * R) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) y[m * ldy + n + r] = hsum8(acc[r][m]) + (bias ? bias[n + r] : 0.f);
}

template <class W, int MB, int R>
static void block(const float* x, int64_t K, const typename W::T* w, const float* bias, float* y, int64_t ldy,
                  int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows<W, MB, R>(x, K, w, bias, y, ldy, n);
  for (; n < n1; ++n) rows<W, MB, 1>(x, K, w, bias, y, ldy, n);
}

template <class W>
static at::Tensor run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  typedef void (*block_fn)(const float*, int64_t, const typename W::T*, const float*, float*, int64_t, int64_t,
                           int64_t);
  static const block_fn BLOCKS[7] = {nullptr, block<W, 1, 6>, block<W, 2, 4>, block<W, 3, 3>,
                                     block<W, 4, 2>, block<W, 5, 2>, block<W, 6, 2>};
  TORCH_CHECK(x.scalar_type() == at::kFloat, "small_linear: x must be fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "small_linear: weight must be contiguous (N, K)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 8 == 0 && x.size(-1) == K, "small_linear: K must match and be a multiple of 8");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const float* bp = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "small_linear: bias must be fp32 (N,)");
    bc = bias->contiguous();
    bp = bc.data_ptr<float>();
  }
  const float* xp = x2.data_ptr<float>();
  const typename W::T* wp = reinterpret_cast<const typename W::T*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t CH = 64;  // W rows per L2-resident chunk, reused by every m-block
  at::parallel_for(0, (N + CH - 1) / CH, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t n0 = c * CH, n1 = std::min(N, n0 + CH);
      for (int64_t m0 = 0; m0 < M; m0 += 6) {
        int mb = (int)std::min<int64_t>(6, M - m0);
        BLOCKS[mb](xp + m0 * K, K, wp, bp, yp + m0 * N, N, n0, n1);
      }
    }
  });
  return y.view(out_sizes);
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (w.scalar_type() == at::kBFloat16) return run<BF16>(x, w, bias);
  TORCH_CHECK(w.scalar_type() == at::kFloat, "small_linear: weight must be fp32 or bf16");
  return run<F32>(x, w, bias);
}

TORCH_LIBRARY(specdistill, m) { m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(specdistill, CPU, m) { m.impl("small_linear", &small_linear); }
