// Single-stream decode with float32 weights that bfloat16 holds exactly: read them as bfloat16.
//
// Decoding one token multiplies one or two activation rows by every weight matrix, so a step
// is bounded by the bytes it reads. Where a checkpoint's float32 weights are bfloat16 values
// (SmolLM2's are: dequantized from its GGUF), reading the bfloat16 copy halves the bytes and
// changes no weight; the arithmetic stays float32 (AVX2 + FMA). More rows than that are
// compute-bound and go to vLLM's own oneDNN matmul, unchanged.
//
// Layout: w [N, K] packed as [N/8][K/8][8 rows][8 k], so that a block of eight output rows is
// one sequential stream (the hardware prefetcher follows one stream per thread far better than
// eight interleaved ones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

constexpr int64_t kRows = 8;       // the packed block's height
constexpr int64_t kAhead = 2048;   // prefetch distance, in bfloat16 elements (4 KiB)
constexpr int64_t kMaxRows = 2;    // activation rows this kernel takes; more go to oneDNN

inline __m256 load_bf16(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Lane r of the result: the sum of a[r]'s eight lanes.
inline __m256 row_sums(const __m256* a) {
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

template <int M>
void gemv(const float* x, const at::BFloat16* w, const float* bias, float* y, int64_t K,
          int64_t N) {
  at::parallel_for(0, N / kRows, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const at::BFloat16* block = w + b * kRows * K;
      __m256 acc[M][kRows];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8) {
        const at::BFloat16* p = block + k * kRows;
        _mm_prefetch(reinterpret_cast<const char*>(p + kAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + 32), _MM_HINT_T0);
        __m256 xv[M];
        for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < kRows; ++r) {
          __m256 wv = load_bf16(p + r * 8);
          for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
        }
      }
      for (int m = 0; m < M; ++m) {
        __m256 out = row_sums(acc[m]);
        if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + b * kRows));
        _mm256_storeu_ps(y + m * N + b * kRows, out);
      }
    }
  });
}

at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack: a 2-D weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kRows == 0 && K % 8 == 0, "pack: rows and columns must be multiples of 8");
  return w.to(at::kBFloat16).reshape({N / kRows, kRows, K / 8, 8}).permute({0, 2, 1, 3})
      .contiguous().reshape({N, K});
}

// out = x @ w.T + bias: this kernel for up to kMaxRows rows, else vLLM's oneDNN matmul on the
// float32 weight its handler holds (`_C::onednn_mm`, same arguments).
void linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
            const std::optional<at::Tensor>& bias, const at::Tensor& handler) {
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  if (M > kMaxRows || M == 0 || x.scalar_type() != at::kFloat || !x.is_contiguous()) {
    static const auto onednn =
        c10::Dispatcher::singleton().findSchemaOrThrow("_C::onednn_mm", "");
    torch::jit::Stack stack{out, x, bias, handler};
    onednn.callBoxed(&stack);
    return;
  }
  TORCH_CHECK(packed.size(1) == K && out.is_contiguous(), "linear: shapes");
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (M == 1)
    gemv<1>(x.data_ptr<float>(), packed.data_ptr<at::BFloat16>(), b, out.data_ptr<float>(), K, N);
  else
    gemv<2>(x.data_ptr<float>(), packed.data_ptr<at::BFloat16>(), b, out.data_ptr<float>(), K, N);
}

void linear_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const std::optional<at::Tensor>&, const at::Tensor&) {}

}  // namespace

TORCH_LIBRARY(serve_app, m) {
  m.def("bf16w_pack(Tensor w) -> Tensor");
  m.def("bf16w_linear(Tensor! out, Tensor x, Tensor packed, Tensor? bias, Tensor handler) -> ()");
}
TORCH_LIBRARY_IMPL(serve_app, CPU, m) {
  m.impl("bf16w_pack", pack);
  m.impl("bf16w_linear", linear);
}
TORCH_LIBRARY_IMPL(serve_app, Meta, m) { m.impl("bf16w_linear", linear_meta); }
