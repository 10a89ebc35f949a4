// Quantized GEMV for decode steps: y = x @ W.T with x rounded to int8 per group of 32 input columns (GGUF Q8_1:
// x ~ dx * qx) and dot products summed in integers (AVX2 maddubs), as llama.cpp runs its Q4_1 / Q8_0 weights.
//
//   int4 (Q4_1): w = d * q + m, q in 0..15 per group of 32. Per group g of output row n and input row b:
//                sum_j w_j x_j ~ d[n,g] dx[b,g] sum_j q_j qx_j + m[n,g] dx[b,g] sum_j qx_j
//                qs (N, K / 2) uint8: group g of row n in bytes 16 g .. 16 g + 15, byte j holding element j in its
//                low nibble and element 16 + j in its high nibble; d, m (N, K / 32) float32.
//   int8 (Q8_0): w = d * q, q in -127..127; qs (N, K) int8, d (N, K / 32) float32.
//
// Registered as torch.ops.adainfer.q4q8_linear(x, qs, d, m) and torch.ops.adainfer.q8q8_linear(x, qs, d), x (B, K)
// float32 or bfloat16, -> (B, N) float32. adainfer/fast_decode.py packs the weights and holds the plain-torch
// reference (int4_linear_reference, int8_linear_reference).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define Q4Q8_AVX2 1
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowsAtOnce = 4;  // input rows sharing one load of the weights

// x (B, K) -> qx (B, K) int8, dx and sx (B, K / 32): dx = max|x| / 127 per group, sx = dx * sum(qx).
template <typename T>
void quantize_rows(const T* x, int64_t B, int64_t K, int8_t* qx, float* dx, float* sx) {
  const int64_t G = K / kGroup;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const T* src = x + b * K + g * kGroup;
      float amax = 0.f;
      for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(static_cast<float>(src[j])));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* dst = qx + b * K + g * kGroup;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int v = static_cast<int>(std::nearbyint(static_cast<float>(src[j]) * inv));
        dst[j] = static_cast<int8_t>(v);
        sum += v;
      }
      dx[b * G + g] = d;
      sx[b * G + g] = d * static_cast<float>(sum);
    }
  }
}

struct Inputs {  // x rounded to int8: qx (B, K), dx and sx (B, K / 32)
  const int8_t* qx;
  const float* dx;
  const float* sx;
};

struct Weights {  // qs (N, row_bytes), d and m (N, K / 32); m is null for int8 weights
  const uint8_t* qs;
  const float* d;
  const float* m;
};

// Bytes of one group of weights and of one row of K weights.
template <bool kInt8>
constexpr int64_t group_bytes() { return kInt8 ? kGroup : kGroup / 2; }

#ifdef Q4Q8_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 weights of one group as 32 bytes. int4: elements 0..15 from the low nibbles, 16..31 from the high ones.
template <bool kInt8>
inline __m256i load_weights(const uint8_t* bytes) {
  if constexpr (kInt8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
  }
}

// sum_j w_j a_j of one group as 8 float partial sums. maddubs multiplies unsigned by signed bytes into 16 int16
// (|.| <= 2 * 127 * 127: no saturation); int8 weights lend their sign to the activations first.
template <bool kInt8>
inline __m256 group_dot(__m256i w, __m256i a) {
  if constexpr (kInt8) {
    a = _mm256_sign_epi8(a, w);
    w = _mm256_sign_epi8(w, w);
  }
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)));
}

inline __m256i load_inputs(const int8_t* a) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)); }
#endif

#ifdef Q4Q8_AVX2
// Output n of input rows b0 .. b0 + kRows - 1 into y (B, N). kRows is a compile-time count so that the
// accumulators stay in registers (indexed by a runtime row count they went through memory: 2 rows cost 2.7x one).
template <bool kInt8, int kRows>
inline void weight_row(Weights w, Inputs x, int64_t G, int64_t N, int64_t b0, int64_t n, float* y) {
  constexpr int64_t gb = group_bytes<kInt8>();
  const uint8_t* q = w.qs + n * G * gb;
  const float* d = w.d + n * G;
  __m256 acc[kRows];
  float mins[kRows];
  for (int b = 0; b < kRows; ++b) {
    acc[b] = _mm256_setzero_ps();
    mins[b] = 0.f;
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m256i wg = load_weights<kInt8>(q + g * gb);
    for (int b = 0; b < kRows; ++b) {
      const int64_t i = (b0 + b) * G + g;  // group g of input row b0 + b
      const __m256 s = group_dot<kInt8>(wg, load_inputs(x.qx + i * kGroup));
      acc[b] = _mm256_fmadd_ps(s, _mm256_set1_ps(d[g] * x.dx[i]), acc[b]);
      if constexpr (!kInt8) mins[b] = std::fma(w.m[n * G + g], x.sx[i], mins[b]);
    }
  }
  for (int b = 0; b < kRows; ++b) y[(b0 + b) * N + n] = hsum(acc[b]) + mins[b];
}
#endif

