#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <cmath>
#include <vector>

// y = x @ w^T for a few rows x (float32): the decoding step's matmuls on CPU.
//
// Memory-bound like a matrix-vector product: every weight is read once from memory and used for all
// rows, and each x load serves P weight rows. Every output is one accumulator vector over k in order,
// then the same horizontal sum, whatever the number of rows or the thread split, so a row gives
// bit-identical results alone (plain decoding) or inside a tree (PPD). Two builds of the same loop:
// AVX-512 (16 lanes, 32 registers: twice the rows per weight read before the FMAs run out) where the
// CPU has it, else AVX2 + FMA. One machine always runs the same one.

static bool has_avx512();  // cpuid, below: which float loop this machine runs

// ---------------------------------------------------------------- AVX2 + FMA
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Where the weights come from. A loader hands out 8 consecutive weights of one row as floats; the loop
// below is the same for all of them, so a row's sums (and bits) do not depend on how its weights are stored.
struct F32Weights {
  const float* w;
  int64_t K;
  void prefetch(int64_t n, int64_t k) const { _mm_prefetch(reinterpret_cast<const char*>(w + n * K + k), _MM_HINT_T0); }
  __m256 load(int64_t n, int64_t k) const { return _mm256_loadu_ps(w + n * K + k); }
};

// weights just unpacked into a buffer that sits in L1: nothing to fetch
struct L1Weights {
  const float* w;
  int64_t K;
  void prefetch(int64_t, int64_t) const {}
  __m256 load(int64_t n, int64_t k) const { return _mm256_loadu_ps(w + n * K + k); }
};

static inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T0);
}

// GGUF's Q4_1 blocks (32 weights: w = d * q + m, q in 0..15), kept as 4 bits per weight: per 16 weights 8 bytes,
// byte i = weight i (low nibble) and weight i + 8 (high nibble), and (d, m) per block as floats. d * q is exact
// in float32 (d is an fp16, q has 4 bits), so one FMA rounds exactly like the dequantiser's d * q + m: the very
// float32 weights the model was loaded with, at about a fifth of the memory traffic (6 bits a weight).
struct Q4Weights {
  const uint8_t* q;  // [N, K / 2]
  const float* s;    // [N, K / 32, 2]: d, m
  int64_t K;
  void prefetch_row(int64_t n) const {
    prefetch_bytes(q + n * K / 2, K / 2);
    prefetch_bytes(s + n * K / 16, K / 4);
  }
  void unpack_row(int64_t n, float* out) const {
    const uint8_t* qr = q + n * K / 2;
    const float* sr = s + n * K / 16;
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < K / 32; ++b) {
      const __m256 d = _mm256_broadcast_ss(sr + 2 * b), m = _mm256_broadcast_ss(sr + 2 * b + 1);
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + b * 16 + h * 8)));
        float* o = out + b * 32 + h * 16;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), d, m));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d, m));
      }
    }
  }
};

// GGUF's Q8_0 blocks (32 weights: w = d * q, q in -127..127): int8 weights and d per block; d * q is exact.
struct Q8Weights {
  const int8_t* q;  // [N, K]
  const float* s;   // [N, K / 32]
  int64_t K;
  void prefetch_row(int64_t n) const {
    prefetch_bytes(q + n * K, K);
    prefetch_bytes(s + n * K / 32, K / 8);
  }
  void unpack_row(int64_t n, float* out) const {
    const int8_t* qr = q + n * K;
    const float* sr = s + n * K / 32;
    for (int64_t k = 0; k < K; k += 8) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + k)));
      _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_broadcast_ss(sr + k / 32)));
    }
  }
};

// W rows n..n+P-1 against x rows 0..G-1: P*G accumulators, each x load serves P weight rows.
template <int P, int G, class W>
static inline void block(const W& w, int64_t n, const float* x, int64_t K, int64_t N, float* y) {
  __m256 acc[P][G];
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < G; ++g) acc[p][g] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[P];
    for (int p = 0; p < P; ++p) {
      // fetch the weights two blocks ahead: loads then overlap the FMAs (measured, 8 rows: 27 -> 19 ms)
      w.prefetch(n + p + 2 * P, k);
      wv[p] = w.load(n + p, k);
    }
    for (int g = 0; g < G; ++g) {
      const __m256 xv = _mm256_loadu_ps(x + g * K + k);
      for (int p = 0; p < P; ++p) acc[p][g] = _mm256_fmadd_ps(wv[p], xv, acc[p][g]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < G; ++g) y[g * N + n + p] = hsum(acc[p][g]);
}

