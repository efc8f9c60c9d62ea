// Inner loops of the CPU relative-error kernels, written with GCC/Clang vector extensions
// (`vector_size`), so the compiler emits packed instructions of whatever ISA is enabled for the
// code: SSE2 for the portable x86-64 build, AVX2+FMA for the variant chosen at run time.
//
// This file is included more than once by relative_error_kernel.cpp, each time inside a
// different namespace (LSA_ISA_NS) with a vector width in bytes (LSA_VEC_BYTES), the AVX2
// variant under `#pragma GCC target("avx2,fma,f16c")`. It deliberately has no include guard and
// includes nothing (the includer provides <cstdint>, <cstring> and, on x86-64, <immintrin.h>).
//
// Element types are handled through "Tag" structs: `storage` is the type in memory (float,
// double, or uint16_t for float16/bfloat16), `acc` the accumulation type; load()/store() convert
// one element and vload()/vstore() one vector, with branch-free bit manipulation (IEEE exact,
// round-to-nearest-even on the way back, NaN preserved).

#ifndef LSA_ISA_NS
#error "define LSA_ISA_NS and LSA_VEC_BYTES before including span_kernels.h"
#endif

namespace lsa_ext {
namespace cpu {
namespace LSA_ISA_NS {

#define LSA_INLINE inline __attribute__((always_inline))
#define LSA_RESTRICT __restrict__

constexpr int kVecBytes = LSA_VEC_BYTES;
typedef float vf __attribute__((vector_size(kVecBytes)));
typedef double vd __attribute__((vector_size(kVecBytes)));
typedef uint32_t vu __attribute__((vector_size(kVecBytes)));
typedef int32_t vi __attribute__((vector_size(kVecBytes)));
typedef uint16_t vh __attribute__((vector_size(kVecBytes / 2)));  // as many lanes as vf

template <class V, class T>
LSA_INLINE V vload_raw(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V, class T>
LSA_INLINE void vstore_raw(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Non-temporal ("streaming") store of one vector to p, which must be aligned to sizeof(V): the
// data goes to memory without first reading the destination line into the cache. x86-64 only
// (SSE2 movntdq / movnti, AVX vmovntdq); elsewhere an ordinary store. Callers end a run of them
// with stream_fence().
template <class V, class T>
LSA_INLINE void vstream_raw(T* p, const V& v) {
#if defined(__x86_64__)
  if constexpr (sizeof(V) == 32) {
    __m256i x;
    std::memcpy(&x, &v, sizeof x);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
  } else if constexpr (sizeof(V) == 16) {
    __m128i x;
    std::memcpy(&x, &v, sizeof x);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), x);
  } else {
    static_assert(sizeof(V) == 8, "streaming stores of 8, 16 or 32 bytes");
    long long x;
    std::memcpy(&x, &v, sizeof x);
    _mm_stream_si64(reinterpret_cast<long long*>(p), x);
  }
#else
  vstore_raw(p, v);
#endif
}

// Orders earlier streaming stores before any later store (they are weakly ordered).
LSA_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------- scalar conversions (tails)
LSA_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

LSA_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float, exact (the FP16 library's algorithm, also used by c10::Half).
LSA_INLINE float half_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_f32(sign | ((two_w >> 27) == 0 ? f32_to_bits(denormalized)
                                                : f32_to_bits(normalized)));
}

// float -> IEEE half, round to nearest even (FP16 library / c10::Half algorithm).
LSA_INLINE uint16_t f32_to_half(float f) {
  const uint32_t w = f32_to_bits(f);
  float base = bits_to_f32(w & 0x7FFFFFFFu) * 0x1.0p+112f * 0x1.0p-110f;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

LSA_INLINE float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
LSA_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------- vector conversions
// Comparisons are signed on non-negative values (SSE2 has no unsigned compares); a vector
// comparison gives -1 (all bits) or 0 per lane, used as a select mask.
LSA_INLINE vu vselect(vi mask, vu x, vu y) { return (x & (vu)mask) | (y & ~(vu)mask); }

#if defined(LSA_USE_F16C)
// Hardware conversions (F16C): one instruction per vector each way, nearest-even rounding.
static_assert(kVecBytes == 32, "the F16C path expects 8-lane float vectors");
LSA_INLINE vf vhalf_to_f32(vh h) {
  __m128i x;
  std::memcpy(&x, &h, sizeof x);
  const __m256 r = _mm256_cvtph_ps(x);
  vf out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

LSA_INLINE vh vf32_to_half(vf f) {
  __m256 x;
  std::memcpy(&x, &f, sizeof x);
  const __m128i r = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vh out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}
#else
LSA_INLINE vf vhalf_to_f32(vh h) {
  const vu w = __builtin_convertvector(h, vu) << 16;
  const vu sign = w & 0x80000000u;
  const vu two_w = w + w;
  const vf normalized = (vf)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vf denormalized = (vf)((two_w >> 17) | (126u << 23)) - 0.5f;
  const vi tiny = (vi)(two_w >> 27) == 0;
  return (vf)(sign | vselect(tiny, (vu)denormalized, (vu)normalized));
}

LSA_INLINE vh vf32_to_half(vf f) {
  const vu w = (vu)f;
  vf base = (vf)(w & 0x7FFFFFFFu) * 0x1.0p+112f * 0x1.0p-110f;
  const vu shl1_w = w + w;
  const vu sign = w & 0x80000000u;
  vu bias = shl1_w & 0xFF000000u;
  bias = vselect((vi)(bias >> 24) < 0x71, vu{} + 0x71000000u, bias);
  base = (vf)((bias >> 1) + 0x07800000u) + base;
  const vu bits = (vu)base;
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vi nan = (vi)(w & 0x7FFFFFFFu) > 0x7F800000;
  return __builtin_convertvector((sign >> 16) | vselect(nan, vu{} + 0x7E00u, nonsign), vh);
}
#endif

LSA_INLINE vf vbf16_to_f32(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

LSA_INLINE vh vf32_to_bf16(vf f) {
  const vu u = (vu)f;
  const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vi nan = (vi)(u & 0x7FFFFFFFu) > 0x7F800000;
  return __builtin_convertvector(vselect(nan, vu{} + 0x7FC0u, rounded), vh);
}

// ---------------------------------------------------------------- element types
struct F32 {
  using storage = float;
  using acc = float;
  using vec = vf;
  static LSA_INLINE float load(float x) { return x; }
  static LSA_INLINE float store(float x) { return x; }
  static LSA_INLINE vf vload(const float* p) { return vload_raw<vf>(p); }
  static LSA_INLINE void vstore(float* p, vf v) { vstore_raw(p, v); }
  static LSA_INLINE void vstream(float* p, vf v) { vstream_raw(p, v); }
};
struct F64 {
  using storage = double;
  using acc = double;
  using vec = vd;
  static LSA_INLINE double load(double x) { return x; }
  static LSA_INLINE double store(double x) { return x; }
  static LSA_INLINE vd vload(const double* p) { return vload_raw<vd>(p); }
  static LSA_INLINE void vstore(double* p, vd v) { vstore_raw(p, v); }
  static LSA_INLINE void vstream(double* p, vd v) { vstream_raw(p, v); }
};
struct F16 {
  using storage = uint16_t;
  using acc = float;
  using vec = vf;
  static LSA_INLINE float load(uint16_t x) { return half_to_f32(x); }
  static LSA_INLINE uint16_t store(float x) { return f32_to_half(x); }
  static LSA_INLINE vf vload(const uint16_t* p) { return vhalf_to_f32(vload_raw<vh>(p)); }
  static LSA_INLINE void vstore(uint16_t* p, vf v) { vstore_raw(p, vf32_to_half(v)); }
  static LSA_INLINE void vstream(uint16_t* p, vf v) { vstream_raw(p, vf32_to_half(v)); }
};
struct BF16 {
  using storage = uint16_t;
  using acc = float;
  using vec = vf;
  static LSA_INLINE float load(uint16_t x) { return bf16_to_f32(x); }
  static LSA_INLINE uint16_t store(float x) { return f32_to_bf16(x); }
  static LSA_INLINE vf vload(const uint16_t* p) { return vbf16_to_f32(vload_raw<vh>(p)); }
  static LSA_INLINE void vstore(uint16_t* p, vf v) { vstore_raw(p, vf32_to_bf16(v)); }
  static LSA_INLINE void vstream(uint16_t* p, vf v) { vstream_raw(p, vf32_to_bf16(v)); }
};

// ---------------------------------------------------------------- kernels
// Sum of a vector's lanes as a pairwise tree (log2(lanes) dependent adds, not lanes).
template <class V, class T>
LSA_INLINE T hsum(V v) {
  constexpr int kLanes = sizeof(V) / sizeof(T);
  T x[kLanes];
  std::memcpy(x, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int k = 0; k < w; ++k) x[k] += x[k + w];
  }
  return x[0];
}

// The last n < lanes elements at p as a vector, zero-padded (zeros add nothing to the sums).
template <class Tag>
LSA_INLINE typename Tag::vec vload_partial(const typename Tag::storage* p, int64_t n) {
  constexpr int kLanes = sizeof(typename Tag::vec) / sizeof(typename Tag::acc);
  typename Tag::storage buf[kLanes] = {};
  for (int64_t k = 0; k < n; ++k) buf[k] = p[k];
  return Tag::vload(buf);
}

// Squared sums of one contiguous span: d_out = sum (a - b)^2, n_out = sum a^2.
//
// kUnroll independent vector accumulators per sum hide the add latency. Accuracy: the vector
// lanes accumulate blocks of kPerLane elements each in `acc`; each block is then folded and added
// to a double accumulator. A float32 sum thus never adds more than about kPerLane + log2(lanes)
// terms in float, whatever the span's length; a split sample's chunks combine in double. The
// tail (< kUnroll vectors) runs one vector at a time, the last partial vector zero-padded, so
// tiny samples stay vectorised too.
template <class Tag>
LSA_INLINE void span_sums(const typename Tag::storage* LSA_RESTRICT a,
                          const typename Tag::storage* LSA_RESTRICT b, int64_t n, double& d_out,
                          double& n_out) {
  using acc_t = typename Tag::acc;
  using V = typename Tag::vec;
  constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(acc_t));
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = kLanes * kUnroll;
  constexpr int64_t kPerLane = 32;
  constexpr int64_t kBlock = kStep * kPerLane / kUnroll;  // kPerLane elements per lane
  if (n < kLanes) {  // a few elements: scalar
    acc_t dsum = 0, ssum = 0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t x = Tag::load(a[k]);
      const acc_t t = x - Tag::load(b[k]);
      dsum += t * t;
      ssum += x * x;
    }
    d_out = static_cast<double>(dsum);
    n_out = static_cast<double>(ssum);
    return;
  }
  double dd = 0, nn = 0;
  int64_t j = 0;
  while (j + kStep <= n) {
    V d[kUnroll] = {}, s[kUnroll] = {};
    const int64_t stop = n - j < kBlock ? j + (n - j) / kStep * kStep : j + kBlock;
    for (; j < stop; j += kStep) {
      for (int u = 0; u < kUnroll; ++u) {
        const V x = Tag::vload(a + j + u * kLanes);
        const V t = x - Tag::vload(b + j + u * kLanes);
        d[u] += t * t;
        s[u] += x * x;
      }
    }
    dd += static_cast<double>(hsum<V, acc_t>((d[0] + d[1]) + (d[2] + d[3])));
    nn += static_cast<double>(hsum<V, acc_t>((s[0] + s[1]) + (s[2] + s[3])));
  }
  if (j < n) {  // fewer than kStep elements left
    V d = {}, s = {};
    for (; j + kLanes <= n; j += kLanes) {
      const V x = Tag::vload(a + j);
      const V t = x - Tag::vload(b + j);
      d += t * t;
      s += x * x;
    }
    if (j < n) {
      const V x = vload_partial<Tag>(a + j, n - j);
      const V t = x - vload_partial<Tag>(b + j, n - j);
      d += t * t;
      s += x * x;
    }
    dd += static_cast<double>(hsum<V, acc_t>(d));
    nn += static_cast<double>(hsum<V, acc_t>(s));
  }
  d_out = dd;
  n_out = nn;
}

// grad_a = 2 gd (a - b) + 2 gn a, grad_b = -2 gd (a - b): one pass over a and b.
//
// kStream: the vector loop writes ga and gb with streaming stores (for outputs far larger than
// the caches, which are written once and not read back soon: saves reading every destination
// line first). Needs ga and gb equally aligned modulo the store size; a scalar head aligns them,
// and spans where they are not equally aligned use ordinary stores.
template <class Tag, bool kStream>
LSA_INLINE void span_backward(const typename Tag::storage* LSA_RESTRICT a,
                              const typename Tag::storage* LSA_RESTRICT b,
                              typename Tag::storage* LSA_RESTRICT ga,
                              typename Tag::storage* LSA_RESTRICT gb, int64_t n,
                              typename Tag::acc gd, typename Tag::acc gn) {
  using acc_t = typename Tag::acc;
  using V = typename Tag::vec;
  constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(acc_t));
  constexpr uintptr_t kStore = kLanes * sizeof(typename Tag::storage);  // bytes per vector store
  const acc_t two_gd = 2 * gd, two_gn = 2 * gn;
  int64_t j = 0;
  const auto scalar = [&](int64_t k) {
    const acc_t x = Tag::load(a[k]);
    const acc_t t = (x - Tag::load(b[k])) * two_gd;
    ga[k] = Tag::store(t + x * two_gn);
    gb[k] = Tag::store(-t);
  };
  const uintptr_t mis_a = reinterpret_cast<uintptr_t>(ga) % kStore;
  if (kStream && mis_a == reinterpret_cast<uintptr_t>(gb) % kStore &&
      mis_a % sizeof(typename Tag::storage) == 0) {
    for (; j < n && reinterpret_cast<uintptr_t>(ga + j) % kStore != 0; ++j) scalar(j);
    for (; j + kLanes <= n; j += kLanes) {
      const V x = Tag::vload(a + j);
      const V t = (x - Tag::vload(b + j)) * two_gd;
      Tag::vstream(ga + j, t + x * two_gn);
      Tag::vstream(gb + j, -t);
    }
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      const V x = Tag::vload(a + j);
      const V t = (x - Tag::vload(b + j)) * two_gd;
      Tag::vstore(ga + j, t + x * two_gn);
      Tag::vstore(gb + j, -t);
    }
  }
  for (; j < n; ++j) scalar(j);
}

// Non-template entry points, one symbol per dtype, so the ISA variant can be picked at run time;
// `noinline` keeps each loop compiled once, under this namespace's target options. Each call
// handles `count` samples of n elements, `step` elements apart (so tiny samples cost one call
// per work item, not per sample).
#define LSA_ENTRY(NAME, TAG)                                                                    \
  __attribute__((noinline)) void sums_##NAME(const void* a, const void* b, int64_t n,           \
                                             int64_t step, int64_t count, double* d,            \
                                             double* s) {                                       \
    const auto* pa = static_cast<const TAG::storage*>(a);                                       \
    const auto* pb = static_cast<const TAG::storage*>(b);                                       \
    for (int64_t i = 0; i < count; ++i) {                                                       \
      span_sums<TAG>(pa + i * step, pb + i * step, n, d[i], s[i]);                              \
    }                                                                                           \
  }                                                                                             \
  __attribute__((noinline)) void backward_##NAME(const void* a, const void* b, void* ga,        \
                                                 void* gb, int64_t n, int64_t step,             \
                                                 int64_t count, const double* gd,               \
                                                 const double* gn, bool stream) {               \
    const auto* pa = static_cast<const TAG::storage*>(a);                                       \
    const auto* pb = static_cast<const TAG::storage*>(b);                                       \
    auto* pga = static_cast<TAG::storage*>(ga);                                                 \
    auto* pgb = static_cast<TAG::storage*>(gb);                                                 \
    for (int64_t i = 0; i < count; ++i) {                                                       \
      const auto gdi = static_cast<TAG::acc>(gd[i]);                                            \
      const auto gni = static_cast<TAG::acc>(gn[i]);                                            \
      if (stream) {                                                                             \
        span_backward<TAG, true>(pa + i * step, pb + i * step, pga + i * step, pgb + i * step,  \
                                 n, gdi, gni);                                                  \
      } else {                                                                                  \
        span_backward<TAG, false>(pa + i * step, pb + i * step, pga + i * step, pgb + i * step, \
                                  n, gdi, gni);                                                 \
      }                                                                                         \
    }                                                                                           \
    if (stream) stream_fence();                                                                 \
  }

LSA_ENTRY(f32, F32)
LSA_ENTRY(f64, F64)
LSA_ENTRY(f16, F16)
LSA_ENTRY(bf16, BF16)

#undef LSA_ENTRY
#undef LSA_INLINE
#undef LSA_RESTRICT

}  // namespace LSA_ISA_NS
}  // namespace cpu
}  // namespace lsa_ext