// Outputs n0..n1 of input rows b0 .. b0 + nb - 1 (nb <= kRowsAtOnce) into y (B, N).
template <bool kInt8>
void dot_rows(Weights w, Inputs x, int64_t K, int64_t N, int64_t b0, int64_t nb, int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / kGroup, gb = group_bytes<kInt8>(), row = G * gb;
  int64_t n = n0;
#ifdef Q4Q8_AVX2
  if (nb == 1) {
    // One input row (a decode step at batch 1): two weight rows per pass, two independent FMA chains sharing each
    // activation load; ~1.7x the one-row loop on this kernel's int4 matrices.
    const int8_t* a = x.qx + b0 * K;
    const float *dx = x.dx + b0 * G, *sx = x.sx + b0 * G;
    for (; n + 1 < n1; n += 2) {
      const uint8_t *q0 = w.qs + n * row, *q1 = q0 + row;
      const float *d0 = w.d + n * G, *d1 = d0 + G;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      float min0 = 0.f, min1 = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const __m256i ag = load_inputs(a + g * kGroup);
        acc0 = _mm256_fmadd_ps(group_dot<kInt8>(load_weights<kInt8>(q0 + g * gb), ag), _mm256_set1_ps(d0[g] * dx[g]),
                               acc0);
        acc1 = _mm256_fmadd_ps(group_dot<kInt8>(load_weights<kInt8>(q1 + g * gb), ag), _mm256_set1_ps(d1[g] * dx[g]),
                               acc1);
        if constexpr (!kInt8) {  // fused explicitly, as in weight_row: a row's sums do not depend on the path
          min0 = std::fma(w.m[n * G + g], sx[g], min0);
          min1 = std::fma(w.m[(n + 1) * G + g], sx[g], min1);
        }
      }
      y[b0 * N + n] = hsum(acc0) + min0;
      y[b0 * N + n + 1] = hsum(acc1) + min1;
    }
  }
  // A few input rows: each weight group loaded once and used for all of them.
  switch (nb) {
    case 1: for (; n < n1; ++n) weight_row<kInt8, 1>(w, x, G, N, b0, n, y); break;
    case 2: for (; n < n1; ++n) weight_row<kInt8, 2>(w, x, G, N, b0, n, y); break;
    case 3: for (; n < n1; ++n) weight_row<kInt8, 3>(w, x, G, N, b0, n, y); break;
    default: for (; n < n1; ++n) weight_row<kInt8, 4>(w, x, G, N, b0, n, y); break;
  }
#else
  for (; n < n1; ++n) {  // portable fallback: the same sums, one weight at a time
    const uint8_t* q = w.qs + n * row;
    for (int64_t b = 0; b < nb; ++b) {
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = (b0 + b) * G + g;
        const int8_t* a = x.qx + i * kGroup;
        const uint8_t* bytes = q + g * gb;
        int dot = 0;
        for (int j = 0; j < 16; ++j) {
          if constexpr (kInt8) {
            dot += static_cast<int8_t>(bytes[j]) * a[j] + static_cast<int8_t>(bytes[16 + j]) * a[16 + j];
          } else {
            dot += (bytes[j] & 0x0F) * a[j] + (bytes[j] >> 4) * a[16 + j];
          }
        }
        total += w.d[n * G + g] * x.dx[i] * static_cast<float>(dot);
        if constexpr (!kInt8) total += w.m[n * G + g] * x.sx[i];
      }
      y[(b0 + b) * N + n] = total;
    }
  }
#endif
}

template <bool kInt8>
at::Tensor quantized_linear(const char* op, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                            const at::Tensor* m) {
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && d.dim() == 2, op, ": 2-d tensors expected");
  const int64_t B = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % kGroup == 0, op, ": input width ", K, " is not a multiple of ", kGroup);
  TORCH_CHECK(qs.size(1) == K / kGroup * group_bytes<kInt8>() && d.size(0) == N && d.size(1) == K / kGroup &&
                  (m == nullptr || m->sizes() == d.sizes()),
              op, ": weight shapes do not match an input of width ", K);
  TORCH_CHECK(qs.scalar_type() == (kInt8 ? at::kChar : at::kByte) && d.scalar_type() == at::kFloat &&
                  (m == nullptr || m->scalar_type() == at::kFloat),
              op, ": weights must be ", kInt8 ? "int8" : "uint8 nibbles", " with float32 scales");
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu(), op, " runs on the CPU");
  const at::Tensor xc = x.contiguous(), qsc = qs.contiguous(), dc = d.contiguous();
  const at::Tensor mc = m == nullptr ? at::Tensor() : m->contiguous();
  const int64_t G = K / kGroup;
  std::vector<int8_t> qx(B * K);
  std::vector<float> dx(B * G), sx(B * G);
  if (xc.scalar_type() == at::kFloat) {
    quantize_rows(xc.data_ptr<float>(), B, K, qx.data(), dx.data(), sx.data());
  } else if (xc.scalar_type() == at::kBFloat16) {
    quantize_rows(xc.data_ptr<at::BFloat16>(), B, K, qx.data(), dx.data(), sx.data());
  } else {
    TORCH_CHECK(false, op, ": input must be float32 or bfloat16, got ", xc.scalar_type());
  }
  at::Tensor y = at::empty({B, N}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const Weights w{static_cast<const uint8_t*>(qsc.data_ptr()), dc.data_ptr<float>(),
                  m == nullptr ? nullptr : mc.data_ptr<float>()};
  const Inputs in{qx.data(), dx.data(), sx.data()};
  for (int64_t b0 = 0; b0 < B; b0 += kRowsAtOnce) {
    const int64_t nb = std::min(kRowsAtOnce, B - b0);
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { dot_rows<kInt8>(w, in, K, N, b0, nb, n0, n1, out); });
  }
  return y;
}

at::Tensor q4q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  return quantized_linear<false>("q4q8_linear", x, qs, d, &m);
}

at::Tensor q8q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  return quantized_linear<true>("q8q8_linear", x, qs, d, nullptr);
}

}  // namespace

TORCH_LIBRARY(adainfer, lib) {
  lib.def("q4q8_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("q8q8_linear(Tensor x, Tensor qs, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(adainfer, CPU, lib) {
  lib.impl("q4q8_linear", &q4q8_linear);
  lib.impl("q8q8_linear", &q8q8_linear);
}