template <int P, class W>
static inline void rows_block(const W& w, int64_t n, const float* x, int64_t R, int64_t K, int64_t N, float* y) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) block<P, 4>(w, n, x + r * K, K, N, y + r * N);
  switch (R - r) {
    case 3: block<P, 3>(w, n, x + r * K, K, N, y + r * N); break;
    case 2: block<P, 2>(w, n, x + r * K, K, N, y + r * N); break;
    case 1: block<P, 1>(w, n, x + r * K, K, N, y + r * N); break;
    default: break;
  }
}

static void linear_avx2(const float* xp, const float* wp, float* yp, int64_t R, int64_t K, int64_t N) {
  constexpr int64_t P = 3;  // 3 weight rows x 4 x rows = 12 accumulators + 3 + 1 of the 16 AVX registers
  const F32Weights w{wp, K};
  at::parallel_for(0, N / P, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t n = P * b0; n < P * b1; n += P) rows_block<P>(w, n, xp, R, K, N, yp);
  });
  for (int64_t n = N - N % P; n < N; ++n) rows_block<1>(w, n, xp, R, K, N, yp);
}

// ---------------------------------------------------------------- AVX-512 (same loop, 16 lanes)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")

template <int P, int G, bool Prefetch = true>
static inline void block512(const float* w, const float* x, int64_t K, int64_t N, float* y) {
  __m512 acc[P][G];
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < G; ++g) acc[p][g] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[P];
    for (int p = 0; p < P; ++p) {
      if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (p + 2 * P) * K + k), _MM_HINT_T0);
      wv[p] = _mm512_loadu_ps(w + p * K + k);
    }
    for (int g = 0; g < G; ++g) {
      const __m512 xv = _mm512_loadu_ps(x + g * K + k);
      for (int p = 0; p < P; ++p) acc[p][g] = _mm512_fmadd_ps(wv[p], xv, acc[p][g]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < G; ++g) y[g * N + p] = _mm512_reduce_add_ps(acc[p][g]);
}

template <int P, bool Prefetch = true>
static inline void rows_block512(const float* w, const float* x, int64_t R, int64_t K, int64_t N, float* y) {
  int64_t r = 0;
  for (; r + 6 <= R; r += 6) block512<P, 6, Prefetch>(w, x + r * K, K, N, y + r * N);
  switch (R - r) {
    case 5: block512<P, 5, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 4: block512<P, 4, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 3: block512<P, 3, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 2: block512<P, 2, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 1: block512<P, 1, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    default: break;
  }
}

static void linear_avx512(const float* xp, const float* wp, float* yp, int64_t R, int64_t K, int64_t N) {
  constexpr int64_t P = 4;  // 4 weight rows x 6 x rows = 24 accumulators + 4 + 1 of the 32 registers
  at::parallel_for(0, N / P, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t n = P * b0; n < P * b1; n += P) rows_block512<P>(wp + n * K, xp, R, K, N, yp + n);
  });
  for (int64_t n = N - N % P; n < N; ++n) rows_block512<1>(wp + n * K, xp, R, K, N, yp + n);
}

// a strip of P weight rows already unpacked into `buf` (in L1: nothing to prefetch) against all x rows
static void strip_avx512(const float* buf, int64_t rows, const float* x, int64_t R, int64_t K, int64_t N, float* y) {
  if (rows == 4)
    rows_block512<4, false>(buf, x, R, K, N, y);
  else
    for (int64_t p = 0; p < rows; ++p) rows_block512<1, false>(buf + p * K, x, R, K, N, y + p);
}

// Q4Weights::unpack_row and Q8Weights::unpack_row 16 lanes at a time: the same FMA (or multiply) per weight,
// so the same floats, with about a third fewer unpacking instructions (measured on Zen 5: ~4 % off the packed
// matmuls of a plain step: most of their time is spent elsewhere)
static void unpack_row512(const Q4Weights& w, int64_t n, float* out) {
  const uint8_t* qr = w.q + n * w.K / 2;
  const float* sr = w.s + n * w.K / 16;
  const __m128i nibble = _mm_set1_epi8(15);
  for (int64_t b = 0; b < w.K / 32; ++b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + b * 16));  // the block's 32 weights
    const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
    const __m512 d = _mm512_set1_ps(sr[2 * b]), m = _mm512_set1_ps(sr[2 * b + 1]);
    // weights 0-7 are bytes 0-7's low nibbles, 8-15 their high ones; 16-31 likewise from bytes 8-15
    const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(lo, hi)));
    const __m512 second = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi64(lo, hi)));
    _mm512_storeu_ps(out + b * 32, _mm512_fmadd_ps(first, d, m));
    _mm512_storeu_ps(out + b * 32 + 16, _mm512_fmadd_ps(second, d, m));
  }
}

static void unpack_row512(const Q8Weights& w, int64_t n, float* out) {
  const int8_t* qr = w.q + n * w.K;
  const float* sr = w.s + n * w.K / 32;
  for (int64_t k = 0; k < w.K; k += 16) {
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k)));
    _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(sr[k / 32])));
  }
}

#pragma GCC pop_options

// Quantised weights: unpack a strip of weight rows into a float buffer (in L1), then run the float32 loop
// (AVX-512 where few_rows_linear uses it, else AVX2) over all x rows. Each weight is unpacked once per step
// whatever the number of rows, and every sum is the float32 kernel's, bit for bit.
template <class W>
static void quant_linear_rows(const W& w, const float* xp, float* yp, int64_t R, int64_t K, int64_t N) {
  const bool wide = K % 16 == 0 && has_avx512();
  const int64_t P = wide ? 4 : 3;
  at::parallel_for(0, (N + P - 1) / P, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(P * K);
    for (int64_t n = P * b0; n < std::min(N, P * b1); n += P) {
      const int64_t rows = std::min(P, N - n);
      for (int64_t p = n + P; p < std::min(N, n + 2 * P); ++p) w.prefetch_row(p);  // the next strip, while this one runs
      if (wide) {
        for (int64_t p = 0; p < rows; ++p) unpack_row512(w, n + p, buf.data() + p * K);
        strip_avx512(buf.data(), rows, xp, R, K, N, yp + n);
        continue;
      }
      for (int64_t p = 0; p < rows; ++p) w.unpack_row(n + p, buf.data() + p * K);
      if (rows == 3)
        rows_block<3>(L1Weights{buf.data(), K}, 0, xp, R, K, N, yp + n);
      else
        for (int64_t p = 0; p < rows; ++p) rows_block<1>(L1Weights{buf.data(), K}, p, xp, R, K, N, yp + n);
    }
  });
}


// ---------------------------------------------------------------- RMSNorm (AVX2 + FMA)
//
// y = w * (x * (1 / sqrt(mean(x^2) + eps))) per row in float32: the stock Llama RMSNorm's arithmetic in one call
// (the stock module runs 7 tensor ops, ~11 us a call on Zen 5, and a decoding step of the default model calls it
// 61 times). Each row is summed in the same order whatever the number of rows, so a tree row is normalised
// bit-identically to the same token in a plain step.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && x.is_contiguous() && w.is_contiguous(),
              "contiguous float32");
  const int64_t K = x.size(-1), R = x.numel() / K;
  TORCH_CHECK(w.numel() == K && K % 8 == 0, "shape");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = xp + r * K;
    float* yr = yp + r * K;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(hsum(acc) / static_cast<float>(K) + static_cast<float>(eps)));
    for (int64_t k = 0; k < K; k += 8)
      _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_loadu_ps(wp + k), _mm256_mul_ps(_mm256_loadu_ps(xr + k), scale)));
  }
  return y;
}

// ---------------------------------------------------------------- attention of a few query rows (AVX2 + FMA)
//
// softmax(q k^T * scale) v for each query row over the keys its mask allows, for a decoding step (1 row) or a
// tree (a few rows). Each row first lists its allowed keys in order (a tree node: the prefix, then its
// ancestors, then itself: exactly the keys the same token sees in a plain step), and every later sum runs over
// that list in order. So a row's output depends only on its own keys, not on the other rows of the tree or on
// where its ancestors sit in it: bit-identical in a plain step and in a PPD tree, which SDPA is not.

// e^x for x <= 0 (Cephes' polynomial, as in avx_mathfun): every lane computed alike, whatever its neighbours.
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// scores[i] = q . key(keys[i]) * scale for 8 keys at once (8 independent FMA chains); each score is the same
// sequence of operations whichever slot it takes.
static inline void dots8(const float* q, const float* const* key, int64_t D, float scale, float* out) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[j] + d), acc[j]);
  }
  for (int j = 0; j < 8; ++j) out[j] = hsum(acc[j]) * scale;
}

// out[d0 .. d0 + 8 NB) = sum_i p[i] v(keys[i]) in key order: NB independent accumulators, one per 8 lanes.
template <int NB>
static inline void weighted_sum(const float* p, const float* v, int64_t vs, const int32_t* keys, int64_t n,
                                int64_t d0, float inv, float* out) {
  __m256 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 w = _mm256_set1_ps(p[i]);
    const float* row = v + keys[i] * vs + d0;
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * b), acc[b]);
  }
  for (int b = 0; b < NB; ++b) _mm256_storeu_ps(out + d0 + 8 * b, _mm256_mul_ps(acc[b], _mm256_set1_ps(inv)));
}

// One query row against the keys listed in `keys` (n of them); writes D outputs. `buf` holds n + 8 floats.
static void attend_row(const float* q, const float* k, const float* v, int64_t ks, int64_t vs, const int32_t* keys,
                       int64_t n, int64_t D, float scale, float* buf, float* out) {
  const float* key[8];
  for (int64_t i = 0; i < n; i += 8) {
    for (int j = 0; j < 8; ++j) key[j] = k + keys[i + j < n ? i + j : n - 1] * ks;  // the tail repeats a key
    dots8(q, key, D, scale, buf + i);
  }
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = buf[i] > mx ? buf[i] : mx;
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {  // the tail is computed like a full vector, its extra lanes zeroed
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(buf + i), vmx));
    const __m256 live = _mm256_cmp_ps(_mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_ps(float(n - i)), _CMP_LT_OQ);
    const __m256 em = _mm256_and_ps(e, live);
    _mm256_storeu_ps(buf + i, em);
    vsum = _mm256_add_ps(vsum, em);
  }
  const float inv = 1.0f / hsum(vsum);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch ((D - d0) >= 64 ? 8 : (D - d0) / 8) {
      case 8: weighted_sum<8>(buf, v, vs, keys, n, d0, inv, out); break;
      case 7: weighted_sum<7>(buf, v, vs, keys, n, d0, inv, out); break;
      case 6: weighted_sum<6>(buf, v, vs, keys, n, d0, inv, out); break;
      case 5: weighted_sum<5>(buf, v, vs, keys, n, d0, inv, out); break;
      case 4: weighted_sum<4>(buf, v, vs, keys, n, d0, inv, out); break;
      case 3: weighted_sum<3>(buf, v, vs, keys, n, d0, inv, out); break;
      case 2: weighted_sum<2>(buf, v, vs, keys, n, d0, inv, out); break;
      default: weighted_sum<1>(buf, v, vs, keys, n, d0, inv, out); break;
    }
  }
}


// ---------------------------------------------------------------- attention, AVX-512 (one KV head's query heads together)
//
// Same contract as attend_row, for the G query heads that share a key/value head: each key and value row is
// loaded once for all of them. Still every output depends only on its own query row and key list.
static bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return yes;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")

static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
}

// G query rows q[g] (D = 16 * DV floats each) against the keys listed in `keys`; buf holds G * (n + 16) floats.
template <int G, int DV>
static void attend_group512(const float* const* q, const float* k, const float* v, int64_t ks, int64_t vs,
                            const int32_t* keys, int64_t n, float scale, float* buf, float* const* out) {
  const int64_t stride = n + 16;
  __m512 qv[G][DV];
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < DV; ++b) qv[g][b] = _mm512_loadu_ps(q[g] + 16 * b);
  for (int64_t i = 0; i < n; ++i) {
    const float* kr = k + keys[i] * ks;
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int b = 0; b < DV; ++b) {
      const __m512 kv = _mm512_loadu_ps(kr + 16 * b);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(qv[g][b], kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) buf[g * stride + i] = _mm512_reduce_add_ps(acc[g]) * scale;
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sc = buf + g * stride;
    // the row maximum 16 lanes at a time (a scalar compare chain cost ~1 us per head at 300 keys); a maximum
    // is exact in any order, so this changes no bit of the output
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, sc + i));
    }
    const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {  // the tail is computed like a full vector, its extra lanes zeroed
      const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + i), vmx)));
      _mm512_storeu_ps(sc + i, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    inv[g] = 1.0f / _mm512_reduce_add_ps(vsum);
  }
  __m512 acc[G][DV];
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < DV; ++b) acc[g][b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* vr = v + keys[i] * vs;
    __m512 w[G];
    for (int g = 0; g < G; ++g) w[g] = _mm512_set1_ps(buf[g * stride + i]);
    for (int b = 0; b < DV; ++b) {
      const __m512 vv = _mm512_loadu_ps(vr + 16 * b);
      for (int g = 0; g < G; ++g) acc[g][b] = _mm512_fmadd_ps(w[g], vv, acc[g][b]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < DV; ++b) _mm512_storeu_ps(out[g] + 16 * b, _mm512_mul_ps(acc[g][b], _mm512_set1_ps(inv[g])));
}

// the (G, D) shapes with a grouped AVX-512 build; false = use the per-row AVX2 path
static bool attend_group_avx512(int64_t G, int64_t D, const float* const* q, const float* k, const float* v,
                                int64_t ks, int64_t vs, const int32_t* keys, int64_t n, float scale, float* buf,
                                float* const* out) {
#define PPD_CASE(GG, DD) if (G == GG && D == 16 * DD) { attend_group512<GG, DD>(q, k, v, ks, vs, keys, n, scale, buf, out); return true; }
  PPD_CASE(1, 4) PPD_CASE(2, 4) PPD_CASE(3, 4) PPD_CASE(4, 4) PPD_CASE(5, 4) PPD_CASE(6, 4) PPD_CASE(8, 4)
  PPD_CASE(1, 8) PPD_CASE(2, 8) PPD_CASE(3, 8) PPD_CASE(4, 8)
#undef PPD_CASE
  return false;
}

#pragma GCC pop_options

// q [1, H, T, D], k/v [1, KVH, S, D] (last dim contiguous), mask: empty (every key allowed) or [1, 1, T, S], bool
// (true = allowed) or additive float (0 = allowed, < -1e30 = blocked). Returns [1, T, H, D]; an empty tensor if
// the mask holds other values (the caller then uses SDPA).
torch::Tensor tree_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32, "fp32");
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && k.size(0) == 1 && q.stride(3) == 1 && k.stride(3) == 1 &&
              v.stride(3) == 1, "layout");
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(D % 8 == 0 && H % KVH == 0 && v.size(2) == S, "shape");
  const bool has_mask = mask.numel() > 0;
  // each row's allowed keys, in order
  std::vector<int32_t> keys(T * S);
  std::vector<int64_t> count(T);
  if (has_mask) {
    TORCH_CHECK(mask.dim() == 4 && mask.size(2) == T && mask.size(3) == S, "mask shape");
    // read through the strides (no mask[0][0]: two tensor ops per layer, 60 a step)
    const int64_t st = mask.stride(2), sj = mask.stride(3);
    if (mask.dtype() == torch::kBool) {
      const bool* a = mask.data_ptr<bool>();
      for (int64_t t = 0; t < T; ++t) {
        int64_t c = 0;
        for (int64_t j = 0; j < S; ++j) if (a[t * st + j * sj]) keys[t * S + c++] = j;
        count[t] = c;
      }
    } else {
      TORCH_CHECK(mask.dtype() == torch::kFloat32, "mask dtype");
      const float* a = mask.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) {
        int64_t c = 0;
        for (int64_t j = 0; j < S; ++j) {
          const float x = a[t * st + j * sj];
          if (x == 0.0f) keys[t * S + c++] = j;
          else if (!(x < -1e30f)) return torch::Tensor();
        }
        count[t] = c;
      }
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < S; ++j) keys[t * S + j] = j;
      count[t] = S;
    }
  }
  auto out = torch::empty({1, T, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qh = q.stride(1), qt = q.stride(2), kh = k.stride(1), ks = k.stride(2), vh = v.stride(1),
                vs = v.stride(2), group = H / KVH;
  if (has_avx512() && D % 16 == 0) {  // one work item = one KV head's query heads for one row
    std::atomic<bool> done{true};  // false if this (heads per KV head, head size) has no grouped build
    at::parallel_for(0, KVH * T, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf(group * (S + 16));
      std::vector<const float*> qs(group);
      std::vector<float*> outs(group);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t g = i / T, t = i % T;
        for (int64_t j = 0; j < group; ++j) {
          qs[j] = qp + (g * group + j) * qh + t * qt;
          outs[j] = op + (t * H + g * group + j) * D;
        }
        if (!attend_group_avx512(group, D, qs.data(), kp + g * kh, vp + g * vh, ks, vs, keys.data() + t * S,
                                 count[t], static_cast<float>(scale), buf.data(), outs.data()))
          done.store(false);
      }
    });
    if (done.load()) return out;
  }
  at::parallel_for(0, H * T, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(S + 8);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r / T, t = r % T, g = h / group;
      attend_row(qp + h * qh + t * qt, kp + g * kh, vp + g * vh, ks, vs, keys.data() + t * S, count[t], D,
                 static_cast<float>(scale), buf.data(), op + (t * H + h) * D);
    }
  });
  return out;
}

// ---------------------------------------------------------------- bf16 matmul on AMX tiles
//
// y = x @ w^T with w in bf16 (packed in AMX's pair layout once at load) and x rounded to bf16 here, fp32
// accumulation: the CPU counterpart of a bf16 model's matmuls. AMX multiplies a 16-row tile per instruction,
// so 1 row and 16 rows cost the same: the weight read (half of fp32's bytes) is the whole price, and a PPD
// tree of up to 16 nodes rides on a plain step's cost. Each output element is the same chain of tile
// products over k in order whatever the number of rows, the thread split or which tile register holds it,
// so a row is bit-identical alone and inside a tree.
static bool has_amx() {
  static const bool yes = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    // Linux hands out the 8 KB tile state only to processes that ask for it
    return tile && bf16 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return yes;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

// 16 rows of x (bf16, row stride K) against weight blocks [b0, b1) of 16 outputs; y has row stride N.
// Tiles: 0-3 accumulate four output blocks, 4 holds x, 5-7 the weights.
static void amx_rows16(const uint16_t* xb, const uint16_t* wp, float* y, int64_t K, int64_t N, int64_t b0,
                       int64_t b1) {
  const int64_t KB = K / 32, tile = 512;  // a weight tile: 16 pair rows x 16 outputs x 2 bf16
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const uint16_t* w0 = wp + b * KB * tile;
    for (int64_t kb = 0; kb < KB; ++kb) {
      _tile_loadd(4, xb + kb * 32, K * 2);
      _tile_loadd(5, w0 + kb * tile, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, w0 + (KB + kb) * tile, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, w0 + (2 * KB + kb) * tile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, w0 + (3 * KB + kb) * tile, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, y + b * 16, N * 4); _tile_stored(1, y + b * 16 + 16, N * 4);
    _tile_stored(2, y + b * 16 + 32, N * 4); _tile_stored(3, y + b * 16 + 48, N * 4);
  }
  for (; b < b1; ++b) {
    _tile_zero(0);
    for (int64_t kb = 0; kb < KB; ++kb) {
      _tile_loadd(4, xb + kb * 32, K * 2);
      _tile_loadd(5, wp + (b * KB + kb) * tile, 64);
      _tile_dpbf16ps(0, 4, 5);
    }
    _tile_stored(0, y + b * 16, N * 4);
  }
}

static void linear_amx(const uint16_t* xb, const uint16_t* wp, float* y, int64_t R16, int64_t K, int64_t N) {
  at::parallel_for(0, N / 16, 8, [&](int64_t b0, int64_t b1) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    for (int64_t r = 0; r < R16; r += 16) amx_rows16(xb + r * K, wp, y + r * N, K, N, b0, b1);
    _tile_release();
  });
}

#pragma GCC pop_options

bool amx_available() { return has_amx(); }

// w [N, K] float -> bf16 in AMX's layout: block (n/16, k/32) is 16 rows of (16 outputs x 2 consecutive k).
torch::Tensor amx_pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 16 == 0 && w.size(1) % 32 == 0, "AMX needs N % 16 == K % 32 == 0");
  const int64_t N = w.size(0), K = w.size(1);
  auto wb = w.to(torch::kBFloat16).contiguous().view({N / 16, 16, K / 32, 16, 2});
  return wb.permute({0, 2, 3, 1, 4}).contiguous().view({N, K});
}

torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(has_amx(), "this CPU has no usable AMX");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous 2-D float32");
  TORCH_CHECK(packed.dtype() == torch::kBFloat16 && packed.is_contiguous() && packed.size(1) == x.size(1), "w");
  const int64_t R = x.size(0), K = x.size(1), N = packed.size(0), R16 = (R + 15) / 16 * 16;
  std::vector<uint16_t> xb(R16 * K, 0);  // rows past R stay zero: they only fill the tile
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < R * K; ++i) xb[i] = to_bf16(xp[i]);
  auto y = torch::empty({R16, N}, x.options());
  linear_amx(xb.data(), reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), y.data_ptr<float>(),
             R16, K, N);
  return R16 == R ? y : y.narrow(0, 0, R);
}

// ---------------------------------------------------------------- bf16 dot products (AVX512_BF16, no AMX)
//
// The AMX path's numerics (weights and inputs rounded to bf16, float32 accumulation) on CPUs that have
// AVX512_BF16 but no tiles (AMD Zen 4 / 5, Intel Cooper Lake). One vdpbf16ps does 32 multiply-adds where the
// float32 loop does 16: with packed weights a tree row pays mostly arithmetic, so this halves what each extra
// tree row costs. Same contract as the float32 loop: one accumulator per output over k in order, then the same
// horizontal sum, whatever the number of rows or the thread split, so a row is bit-identical alone or in a tree.
static bool has_avx512_bf16() {
  static const bool yes = [] {
    unsigned a, b, c, d;
    return has_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
  }();
  return yes;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")

static inline __m512bh load_bf16(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// W rows 0..P-1 (bf16, row stride K) against x rows 0..G-1 (bf16): 32 k per instruction
template <int P, int G, bool Prefetch>
static inline void block_bf16(const uint16_t* w, const uint16_t* x, int64_t K, int64_t N, float* y) {
  __m512 acc[P][G];
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < G; ++g) acc[p][g] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[P];
    for (int p = 0; p < P; ++p) {
      if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (p + 2 * P) * K + k), _MM_HINT_T0);
      wv[p] = load_bf16(w + p * K + k);
    }
    for (int g = 0; g < G; ++g) {
      const __m512bh xv = load_bf16(x + g * K + k);
      for (int p = 0; p < P; ++p) acc[p][g] = _mm512_dpbf16_ps(acc[p][g], wv[p], xv);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < G; ++g) y[g * N + p] = _mm512_reduce_add_ps(acc[p][g]);
}

template <int P, bool Prefetch>
static inline void rows_block_bf16(const uint16_t* w, const uint16_t* x, int64_t R, int64_t K, int64_t N, float* y) {
  int64_t r = 0;
  for (; r + 6 <= R; r += 6) block_bf16<P, 6, Prefetch>(w, x + r * K, K, N, y + r * N);
  switch (R - r) {
    case 5: block_bf16<P, 5, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 4: block_bf16<P, 4, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 3: block_bf16<P, 3, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 2: block_bf16<P, 2, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    case 1: block_bf16<P, 1, Prefetch>(w, x + r * K, K, N, y + r * N); break;
    default: break;
  }
}

// float32 -> bf16, round to nearest even (vcvtne2ps2bf16), 32 at a time; n % 32 == 0
static void to_bf16_rows(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 32)
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
}

// bf16 weights [N, K] already in memory (models without GGUF blocks)
static void linear_bf16(const uint16_t* xb, const uint16_t* wb, float* yp, int64_t R, int64_t K, int64_t N) {
  constexpr int64_t P = 4;
  at::parallel_for(0, N / P, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t n = P * b0; n < P * b1; n += P) rows_block_bf16<P, true>(wb + n * K, xb, R, K, N, yp + n);
  });
  for (int64_t n = N - N % P; n < N; ++n) rows_block_bf16<1, true>(wb + n * K, xb, R, K, N, yp + n);
}

// A GGUF block row unpacked to the bf16 of its float32 weights (bf16(d * q + m), the same FMA as unpack_row512),
// which is what prefill multiplies by. A block has only 16 distinct weights, so each block's 16 are computed and
// rounded once (a table) and its 32 nibbles look theirs up (vpermw): a third of the instructions of converting
// every nibble to float, and unpacking is most of what a plain step's matmuls cost.
static void unpack_row_bf16(const Q4Weights& w, int64_t n, uint16_t* out) {
  const uint8_t* qr = w.q + n * w.K / 2;
  const float* sr = w.s + n * w.K / 16;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m512i second_table = _mm512_set1_epi16(16);
  const int64_t blocks = w.K / 32;
  auto table = [&](int64_t b) { return _mm512_fmadd_ps(iota, _mm512_set1_ps(sr[2 * b]), _mm512_set1_ps(sr[2 * b + 1])); };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {  // two blocks: tables in words 0..15 and 16..31 of one register
    const __m512i t = (__m512i)_mm512_cvtne2ps_pbh(table(b + 1), table(b));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + b * 16));
    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    // per block (128-bit lane): weights 0..15 = low nibbles 0-7 then high nibbles 0-7, 16..31 likewise from 8-15
    const __m256i first = _mm256_unpacklo_epi64(lo, hi), second = _mm256_unpackhi_epi64(lo, hi);
    const __m512i i0 = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(first, second, 0x20));
    const __m512i i1 = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_permute2x128_si256(first, second, 0x31)),
                                       second_table);
    _mm512_storeu_si512(out + b * 32, _mm512_permutexvar_epi16(i0, t));
    _mm512_storeu_si512(out + b * 32 + 32, _mm512_permutexvar_epi16(i1, t));
  }
  if (b < blocks) {  // an odd last block
    const __m512 tb = table(b);
    const __m512i t = (__m512i)_mm512_cvtne2ps_pbh(tb, tb);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + b * 16));
    const __m128i m = _mm256_castsi256_si128(nibble);
    const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    const __m512i i0 = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi)));
    _mm512_storeu_si512(out + b * 32, _mm512_permutexvar_epi16(i0, t));
  }
}

static void unpack_row_bf16(const Q8Weights& w, int64_t n, uint16_t* out) {
  const int8_t* qr = w.q + n * w.K;
  const float* sr = w.s + n * w.K / 32;
  for (int64_t k = 0; k < w.K; k += 32) {
    const __m512 d = _mm512_set1_ps(sr[k / 32]);
    const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k))));
    const __m512 second = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k + 16))));
    _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(second, d), _mm512_mul_ps(first, d)));
  }
}

// packed GGUF weights: a strip of 4 rows unpacked to bf16 in L1, then the bf16 loop over all x rows.
// A wide output (the LM head: N = 49152 = 48 x 4096 floats per row) goes to a small per-thread tile first and to y
// a tile row at a time: writing 4 outputs straight into each of > 6 rows of y per strip kept those rows in one L1
// and one L2 set (8 rows through the head cost 2.4 ms against 1.0 for 6; 1.3 with the tile)
template <class W>
static void quant_linear_rows_bf16(const W& w, const uint16_t* xb, float* yp, int64_t R, int64_t K, int64_t N) {
  constexpr int64_t P = 4;
  const bool tiled = N >= 4096;
  const int64_t T = tiled ? 64 : N;  // outputs per tile, a multiple of P (untiled: the whole chunk at once)
  at::parallel_for(0, (N + P - 1) / P, tiled ? T / P : 16, [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> room(P * K + 32);  // 64-byte aligned below: a 512-bit load never spans two lines
    uint16_t* const buf = room.data() + (-reinterpret_cast<uintptr_t>(room.data()) / 2 & 31);
    std::vector<float> tile(tiled ? R * T : 0);
    const int64_t end = std::min(N, P * b1);
    for (int64_t n0 = P * b0; n0 < end; n0 += T) {
      const int64_t width = std::min(T, end - n0);
      // output n of row r goes to out[r * stride + n - n0]
      float* const out = tiled ? tile.data() : yp + n0;
      const int64_t stride = tiled ? T : N;
      for (int64_t n = n0; n < n0 + width; n += P) {
        const int64_t rows = std::min(P, N - n);
        for (int64_t p = n + P; p < std::min(N, n + 2 * P); ++p) w.prefetch_row(p);
        for (int64_t p = 0; p < rows; ++p) unpack_row_bf16(w, n + p, buf + p * K);
        if (rows == P)
          rows_block_bf16<P, false>(buf, xb, R, K, stride, out + (n - n0));
        else
          for (int64_t p = 0; p < rows; ++p) rows_block_bf16<1, false>(buf + p * K, xb, R, K, stride, out + (n - n0) + p);
      }
      if (tiled)
        for (int64_t r = 0; r < R; ++r) std::memcpy(yp + r * N + n0, tile.data() + r * T, width * sizeof(float));
    }
  });
}

#pragma GCC pop_options

// ---------------------------------------------------------------- entry points

std::string isa() { return has_avx512() ? "avx512" : "avx2"; }

torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.dim() == 2, "contiguous 2-D");
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0, "shape");
  auto y = torch::empty({R, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (K % 16 == 0 && has_avx512())
    linear_avx512(xp, wp, yp, R, K, N);
  else
    linear_avx2(xp, wp, yp, R, K, N);
  return y;
}

// Q4_1 (uint8 nibbles, scales d, m) or Q8_0 (int8, scales d) blocks: checks the shapes, runs `run(weights)`
template <class Run>
static void with_blocks(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales, Run run) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous 2-D float32");
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous() && scales.dtype() == torch::kFloat32, "q, scales");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % 32 == 0 && scales.size(0) == N, "shape");
  if (q.dtype() == torch::kUInt8) {
    TORCH_CHECK(q.size(1) * 2 == K && scales.numel() == N * K / 16, "Q4_1 shape");
    run(Q4Weights{q.data_ptr<uint8_t>(), scales.data_ptr<float>(), K});
  } else {
    TORCH_CHECK(q.dtype() == torch::kInt8 && q.size(1) == K && scales.numel() == N * K / 32, "Q8_0 shape");
    run(Q8Weights{q.data_ptr<int8_t>(), scales.data_ptr<float>(), K});
  }
}

// x [R, K] float32 @ dequantised(q, scales)^T, bit-identical to few_rows_linear on the float32 weights
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  const int64_t R = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({R, N}, x.options());
  with_blocks(x, q, scales, [&](const auto& w) { quant_linear_rows(w, x.data_ptr<float>(), y.data_ptr<float>(), R, K, N); });
  return y;
}

bool avx512_bf16_available() { return has_avx512_bf16(); }

static uint16_t* bf16_bits(const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// x rounded to bf16, in torch's 64-byte aligned memory: with K % 32 == 0 every row starts a cache line, so no
// 512-bit load of x spans two (split loads cost up to 2x in the dot loops on Zen 5)
static torch::Tensor rows_to_bf16(const torch::Tensor& x) {
  TORCH_CHECK(has_avx512_bf16(), "this CPU has no AVX512_BF16");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) % 32 == 0,
              "x: contiguous 2-D float32, K % 32 == 0");
  auto xb = torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16));
  to_bf16_rows(x.data_ptr<float>(), x.numel(), bf16_bits(xb));
  return xb;
}

// x [R, K] float32 rounded to bf16 @ w^T, w bf16 [N, K]; float32 accumulation and output
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w) {
  const auto xb = rows_to_bf16(x);
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1), "w");
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({R, N}, x.options());
  linear_bf16(bf16_bits(xb), bf16_bits(w), y.data_ptr<float>(), R, K, N);
  return y;
}

// bf16_linear on the bf16 of the dequantised GGUF blocks, unpacked on the fly
torch::Tensor bf16_quant_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  const auto xb = rows_to_bf16(x);
  const int64_t R = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({R, N}, x.options());
  with_blocks(x, q, scales, [&](const auto& w) { quant_linear_rows_bf16(w, bf16_bits(xb), y.data_ptr<float>(), R, K, N); });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear", &few_rows_linear);
  m.def("quant_linear", &quant_linear);
  m.def("isa", &isa);
  m.def("tree_attention", &tree_attention);
  m.def("rms_norm", &rms_norm);
  m.def("amx_available", &amx_available);
  m.def("amx_pack", &amx_pack);
  m.def("amx_linear", &amx_linear);
  m.def("avx512_bf16_available", &avx512_bf16_available);
  m.def("bf16_linear", &bf16_linear);
  m.def("bf16_quant_linear", &bf16_quant_linear);
}
