// Expert kernels for the CPU, for kernels/cpu_experts.py (which registers them as the op
// localmoe::expert_pairs): every (token, choice) pair of a MoE layer whose expert has few pairs, as
// kernels/reference.py:expert_pair_outputs computes it.
//
// Pairs are grouped by expert (a slot of the pool, or an expert id of the host stack). An expert with
// fewer than `many` pairs (decode) runs matrix-vector products: its weights are read once, decoded in
// registers, and every pair's dot products accumulate in float32; gate and up rows are computed
// together, so the activation follows at once, then the down rows. Blocks of rows are handed to the
// threads (OpenMP, the runtime torch uses) in turn. Each output is one row's dot product, summed in a
// fixed order: the result depends neither on the thread count, nor on the other pairs of the call, nor
// on where the expert's bytes lie (pool or host). Experts with more pairs (prefill) run in bfloat16 on AMX
// tiles where the CPU has them (tile_prefill), else on vectors (vector_prefill); in float32 and float16
// they are left to the caller, which runs the reference's own matrix products on weights `lm_dequantize`
// decodes exactly as the reference.
//
// Plain C ABI, no torch headers: it compiles in seconds with any C++17 compiler, for the instruction
// set the caller picks (the AVX-512 and AVX2 paths below, else loops the compiler vectorizes).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(LOCALMOE_AMX) && defined(__AVX512BF16__) && defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>  // AMX: whether the CPU has it, and Linux's permission to use it
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// ---------------------------------------------------------------------------------------------------
// Scalar conversions, rounding as PyTorch's (c10's) do

inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

inline float bf16_value(uint16_t bits) { return from_bits(uint32_t(bits) << 16); }

inline uint16_t bf16_bits(float f) {  // round to nearest even, as c10::BFloat16
  if (std::isnan(f)) return 0x7FC0;
  uint32_t bits = to_bits(f);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline float half_value(uint16_t h) {  // exact
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, rest = uint32_t(h & 0x7FFF) << 13;
  if ((h & 0x7C00) == 0x7C00) return from_bits(sign | 0x7F800000 | rest);  // infinity, NaN
  if ((h & 0x7C00) == 0) return from_bits(sign) + (sign ? -1.f : 1.f) * float(h & 0x3FF) * 0x1p-24f;  // subnormal
  return from_bits(sign | (rest + (uint32_t(112) << 23)));
#endif
}

inline uint16_t half_bits(float f) {  // round to nearest even, as c10::Half
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  // the method of FP16 (c10's fp16_ieee_from_fp32_value): scale so that float32 arithmetic rounds
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = to_bits(base), exp_bits = (bits >> 13) & 0x00007C00u, mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

inline float half_at(const uint8_t* p, int64_t i) { return half_value(((const uint16_t*)p)[i]); }

inline float fp8_decoded(uint8_t b) {  // e4m3fn, exact (0x7F and 0xFF are NaN)
  if ((b & 0x7F) == 0x7F) return NAN;
  const int exponent = (b >> 3) & 15, mantissa = b & 7;
  const float magnitude = exponent ? std::ldexp(float(8 + mantissa), exponent - 10) : std::ldexp(float(mantissa), -9);
  return b & 0x80 ? -magnitude : magnitude;
}

struct Fp8Table {  // every e4m3fn value, for scalar reads (NVFP4's block scales)
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) value[b] = fp8_decoded(uint8_t(b));
  }
};
const Fp8Table FP8_VALUES;

inline float fp8_value(uint8_t b) { return FP8_VALUES.value[b]; }

// The compute dtypes: how a value is read, written and rounded
enum Dtype { DT_F32, DT_BF16, DT_F16 };

template <int DT>
struct Num;

template <>
struct Num<DT_F32> {
  using type = float;
  static float get(const void* p, int64_t i) { return ((const float*)p)[i]; }
  static void put(void* p, int64_t i, float v) { ((float*)p)[i] = v; }
  static float round(float v) { return v; }
};

template <>
struct Num<DT_BF16> {
  using type = uint16_t;
  static float get(const void* p, int64_t i) { return bf16_value(((const uint16_t*)p)[i]); }
  static void put(void* p, int64_t i, float v) { ((uint16_t*)p)[i] = bf16_bits(v); }
  static float round(float v) { return bf16_value(bf16_bits(v)); }
};

template <>
struct Num<DT_F16> {
  using type = uint16_t;
  static float get(const void* p, int64_t i) { return half_value(((const uint16_t*)p)[i]); }
  static void put(void* p, int64_t i, float v) { ((uint16_t*)p)[i] = half_bits(v); }
  static float round(float v) { return half_value(half_bits(v)); }
};

// ---------------------------------------------------------------------------------------------------
// W floats at a time

#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int MAX_PAIRS = 4;  // pairs sharing one pass over a row: 2 rows x 4 pairs x 2 accumulators
using F = __m512;
using I = __m512i;
inline F zero() { return _mm512_setzero_ps(); }
inline F set1(float v) { return _mm512_set1_ps(v); }
inline F loadf(const float* p) { return _mm512_loadu_ps(p); }
inline void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
inline F from_bf16(const void* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline F from_f16(const void* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline I bytes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline I andi(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
inline I shr(I a, int n) { return _mm512_srli_epi32(a, n); }
inline F to_float(I a) { return _mm512_cvtepi32_ps(a); }
inline F lookup16(I code, const float* table) { return _mm512_permutexvar_ps(code, _mm512_loadu_ps(table)); }
inline F from_fp8(const uint8_t* p) {  // e4m3fn as float16 bits (subnormals included), 2^-8 times its value
  __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
  __m256i magnitude = _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3F80));
  __m256i sign = _mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16(int16_t(0x8000)));
  return _mm512_cvtph_ps(_mm256_or_si256(magnitude, sign));
}
#elif defined(__AVX2__)
constexpr int W = 8;
constexpr int MAX_PAIRS = 2;  // 16 registers: 2 rows x 2 pairs x 2 accumulators
using F = __m256;
using I = __m256i;
inline F zero() { return _mm256_setzero_ps(); }
inline F set1(float v) { return _mm256_set1_ps(v); }
inline F loadf(const float* p) { return _mm256_loadu_ps(p); }
inline void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline float hsum(F a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline F from_bf16(const void* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline F from_f16(const void* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline I bytes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline I andi(I a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
inline I shr(I a, int n) { return _mm256_srli_epi32(a, n); }
inline F to_float(I a) { return _mm256_cvtepi32_ps(a); }
inline F lookup16(I code, const float* table) {
  F low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), code);  // by the code's low 3 bits
  F high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), code);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  // by bit 3
}
inline F from_fp8(const uint8_t* p) {  // e4m3fn as float16 bits (subnormals included), 2^-8 times its value
  __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)p));
  __m128i magnitude = _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(0x3F80));
  __m128i sign = _mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16(int16_t(0x8000)));
  return _mm256_cvtph_ps(_mm_or_si128(magnitude, sign));
}
#else
// Plain arrays: the compiler vectorizes these loops for whatever the target has.
constexpr int W = 8;
constexpr int MAX_PAIRS = 2;
struct F {
  float v[W];
};
struct I {
  int32_t v[W];
};
#define LANES for (int l = 0; l < W; ++l)
inline F zero() { F r; LANES r.v[l] = 0.f; return r; }
inline F set1(float x) { F r; LANES r.v[l] = x; return r; }
inline F loadf(const float* p) { F r; LANES r.v[l] = p[l]; return r; }
inline void storef(float* p, F a) { LANES p[l] = a.v[l]; }
inline F fmadd(F a, F b, F c) { F r; LANES r.v[l] = std::fma(a.v[l], b.v[l], c.v[l]); return r; }
inline F fnmadd(F a, F b, F c) { F r; LANES r.v[l] = std::fma(-a.v[l], b.v[l], c.v[l]); return r; }
inline F add(F a, F b) { F r; LANES r.v[l] = a.v[l] + b.v[l]; return r; }
inline F sub(F a, F b) { F r; LANES r.v[l] = a.v[l] - b.v[l]; return r; }
inline F mul(F a, F b) { F r; LANES r.v[l] = a.v[l] * b.v[l]; return r; }
inline float hsum(F a) { float s = 0.f; LANES s += a.v[l]; return s; }
inline F from_bf16(const void* p) {
  F r; LANES { uint32_t b = uint32_t(((const uint16_t*)p)[l]) << 16; std::memcpy(&r.v[l], &b, 4); } return r;
}
inline F from_f16(const void* p) { F r; LANES r.v[l] = half_value(((const uint16_t*)p)[l]); return r; }
inline I bytes(const uint8_t* p) { I r; LANES r.v[l] = p[l]; return r; }
inline I andi(I a, int m) { I r; LANES r.v[l] = a.v[l] & m; return r; }
inline I shr(I a, int n) { I r; LANES r.v[l] = int32_t(uint32_t(a.v[l]) >> n); return r; }
inline F to_float(I a) { F r; LANES r.v[l] = float(a.v[l]); return r; }
inline F lookup16(I code, const float* table) { F r; LANES r.v[l] = table[code.v[l] & 15]; return r; }
inline F from_fp8(const uint8_t* p) { F r; LANES r.v[l] = fp8_value(p[l]) * 0x1p-8f; return r; }
#undef LANES
#endif

// ---------------------------------------------------------------------------------------------------
// Weight formats: how one row of one expert's matrix is stored, and how to read it

enum Format { F32, BF16, F16, INT8, INT4, FP8, MXFP4, NVFP4 };

// FP4 (e2m1) values by code, as kernels/quantized.py's FP4_VALUES
alignas(64) constexpr float FP4[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                       -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

struct Row {  // one row of one expert: its weights, and its row of scales and zero points
  const uint8_t* w;
  const uint8_t* s;
  const uint8_t* z;  // zero points (null: symmetric), or NVFP4's scale of the row's part of the matrix
  int64_t scale_type;  // the integers' scales: a Dtype; FP8's: float32, or SCALE_EXPONENTS
  bool divides;  // NVFP4: the part's scale divides the block scales (compressed-tensors), else multiplies
};

// An integer format's scale of group g, in whichever dtype the checkpoint stores it
inline float scale_at(const Row& r, int64_t g) {
  if (r.scale_type == DT_F16) return half_at(r.s, g);
  if (r.scale_type == DT_BF16) return bf16_value(((const uint16_t*)r.s)[g]);
  return ((const float*)r.s)[g];
}

// FP8's multiplier of tile g: float32, or an exponent byte 2^(b - 127) (MXFP8)
constexpr int64_t SCALE_EXPONENTS = 3;
inline float fp8_tile_scale(const Row& r, int64_t g) {
  return r.scale_type == SCALE_EXPONENTS ? std::ldexp(1.f, int(r.s[g]) - 127) : ((const float*)r.s)[g];
}

// Its zero point: stored (float16), or implied by a symmetric format: 2^(bits - 1)
template <int BITS>
inline float zero_at(const Row& r, int64_t g) {
  return r.z ? half_at(r.z, g) : float(1 << (BITS - 1));
}

// NVFP4's scale of a block of 16 columns: its e4m3 scale with the part's float32 scale applied, in
// float32 as kernels/quantized.py computes it
inline float nvfp4_scale(const Row& r, int64_t g) {
  const float block = fp8_value(r.s[g]), part = *(const float*)r.z;
  return r.divides ? block / part : block * part;
}

// Decode<FMT>: V vectors of W consecutive weights per step (nibble formats: the low nibbles, which are
// the even columns, then the high ones); `scales` loads what a block of `block` columns shares.
template <int FMT>
struct Decode;

template <>
struct Decode<F32> {
  static constexpr int V = 1;
  static void scales(const Row&, int64_t, F*) {}
  static void load(const Row& r, int64_t c, const F*, F* w) { w[0] = loadf((const float*)r.w + c); }
  static float at(const Row& r, int64_t c, int64_t) { return ((const float*)r.w)[c]; }
};

template <>
struct Decode<BF16> {
  static constexpr int V = 1;
  static void scales(const Row&, int64_t, F*) {}
  static void load(const Row& r, int64_t c, const F*, F* w) { w[0] = from_bf16((const uint16_t*)r.w + c); }
  static float at(const Row& r, int64_t c, int64_t) { return bf16_value(((const uint16_t*)r.w)[c]); }
};

template <>
struct Decode<F16> {
  static constexpr int V = 1;
  static void scales(const Row&, int64_t, F*) {}
  static void load(const Row& r, int64_t c, const F*, F* w) { w[0] = from_f16((const uint16_t*)r.w + c); }
  static float at(const Row& r, int64_t c, int64_t) { return half_at(r.w, c); }
};

// Group-wise affine (kernels/quantized.py): w = (q - zero) * scale, a scale (float16, bfloat16 or
// float32) and a float16 zero point per group, or no zero points (symmetric: 2^(bits - 1)).
template <>
struct Decode<INT8> {
  static constexpr int V = 1;
  static void scales(const Row& r, int64_t g, F* s) {
    s[0] = set1(scale_at(r, g));
    s[1] = set1(zero_at<8>(r, g));
  }
  static void load(const Row& r, int64_t c, const F* s, F* w) { w[0] = mul(sub(to_float(bytes(r.w + c)), s[1]), s[0]); }
  static float at(const Row& r, int64_t c, int64_t g) { return (float(r.w[c]) - zero_at<8>(r, g)) * scale_at(r, g); }
};

template <>
struct Decode<INT4> {
  static constexpr int V = 2;
  static void scales(const Row& r, int64_t g, F* s) {
    s[0] = set1(scale_at(r, g));
    s[1] = set1(zero_at<4>(r, g));
  }
  static void load(const Row& r, int64_t c, const F* s, F* w) {
    I q = bytes(r.w + c / 2);
    w[0] = mul(sub(to_float(andi(q, 15)), s[1]), s[0]);
    w[1] = mul(sub(to_float(shr(q, 4)), s[1]), s[0]);
  }
  static float at(const Row& r, int64_t c, int64_t g) {
    int q = c % 2 ? r.w[c / 2] >> 4 : r.w[c / 2] & 15;
    return (float(q) - zero_at<4>(r, g)) * scale_at(r, g);
  }
};

// Block-scaled FP8 (e4m3fn bits), a float32 multiplier (or an exponent byte: MXFP8) per tile.
template <>
struct Decode<FP8> {
  static constexpr int V = 1;
  static void scales(const Row& r, int64_t g, F* s) { s[0] = set1(fp8_tile_scale(r, g)); }
  static void load(const Row& r, int64_t c, const F* s, F* w) { w[0] = mul(mul(from_fp8(r.w + c), set1(256.f)), s[0]); }
  static float at(const Row& r, int64_t c, int64_t g) { return fp8_value(r.w[c]) * fp8_tile_scale(r, g); }
};

// MXFP4 (gpt-oss): e2m1 codes, two per byte (low nibble first), a power-of-two exponent per 32 columns.
template <>
struct Decode<MXFP4> {
  static constexpr int V = 2;
  static void scales(const Row& r, int64_t g, F* s) { s[0] = set1(std::ldexp(1.f, int(r.s[g]) - 127)); }
  static void load(const Row& r, int64_t c, const F* s, F* w) {
    I q = bytes(r.w + c / 2);
    w[0] = mul(lookup16(andi(q, 15), FP4), s[0]);
    w[1] = mul(lookup16(shr(q, 4), FP4), s[0]);
  }
  static float at(const Row& r, int64_t c, int64_t g) {
    int q = c % 2 ? r.w[c / 2] >> 4 : r.w[c / 2] & 15;
    return FP4[q] * std::ldexp(1.f, int(r.s[g]) - 127);
  }
};

// NVFP4: e2m1 codes as MXFP4's, an e4m3 scale per 16 columns and a float32 scale per part of the matrix
// (gate, up). A step of 2W columns spans 2W / 16 blocks: lane l holds columns 2l and 2l + 1 of the step,
// so its scale is block g + l / 8's.
template <>
struct Decode<NVFP4> {
  static constexpr int V = 2;
  static void scales(const Row& r, int64_t g, F* s) {
    alignas(64) float lanes[W];
    const float first = nvfp4_scale(r, g), second = W > 8 ? nvfp4_scale(r, g + 1) : first;
    for (int l = 0; l < W; ++l) lanes[l] = l < 8 ? first : second;
    s[0] = loadf(lanes);
  }
  static void load(const Row& r, int64_t c, const F* s, F* w) { Decode<MXFP4>::load(r, c, s, w); }
  static float at(const Row& r, int64_t c, int64_t g) {
    int q = c % 2 ? r.w[c / 2] >> 4 : r.w[c / 2] & 15;
    return FP4[q] * nvfp4_scale(r, g);
  }
};

// One role (gate_up or down) of a stack of experts: [experts, rows, cols] in one format.
struct Matrix {
  const uint8_t *w, *s, *z;  // weights, scales, zero points or NVFP4's part scales (null where none)
  int64_t w_expert, w_row, s_expert, s_row, z_expert, z_row;  // strides in bytes
  int64_t rows, cols, block;  // block: columns sharing a scale (all of them for dense weights)
  int64_t scale_rows, zero_rows;  // weight rows sharing a row of s (FP8's blocks), of z (NVFP4's parts)
  int64_t scale_type, divides;  // Row's

  Row row(int64_t expert, int64_t r) const {
    return {w + expert * w_expert + r * w_row, s ? s + expert * s_expert + r / scale_rows * s_row : nullptr,
            z ? z + expert * z_expert + r / zero_rows * z_row : nullptr, scale_type, divides != 0};
  }
};

constexpr bool nibbles(int format) { return format == INT4 || format == MXFP4 || format == NVFP4; }

// How far ahead of the rows being read the next bytes are asked for. A task's rows of a matrix lie one
// after another, so this runs a few rows ahead along the same stream: the hardware prefetcher alone
// left the quantized matrix-vector products at half the RAM bandwidth (scripts/bench_cpu.py: 4-bit
// decode from 80 to about 100 tok/s on the Qwen3-like shape, 8-bit from 65 to 75).
constexpr int64_t PREFETCH_BYTES = 4096;
inline void read_ahead(const void* p, int64_t byte) { __builtin_prefetch((const char*)p + byte + PREFETCH_BYTES, 0, 3); }
// The byte where column c of a row of `format` starts
constexpr int64_t byte_of(int format, int64_t c) {
  return format == F32 ? 4 * c : format == BF16 || format == F16 ? 2 * c : nibbles(format) ? c / 2 : c;
}

constexpr int chunk_of(int format) { return nibbles(format) ? 2 * W : W; }

// Where column c of an activation vector goes for a vector path that reads codes in chunks of `chunk`
// columns, `ways` interleaved: within each chunk, the columns 0 modulo `ways` first, then 1, ...
inline int64_t deinterleaved(int64_t c, int64_t chunk, int64_t ways) {
  int64_t j = c % chunk;
  return c - j + (j % ways) * (chunk / ways) + j / ways;
}

// ---------------------------------------------------------------------------------------------------
// Dot products of two rows with NP activation vectors (x + p * stride, arranged as `arranged` says)

template <int FMT, int NP>
void dot2(const Matrix& m, const Row& r0, const Row& r1, const float* x, int64_t stride, float* out0, float* out1) {
  using D = Decode<FMT>;
  constexpr int V = D::V;
  F acc0[NP][V], acc1[NP][V];
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < V; ++v) acc0[p][v] = acc1[p][v] = zero();
  const int64_t span = std::max<int64_t>(m.block, V * W);  // columns per load of scales (see Decode<NVFP4>)
  for (int64_t first = 0; first < m.cols; first += span) {
    F s0[2], s1[2];
    D::scales(r0, first / m.block, s0);
    D::scales(r1, first / m.block, s1);
    for (int64_t c = first, end = c + span; c < end; c += V * W) {
      F w0[V], w1[V];
      read_ahead(r0.w, byte_of(FMT, c));
      read_ahead(r1.w, byte_of(FMT, c));
      D::load(r0, c, s0, w0);
      D::load(r1, c, s1, w1);
      for (int p = 0; p < NP; ++p)
        for (int v = 0; v < V; ++v) {
          F xv = loadf(x + p * stride + c + v * W);
          acc0[p][v] = fmadd(w0[v], xv, acc0[p][v]);
          acc1[p][v] = fmadd(w1[v], xv, acc1[p][v]);
        }
    }
  }
  for (int p = 0; p < NP; ++p) {
    F a0 = acc0[p][0], a1 = acc1[p][0];
    if constexpr (V == 2) a0 = add(a0, acc0[p][1]), a1 = add(a1, acc1[p][1]);
    out0[p] = hsum(a0);
    out1[p] = hsum(a1);
  }
}

// For shapes the vector path does not fit (small ragged test shapes): one weight at a time.
template <int FMT>
void dot2_scalar(const Matrix& m, const Row& r0, const Row& r1, const float* x, int64_t stride, int pairs, float* out0, float* out1) {
  for (int p = 0; p < pairs; ++p) {
    float a0 = 0.f, a1 = 0.f;
    for (int64_t c = 0; c < m.cols; ++c) {
      a0 += Decode<FMT>::at(r0, c, c / m.block) * x[p * stride + c];
      a1 += Decode<FMT>::at(r1, c, c / m.block) * x[p * stride + c];
    }
    out0[p] = a0, out1[p] = a1;
  }
}

// `pairs` activation vectors MAX_PAIRS at a time through dot(count, offset) (a dot2 instantiation).
template <class Dot>
inline void in_groups(int pairs, const Dot& dot) {
  for (int p = 0; p < pairs; p += MAX_PAIRS) {
    const int n = std::min(pairs - p, MAX_PAIRS);
    if constexpr (MAX_PAIRS == 4) {
      if (n == 4) dot(std::integral_constant<int, 4>(), p);
      if (n == 3) dot(std::integral_constant<int, 3>(), p);
    }
    if (n == 2) dot(std::integral_constant<int, 2>(), p);
    if (n == 1) dot(std::integral_constant<int, 1>(), p);
  }
}

// The float32 path: activations as float32, weights decoded to float32, fused multiply-adds; for shapes
// no vector fits, one weight at a time.
template <int FMT>
struct FloatPath {
  using X = float;
  static bool vector_fits(const Matrix& m) {  // NVFP4: its 16-column blocks share a vector (Decode<NVFP4>)
    return FMT == NVFP4 ? m.cols % chunk_of(FMT) == 0 : m.block % chunk_of(FMT) == 0;
  }
  static X value(float v) { return v; }
  static int64_t arranged(const Matrix& m, int64_t c) {
    return vector_fits(m) && chunk_of(FMT) == 2 * W ? deinterleaved(c, 2 * W, 2) : c;
  }
  static constexpr bool SUMS = false;
  // rows r0 and r1 of `expert` against `pairs` activation vectors (the bfloat16 path's group sums and
  // scale buffer unused)
  static void rows2(const Matrix& m, int64_t expert, int64_t r0, int64_t r1, const X* x, int64_t stride,
                    const float*, int64_t, float*, int pairs, float* out0, float* out1) {
    Row a = m.row(expert, r0), b = m.row(expert, r1);
    if (!vector_fits(m)) return dot2_scalar<FMT>(m, a, b, x, stride, pairs, out0, out1);
    in_groups(pairs, [&](auto np, int p) { dot2<FMT, decltype(np)::value>(m, a, b, x + p * stride, stride, out0 + p, out1 + p); });
  }
};

#if defined(__AVX512F__)
// The first n % 16 lanes, for a vector loop's last step (all 16 where n is a multiple)
inline __mmask16 head_lanes(int64_t n) { return __mmask16((1u << (n % 16 ? n % 16 : 16)) - 1); }
#endif

// An integer format's scales of a row as float32
inline void integer_scales(const Row& r, int64_t n, float* out) {
  int64_t g = 0;
  if (r.scale_type == DT_F16) {
    for (; g + W <= n; g += W) storef(out + g, from_f16((const uint16_t*)r.s + g));
#if defined(__AVX512F__)
    if (g < n) {  // the last lanes in one masked step
      const __m256i half = _mm256_maskz_loadu_epi16(head_lanes(n), (const uint16_t*)r.s + g);
      _mm512_mask_storeu_ps(out + g, head_lanes(n), _mm512_cvtph_ps(half));
      return;
    }
#endif
  }
  for (; g < n; ++g) out[g] = scale_at(r, g);
}

// The sum of a row's lanes less sum_g scale_g * (zero_g + offset) * sums_g, the zero points float16, or
// all `implied` where there are none: one horizontal sum for both
inline float less_zero_points(F lanes, const float* scales, const uint8_t* zeros, float implied, float offset,
                              const float* sums, int64_t groups) {
  int64_t g = 0;
  for (; g + W <= groups; g += W) {
    const F z = zeros ? from_f16((const uint16_t*)zeros + g) : set1(implied);
    lanes = fnmadd(mul(loadf(scales + g), add(z, set1(offset))), loadf(sums + g), lanes);
  }
#if defined(__AVX512F__)
  if (g < groups) {  // the last groups in one masked step
    const __mmask16 last = head_lanes(groups);
    const F z = zeros ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(last, (const uint16_t*)zeros + g)) : set1(implied);
    const F scaled = _mm512_maskz_mul_ps(last, _mm512_maskz_loadu_ps(last, scales + g), add(z, set1(offset)));
    return hsum(fnmadd(scaled, _mm512_maskz_loadu_ps(last, sums + g), lanes));
  }
#endif
  float total = hsum(lanes);
  for (; g < groups; ++g) total -= scales[g] * ((zeros ? half_at(zeros, g) : implied) + offset) * sums[g];
  return total;
}

// The byte path, for 8-bit integer codes and bfloat16 activations (any instruction set): each code
// widened and converted to float32 exactly, multiplied by the activations as float32, each group's sum
// scaled: sum_g s_g * (sum_{c in g} q_c x_c - zero_g * sum_{c in g} x_c), the zero points through the
// groups' sums of x computed once per vector. Three instructions per W weights (widen, convert,
// multiply-add): vdpbf16ps takes a byte only as two nibbles (a bfloat16 holds 8 significant bits, not
// a byte plus the offset that makes it one by bit operations), which cost twice as many of its
// products, and each of them costs about four multiply-adds on the CPUs that have it.
template <int NP>
void dot2_bytes(const Matrix& m, const Row& r0, const Row& r1, const float* x, int64_t stride, const float* sums,
                int64_t sum_stride, float* scales, float* out0, float* out1) {
  const int64_t groups = m.cols / m.block;
  float *s0 = scales, *s1 = scales + groups + W;
  integer_scales(r0, groups, s0);
  integer_scales(r1, groups, s1);
  F total0[NP], total1[NP];
  for (int p = 0; p < NP; ++p) total0[p] = total1[p] = zero();
  for (int64_t g = 0, c = 0; g < groups; ++g) {
    F acc0[NP][2], acc1[NP][2];
    for (int p = 0; p < NP; ++p) acc0[p][0] = acc0[p][1] = acc1[p][0] = acc1[p][1] = zero();
    for (const int64_t end = c + m.block; c < end; c += 2 * W) {
      read_ahead(r0.w, c);
      read_ahead(r1.w, c);
      const F a[2] = {to_float(bytes(r0.w + c)), to_float(bytes(r0.w + c + W))};
      const F b[2] = {to_float(bytes(r1.w + c)), to_float(bytes(r1.w + c + W))};
      for (int p = 0; p < NP; ++p)
        for (int v = 0; v < 2; ++v) {
          const F xv = loadf(x + p * stride + c + v * W);
          acc0[p][v] = fmadd(a[v], xv, acc0[p][v]);
          acc1[p][v] = fmadd(b[v], xv, acc1[p][v]);
        }
    }
    const F scale0 = set1(s0[g]), scale1 = set1(s1[g]);
    for (int p = 0; p < NP; ++p) {
      total0[p] = fmadd(add(acc0[p][0], acc0[p][1]), scale0, total0[p]);
      total1[p] = fmadd(add(acc1[p][0], acc1[p][1]), scale1, total1[p]);
    }
  }
  for (int p = 0; p < NP; ++p) {
    out0[p] = less_zero_points(total0[p], s0, r0.z, 128.f, 0.f, sums + p * sum_stride, groups);
    out1[p] = less_zero_points(total1[p], s1, r1.z, 128.f, 0.f, sums + p * sum_stride, groups);
  }
}

struct BytePath {
  using X = float;
  static constexpr bool SUMS = true;
  static X value(float v) { return v; }
  static float number(X v) { return v; }
  static bool fits(const Matrix& m) { return m.block % (2 * W) == 0; }  // the block divides the columns
  static int64_t arranged(const Matrix&, int64_t c) { return c; }
  static void rows2(const Matrix& m, int64_t expert, int64_t r0, int64_t r1, const X* x, int64_t stride,
                    const float* sums, int64_t sum_stride, float* scales, int pairs, float* out0, float* out1) {
    Row a = m.row(expert, r0), b = m.row(expert, r1);
    in_groups(pairs, [&](auto np, int p) {
      dot2_bytes<decltype(np)::value>(m, a, b, x + p * stride, stride, sums + p * sum_stride, sum_stride, scales,
                                      out0 + p, out1 + p);
    });
  }
};

#if defined(__AVX512BF16__)
// The bfloat16 path (AVX512-BF16), for bfloat16 activations: products of pairs of bfloat16 summed into
// float32 (vdpbf16ps: exact products, float32 sums). Dense weights go in as they are. Grouped formats
// go in as their codes' values, exact in bfloat16, each group's sum then scaled: sum_g s_g * (sum_{c in
// g} v_c x_c - (zero_g + offset) * sum_{c in g} x_c), the zero points through the groups' sums of x
// computed once per vector. Integer codes become bfloat16 by bit operations alone, two instructions a
// vector, with an offset that the zero points take back: 0x4300 | n is the bfloat16 of 128 + n for a
// nibble n (7 mantissa bits, one unit apart at 128), 0x4500 | n that of 2048 + 16 n; a byte splits into
// its two nibbles, 128 + low and 2048 + 16 high, which sum to 2176 + the byte. The offset costs
// float32 bits in the sums (about 2^-24 of 2176 times the activations), far below bfloat16's rounding.
using BH = __m512bh;  // 32 bfloat16
inline BH bh(__m512i v) { return (BH)v; }
inline BH load_bh(const void* p) { return bh(_mm512_loadu_si512(p)); }
inline BH pack_bh(F low, F high) { return _mm512_cvtne2ps_pbh(high, low); }  // 16 + 16, rounded to nearest even

// (v >> shift) & 15 | base in each 16-bit lane (ternary logic 0xEA: (a & b) | c)
inline BH nibble_bh(__m512i v, int shift, int base) {
  const __m512i low = _mm512_set1_epi16(15), high = _mm512_set1_epi16(int16_t(base));
  return bh(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, shift), low, high, 0xEA));
}

// Per format: STEP columns per step, read as V vectors of 32 bfloat16 codes from 64 bytes; vector v
// multiplies the activations at x_of(v) * 32 of the step, arranged as `arranged` says; `offset` is what
// the codes carry beyond their values.
template <int FMT>
struct Grouped;


// A 16-bit lane i of the 64 bytes holds columns 4i .. 4i + 3 (low nibble first): vector k is column 4i + k
template <>
struct Grouped<INT4> {
  static constexpr int STEP = 128, V = 4;
  static constexpr float offset = 128.f;
  static constexpr int x_of(int v) { return v; }
  static int64_t arranged(int64_t c) { return deinterleaved(c, STEP, 4); }
  static void load(const uint8_t* w, int64_t c, BH* out) {
    const __m512i q = _mm512_loadu_si512(w + c / 2);
    for (int k = 0; k < 4; ++k) out[k] = nibble_bh(q, 4 * k, 0x4300);
  }
  static void scales(const Row& r, int64_t groups, float* s) { integer_scales(r, groups, s); }
};

// A 16-bit lane i holds columns 2i and 2i + 1, a byte each: their low and high nibbles
template <>
struct Grouped<INT8> {
  static constexpr int STEP = 64, V = 4;
  static constexpr float offset = 2176.f;
  static constexpr int x_of(int v) { return v / 2; }
  static int64_t arranged(int64_t c) { return deinterleaved(c, STEP, 2); }
  static void load(const uint8_t* w, int64_t c, BH* out) {
    const __m512i q = _mm512_loadu_si512(w + c);
    for (int k = 0; k < 4; ++k) out[k] = nibble_bh(q, 4 * k, k % 2 ? 0x4500 : 0x4300);
  }
  static void scales(const Row& r, int64_t groups, float* s) { integer_scales(r, groups, s); }
};

// FP4 codes, 64 columns per step from 32 bytes: the low nibbles (even columns) then the high ones,
// through a table of their values; a power-of-two scale per 32 columns
template <>
struct Grouped<MXFP4> {
  static constexpr int STEP = 64, V = 2;
  static constexpr float offset = 0.f;
  static constexpr int x_of(int v) { return v; }
  static int64_t arranged(int64_t c) { return deinterleaved(c, STEP, 2); }
  static void load(const uint8_t* w, int64_t c, BH* out) {
    const __m512i table = (__m512i)pack_bh(loadf(FP4), loadf(FP4));
    __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + c / 2)));
    out[0] = bh(_mm512_permutexvar_epi16(_mm512_and_si512(codes, _mm512_set1_epi16(15)), table));
    out[1] = bh(_mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table));
  }
  static void scales(const Row& r, int64_t blocks, float* s) {  // 2^(e - 127), exactly
    for (int64_t g = 0; g < blocks; ++g) s[g] = std::ldexp(1.f, int(r.s[g]) - 127);
  }
};

// The float lanes of a step's sums each cover STEP / 16 columns (a pair of bfloat16 lanes of every
// vector): groups must hold whole lanes and fit a step, or span whole steps.
template <int FMT>
bool groups_fit(const Matrix& m) {
  constexpr int64_t step = Grouped<FMT>::STEP, lane = step / 16;
  return m.cols % step == 0 && (m.block % step == 0 || (step % m.block == 0 && m.block % lane == 0));
}

template <int FMT, int NP>
void dot2_grouped(const Matrix& m, const Row& r0, const Row& r1, const uint16_t* x, int64_t stride, const float* sums,
                  int64_t sum_stride, float* scales, float* out0, float* out1) {
  using G = Grouped<FMT>;
  constexpr int V = G::V, STEP = G::STEP;
  const int64_t groups = m.cols / m.block;
  float *s0 = scales, *s1 = scales + groups + W;  // each followed by a vector's room (the lanes' loads)
  G::scales(r0, groups, s0);
  G::scales(r1, groups, s1);
  // several groups per step (the block divides STEP: a power of two): float lane j's group is the
  // step's first + j * STEP / 16 / block
  const bool several = m.block < STEP;
  const int64_t groups_per_step = several ? STEP / m.block : 1;  // per pass of the loop below
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i lane_group = _mm512_srl_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(STEP / 16)),
                                              _mm_cvtsi32_si128(several ? __builtin_ctzll(m.block) : 31));
  F total0[NP], total1[NP];
  for (int p = 0; p < NP; ++p) total0[p] = total1[p] = zero();
  for (int64_t c = 0, g = 0; c < m.cols; g += groups_per_step) {
    const int64_t end = c + (several ? STEP : m.block);
    F acc0[NP][2], acc1[NP][2];
    for (int p = 0; p < NP; ++p) acc0[p][0] = acc0[p][1] = acc1[p][0] = acc1[p][1] = zero();
    for (; c < end; c += STEP) {
      BH w0[V], w1[V];
      read_ahead(r0.w, byte_of(FMT, c));
      read_ahead(r1.w, byte_of(FMT, c));
      G::load(r0.w, c, w0);
      G::load(r1.w, c, w1);
      for (int p = 0; p < NP; ++p)
        for (int v = 0; v < V; ++v) {
          BH xv = load_bh(x + p * stride + c + 32 * G::x_of(v));
          acc0[p][v % 2] = _mm512_dpbf16_ps(acc0[p][v % 2], w0[v], xv);
          acc1[p][v % 2] = _mm512_dpbf16_ps(acc1[p][v % 2], w1[v], xv);
        }
    }
    const F scale0 = several ? _mm512_permutexvar_ps(lane_group, loadf(s0 + g)) : set1(s0[g]);
    const F scale1 = several ? _mm512_permutexvar_ps(lane_group, loadf(s1 + g)) : set1(s1[g]);
    for (int p = 0; p < NP; ++p) {
      total0[p] = fmadd(add(acc0[p][0], acc0[p][1]), scale0, total0[p]);
      total1[p] = fmadd(add(acc1[p][0], acc1[p][1]), scale1, total1[p]);
    }
  }
  for (int p = 0; p < NP; ++p) {
    if constexpr (FMT == MXFP4) {
      out0[p] = hsum(total0[p]);
      out1[p] = hsum(total1[p]);
    } else {
      constexpr float implied = FMT == INT8 ? 128.f : 8.f;  // symmetric formats' zero point
      out0[p] = less_zero_points(total0[p], s0, r0.z, implied, G::offset, sums + p * sum_stride, groups);
      out1[p] = less_zero_points(total1[p], s1, r1.z, implied, G::offset, sums + p * sum_stride, groups);
    }
  }
}

template <int NP>
void dot2_dense_bf16(const Matrix& m, const Row& r0, const Row& r1, const uint16_t* x, int64_t stride, float* out0, float* out1) {
  F acc0[NP][2], acc1[NP][2];
  for (int p = 0; p < NP; ++p) acc0[p][0] = acc0[p][1] = acc1[p][0] = acc1[p][1] = zero();
  const uint16_t *w0 = (const uint16_t*)r0.w, *w1 = (const uint16_t*)r1.w;
  for (int64_t c = 0; c < m.cols; c += 64)
    for (int v = 0; v < 2; ++v) {
      read_ahead(w0, 2 * (c + 32 * v));
      read_ahead(w1, 2 * (c + 32 * v));
      BH a = load_bh(w0 + c + 32 * v), b = load_bh(w1 + c + 32 * v);
      for (int p = 0; p < NP; ++p) {
        BH xv = load_bh(x + p * stride + c + 32 * v);
        acc0[p][v] = _mm512_dpbf16_ps(acc0[p][v], a, xv);
        acc1[p][v] = _mm512_dpbf16_ps(acc1[p][v], b, xv);
      }
    }
  for (int p = 0; p < NP; ++p) {
    out0[p] = hsum(add(acc0[p][0], acc0[p][1]));
    out1[p] = hsum(add(acc1[p][0], acc1[p][1]));
  }
}

template <int FMT>
struct Bf16Path {
  using X = uint16_t;  // bfloat16 bits
  static constexpr bool SUMS = FMT == INT8 || FMT == INT4;  // zero points need the groups' sums of x
  static X value(float v) { return bf16_bits(v); }  // exact: v is a bfloat16 already
  static float number(X v) { return bf16_value(v); }
  static bool fits(const Matrix& m) {
    if constexpr (FMT == BF16) return m.cols % 64 == 0;
    else return groups_fit<FMT>(m);
  }
  static int64_t arranged(const Matrix&, int64_t c) {
    if constexpr (FMT == BF16) return c;
    else return Grouped<FMT>::arranged(c);
  }
  static void rows2(const Matrix& m, int64_t expert, int64_t r0, int64_t r1, const X* x, int64_t stride,
                    const float* sums, int64_t sum_stride, float* scales, int pairs, float* out0, float* out1) {
    Row a = m.row(expert, r0), b = m.row(expert, r1);
    in_groups(pairs, [&](auto np, int p) {
      constexpr int n = decltype(np)::value;
      if constexpr (FMT == BF16)
        dot2_dense_bf16<n>(m, a, b, x + p * stride, stride, out0 + p, out1 + p);
      else
        dot2_grouped<FMT, n>(m, a, b, x + p * stride, stride, sums + p * sum_stride, sum_stride, scales, out0 + p,
                             out1 + p);
    });
  }
};
#endif

// Row r of `expert`, dequantized to float32 in natural column order.
template <int FMT>
void dequantize_row(const Matrix& m, int64_t expert, int64_t r, float* out) {
  using D = Decode<FMT>;
  Row row = m.row(expert, r);
  if (!FloatPath<FMT>::vector_fits(m)) {
    for (int64_t c = 0; c < m.cols; ++c) out[c] = D::at(row, c, c / m.block);
    return;
  }
  alignas(64) float part[2][W];
  const int64_t span = std::max<int64_t>(m.block, D::V * W);
  for (int64_t first = 0; first < m.cols; first += span) {
    F s[2];
    D::scales(row, first / m.block, s);
    for (int64_t c = first, end = c + span; c < end; c += D::V * W) {
      F w[D::V];
      D::load(row, c, s, w);
      if constexpr (D::V == 1) {
        storef(out + c, w[0]);
      } else {
        storef(part[0], w[0]), storef(part[1], w[1]);
        for (int l = 0; l < W; ++l) out[c + 2 * l] = part[0][l], out[c + 2 * l + 1] = part[1][l];
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The C interface. Every field is 8 bytes (pointers and int64), so that kernels/cpu_experts.py passes a
// call as one array of int64, in this order.

extern "C" {

struct lm_stack {  // a stack of experts: the pool's slots, or the host's experts by id
  Matrix gate_up, down;  // [experts, 2I, E] and [experts, E, I]
  const uint8_t *gate_up_bias, *down_bias;  // [experts, 2I] and [experts, E] in the compute dtype, or null
  int64_t gate_up_bias_expert, down_bias_expert;  // strides in bytes
  int64_t experts;
};

struct lm_call {
  uint8_t* out;  // [tokens * k, E], rows `out_row` bytes apart
  const uint8_t* x;  // [tokens, E]
  int64_t out_row, x_row, tokens, k, hidden, inter;
  const int64_t* slots;  // [tokens * k]: a slot of the pool, or -1
  const int64_t* ids;  // [tokens * k]: expert ids, for pairs without a slot (null: those are skipped)
  const float* input_scale;  // [tokens * k] or null
  lm_stack pool, host;
  int64_t format, dtype, kind, act;
  int64_t threads, many;  // experts with `many` pairs or more are left to the caller
  int64_t* left;  // out: (0 pool / 1 host, expert) of each expert left, room for tokens * k
  int64_t left_count;  // out
  float alpha, limit, gate_limit;  // the activation's, set from the arguments of lm_expert_pairs
};

}  // extern "C"

namespace {

// ---------------------------------------------------------------------------------------------------
// The activation, rounding to the compute dtype wherever the reference's tensor ops do

enum Kind { GLU, CLAMPED_SWIGLU, CLAMPED_GLU, GLU_CLAMPED_AFTER, SOFTCAPPED_GLU };
enum Act { SILU, GELU, GELU_TANH };

inline float apply(int64_t act, float g) {
  switch (act) {
    case SILU: return g / (1.f + std::exp(-g));
    case GELU: return 0.5f * g * (1.f + std::erf(g * 0.70710678118654752f));
    default: return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
  }
}

inline float softcap(float x, float cap) { return std::tanh(x / cap) * cap; }

template <int DT>
inline float activate(const lm_call& c, float g, float u) {  // g, u: rounded already
  auto rd = Num<DT>::round;
  const float limit = c.limit;
  if (c.kind == SOFTCAPPED_GLU)  // in float32, as the reference, then rounded once
    return rd(softcap(g, c.gate_limit) * (1.f / (1.f + std::exp(-g))) * softcap(u, limit));
  if (c.kind == GLU) return rd(rd(apply(c.act, g)) * u);
  u = rd(std::min(std::max(u, -limit), limit));  // the clamped kinds clamp up alike
  if (c.kind == GLU_CLAMPED_AFTER) return rd(rd(std::min(rd(apply(c.act, g)), limit)) * u);
  g = rd(std::min(g, limit));
  if (c.kind == CLAMPED_SWIGLU) {
    const float sig = rd(1.f / (1.f + std::exp(-rd(g * c.alpha))));
    return rd(rd(g * sig) * rd(u + 1.f));
  }
  return rd(rd(apply(c.act, g)) * u);  // CLAMPED_GLU
}

struct Unit {  // one expert of one stack and the pairs routed to it
  const lm_stack* stack;
  int64_t expert;
  std::vector<int64_t> pairs;
  int64_t first = 0;  // its first row in the pair buffers
};

constexpr int64_t ROW_BLOCK = 64;  // rows per task: long streams, and little read ahead past a task (PREFETCH_BYTES)
constexpr int MAX_PAIRS_PER_UNIT = 64;  // more pairs than this are always left to the caller

// Runs `work(task)` for tasks [0, count) on `threads` threads, each taking the next task when done.
template <class Work>
void share(int64_t count, int64_t threads, const Work& work) {
  std::atomic<int64_t> next{0};
  const int n = int(std::max<int64_t>(1, std::min<int64_t>(count, threads)));
#pragma omp parallel num_threads(n)
  for (int64_t t; (t = next.fetch_add(1)) < count;) work(t);
}

// Each pair's activations summed per group of a matrix's columns (natural order): [pairs, groups].
template <class Path>
std::vector<float> group_sums(const Matrix& m, const typename Path::X* v, int64_t pairs) {
  if constexpr (!Path::SUMS) {
    return {};
  } else {
    const int64_t groups = m.cols / m.block;
    std::vector<float> sums(pairs * groups, 0.f);
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.f;
        for (int64_t c = g * m.block; c < (g + 1) * m.block; ++c) sum += Path::number(v[p * m.cols + Path::arranged(m, c)]);
        sums[p * groups + g] = sum;
      }
    return sums;
  }
}

inline const uint8_t* bias_of(const uint8_t* base, int64_t stride, int64_t expert) {
  return base ? base + expert * stride : nullptr;
}

// The matrix-vector path over `units`: gate/up and activation into h, then down into out.
template <class Path, int FMT, int DT>
void matrix_vector(lm_call& c, std::vector<Unit*>& units) {
  using X = typename Path::X;
  using N = Num<DT>;
  const Matrix& gu = units[0]->stack->gate_up;  // how activations are arranged: the same for every stack
  const Matrix& dn = units[0]->stack->down;
  const int64_t H = c.hidden, I = c.inter, gu_groups = gu.cols / gu.block, dn_groups = dn.cols / dn.block;
  int64_t pairs = 0;
  for (Unit* u : units) u->first = pairs, pairs += int64_t(u->pairs.size());
  // inputs, arranged for gate_up: x of each pair's token, scaled where asked
  std::vector<X> xin(pairs * H), h(pairs * I);
  for (Unit* u : units)
    for (int64_t i = 0; i < int64_t(u->pairs.size()); ++i) {
      const int64_t pair = u->pairs[i];
      const uint8_t* row = c.x + (pair / c.k) * c.x_row;
      X* dst = xin.data() + (u->first + i) * H;
      if constexpr (std::is_same_v<X, typename N::type>) {
        if (!c.input_scale) {  // activations kept as the input stores them: the same bits, rearranged
          for (int64_t e = 0; e < H; ++e) dst[Path::arranged(gu, e)] = ((const X*)row)[e];
          continue;
        }
      }
      for (int64_t e = 0; e < H; ++e) {
        const float v = N::get(row, e);
        dst[Path::arranged(gu, e)] = Path::value(c.input_scale ? N::round(v * c.input_scale[pair]) : v);
      }
    }
  const std::vector<float> x_sums = group_sums<Path>(gu, xin.data(), pairs);
  const int64_t gu_blocks = (I + ROW_BLOCK - 1) / ROW_BLOCK;
  share(int64_t(units.size()) * gu_blocks, c.threads, [&](int64_t task) {
    const Unit& u = *units[task / gu_blocks];
    const int P = int(u.pairs.size());
    const lm_stack& st = *u.stack;
    const uint8_t* bias = bias_of(st.gate_up_bias, st.gate_up_bias_expert, u.expert);
    const float* sums = x_sums.empty() ? nullptr : x_sums.data() + u.first * gu_groups;
    std::vector<float> scales(2 * (gu_groups + W));  // see dot2_grouped
    float gate[MAX_PAIRS_PER_UNIT], up[MAX_PAIRS_PER_UNIT];
    for (int64_t r = (task % gu_blocks) * ROW_BLOCK, end = std::min(I, r + ROW_BLOCK); r < end; ++r) {
      Path::rows2(st.gate_up, u.expert, r, r + I, xin.data() + u.first * H, H, sums, gu_groups, scales.data(), P, gate,
                  up);
      for (int p = 0; p < P; ++p) {
        const float g = N::round(gate[p] + (bias ? N::get(bias, r) : 0.f));
        const float v = N::round(up[p] + (bias ? N::get(bias, r + I) : 0.f));
        h[(u.first + p) * I + Path::arranged(dn, r)] = Path::value(activate<DT>(c, g, v));
      }
    }
  });
  const std::vector<float> h_sums = group_sums<Path>(dn, h.data(), pairs);
  const int64_t dn_blocks = (H + ROW_BLOCK - 1) / ROW_BLOCK;
  share(int64_t(units.size()) * dn_blocks, c.threads, [&](int64_t task) {
    const Unit& u = *units[task / dn_blocks];
    const int P = int(u.pairs.size());
    const lm_stack& st = *u.stack;
    const uint8_t* bias = bias_of(st.down_bias, st.down_bias_expert, u.expert);
    const float* sums = h_sums.empty() ? nullptr : h_sums.data() + u.first * dn_groups;
    std::vector<float> scales(2 * (dn_groups + W));  // see dot2_grouped
    float y0[MAX_PAIRS_PER_UNIT], y1[MAX_PAIRS_PER_UNIT];
    for (int64_t r = (task % dn_blocks) * ROW_BLOCK, end = std::min(H, r + ROW_BLOCK); r < end; r += 2) {
      const int64_t r1 = std::min(r + 1, end - 1);  // an odd last row is computed twice
      Path::rows2(st.down, u.expert, r, r1, h.data() + u.first * I, I, sums, dn_groups, scales.data(), P, y0, y1);
      for (int p = 0; p < P; ++p) {
        uint8_t* o = c.out + u.pairs[p] * c.out_row;
        N::put(o, r, y0[p] + (bias ? N::get(bias, r) : 0.f));
        N::put(o, r1, y1[p] + (bias ? N::get(bias, r1) : 0.f));
      }
    }
  });
}

template <int FMT, int DT>
void run(lm_call& c, std::vector<Unit*>& units) {
  if (units.empty()) return;
  if constexpr (DT == DT_BF16 && FMT == INT8) {
    const lm_stack& st = *units[0]->stack;
    if (BytePath::fits(st.gate_up) && BytePath::fits(st.down)) return matrix_vector<BytePath, FMT, DT>(c, units);
  }
#if defined(__AVX512BF16__)
  if constexpr (DT == DT_BF16 && (FMT == BF16 || FMT == INT8 || FMT == INT4 || FMT == MXFP4)) {
    const lm_stack& st = *units[0]->stack;
    if (Bf16Path<FMT>::fits(st.gate_up) && Bf16Path<FMT>::fits(st.down))
      return matrix_vector<Bf16Path<FMT>, FMT, DT>(c, units);
  }
#endif
  matrix_vector<FloatPath<FMT>, FMT, DT>(c, units);
}

template <int DT>
void run_format(lm_call& c, std::vector<Unit*>& units) {
  switch (c.format) {
    case F32: return run<F32, DT>(c, units);
    case BF16: return run<BF16, DT>(c, units);
    case F16: return run<F16, DT>(c, units);
    case INT8: return run<INT8, DT>(c, units);
    case INT4: return run<INT4, DT>(c, units);
    case FP8: return run<FP8, DT>(c, units);
    case MXFP4: return run<MXFP4, DT>(c, units);
    case NVFP4: return run<NVFP4, DT>(c, units);
  }
}

template <int FMT, int DT>
void dequantize(const Matrix& m, int64_t expert, uint8_t* out, int64_t threads) {
  share((m.rows + ROW_BLOCK - 1) / ROW_BLOCK, threads, [&](int64_t task) {
    std::vector<float> row(m.cols);
    for (int64_t r = task * ROW_BLOCK, end = std::min(m.rows, r + ROW_BLOCK); r < end; ++r) {
      dequantize_row<FMT>(m, expert, r, row.data());
      for (int64_t c = 0; c < m.cols; ++c) Num<DT>::put(out, r * m.cols + c, row[c]);
    }
  });
}

template <int DT>
void dequantize_format(const Matrix& m, int64_t format, int64_t expert, uint8_t* out, int64_t threads) {
  switch (format) {
    case INT8: return dequantize<INT8, DT>(m, expert, out, threads);
    case INT4: return dequantize<INT4, DT>(m, expert, out, threads);
    case FP8: return dequantize<FP8, DT>(m, expert, out, threads);
    case MXFP4: return dequantize<MXFP4, DT>(m, expert, out, threads);
    case NVFP4: return dequantize<NVFP4, DT>(m, expert, out, threads);
  }
}


// ---------------------------------------------------------------------------------------------------
// Weight rows decoded to bfloat16 for the prefill paths, each weight exactly the reference's

#if defined(__AVX512BF16__)
constexpr int64_t TILE_COLS = 32;  // bfloat16 columns per 64 bytes: one row of a tile, one vdpbf16ps

alignas(64) constexpr float IOTA[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};  // INT4 codes

// A row of 4-bit codes (INT4, MXFP4; groups of whole 32 columns) as bfloat16 through a table per group:
// its 16 weights, each computed as the reference does (float32, rounded once), looked up by code.
template <int FMT>
void bf16_row_nibbles(const Matrix& m, const Row& row, uint16_t* out) {
  const __m512i low = _mm512_set1_epi32(0x0F), high = _mm512_set1_epi32(0xF0);
  for (int64_t g = 0; g < m.cols / m.block; ++g) {
    F values;
    if constexpr (FMT == INT4)
      values = mul(sub(loadf(IOTA), set1(zero_at<4>(row, g))), set1(scale_at(row, g)));
    else
      values = mul(loadf(FP4), set1(std::ldexp(1.f, int(row.s[g]) - 127)));
    const __m512i table = _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
    for (int64_t c = g * m.block, end = c + m.block; c < end; c += TILE_COLS) {
      read_ahead(row.w, c / 2);
      // byte b of 16 as the codes of columns 2b and 2b + 1, one 16-bit word each
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row.w + c / 2)));
      const __m512i codes = _mm512_or_si512(_mm512_and_si512(b, low), _mm512_slli_epi32(_mm512_and_si512(b, high), 12));
      _mm512_storeu_si512(out + c, _mm512_permutexvar_epi16(codes, table));
    }
  }
}

// Row r of `expert` as bfloat16, exactly the reference's dequantized weight (float32, rounded once)
template <int FMT>
void bf16_row(const Matrix& m, int64_t expert, int64_t r, uint16_t* out) {
  using D = Decode<FMT>;
  Row row = m.row(expert, r);
  if constexpr (FMT == INT4 || FMT == MXFP4) {
    if (m.block % TILE_COLS == 0) return bf16_row_nibbles<FMT>(m, row, out);
  }
  if (!FloatPath<FMT>::vector_fits(m) || m.cols % (2 * W) != 0) {
    for (int64_t c = 0; c < m.cols; ++c) out[c] = bf16_bits(D::at(row, c, c / m.block));
    return;
  }
  // a nibble format's 32 columns come as the low nibbles (even columns), then the high ones
  const __m512i in_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                            6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t span = std::max<int64_t>(m.block, 2 * W);  // as dequantize_row
  for (int64_t first = 0; first < m.cols; first += span) {
    F s[2];
    D::scales(row, first / m.block, s);
    for (int64_t c = first, end = c + span; c < end; c += 2 * W) {
      read_ahead(row.w, byte_of(FMT, c));
      F w[2];
      D::load(row, c, s, w);
      if constexpr (D::V == 2) {
        _mm512_storeu_si512(out + c, _mm512_permutexvar_epi16(in_order, (__m512i)pack_bh(w[0], w[1])));
      } else {
        D::load(row, c + W, s, w + 1);
        _mm512_storeu_si512(out + c, (__m512i)pack_bh(w[0], w[1]));
      }
    }
  }
}

#endif

// ---------------------------------------------------------------------------------------------------
// Prefill on AMX (Intel's tile units): experts with `many` pairs or more, in bfloat16, every format.
//
// An expert's weight rows are the left tiles as they lie (bfloat16) or decoded 16 rows at a time into a
// buffer the core keeps in cache (every other format: each weight exactly as the reference dequantizes
// it, float32 arithmetic rounded once to bfloat16), and the pairs' activations the right tiles, 16
// pairs per tile, arranged once per expert in pairs of columns (the tiles' layout). Each output sums its
// columns 32 at a time in one order, in float32: like the matrix-vector path it depends neither on the
// thread count nor on the other pairs, and it differs from the reference's oneDNN products by float32
// summation order only. Where the CPU or the kernel lack AMX, vector_prefill takes these experts.
#if defined(LOCALMOE_AMX) && defined(__AVX512BF16__) && defined(__linux__) && defined(__x86_64__)

// Whether this CPU has AMX tiles with bfloat16 products and Linux lets this process use them (it must
// ask once: the tile state is large).
bool amx_usable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return usable;
}

constexpr int TILE = 16;  // rows of a tile: 16 weight rows, or 16 pairs; TILE_COLS bfloat16 columns each

struct TileConfig {  // the 64 bytes of ldtilecfg, palette 1: every tile 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) bytes_per_row[t] = 64, rows[t] = TILE;
  }
};

// Tiles 0-3 accumulate (a0, b0), (a1, b0), (a0, b1), (a1, b1) over `cols` columns, then go to c, 16 x 16
// float32 each: 16 weight rows of a0 and of a1 (rows `a0_row`, `a1_row` bytes apart) by 16 pairs of b0 and
// of b1 (arranged as `arranged_pair` says). NB: one or two tiles of pairs.
template <int NB>
__attribute__((target("amx-tile,amx-bf16"))) void tile_products(const uint16_t* a0, int64_t a0_row, const uint16_t* a1,
                                                                  int64_t a1_row, const uint16_t* b0, const uint16_t* b1,
                                                                  int64_t cols, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < cols; k += TILE_COLS) {
    _tile_loadd(4, a0 + k, a0_row);
    _tile_loadd(5, a1 + k, a1_row);
    _tile_loadd(6, b0 + k * TILE, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, b1 + k * TILE, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if constexpr (NB == 2) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

__attribute__((target("amx-tile"))) void tiles_configured(const TileConfig& config) { _tile_loadconfig(&config); }
__attribute__((target("amx-tile"))) void tiles_released() { _tile_release(); }

// Where column `col` of pair `p` goes among a unit's arranged activations (`cols` columns): per 16 pairs,
// per 32 columns, 16 rows of 16 pairs x 2 consecutive columns (the right tile's layout)
inline int64_t arranged_pair(int64_t p, int64_t col, int64_t cols) {
  return (p / TILE) * cols * TILE + (col / 2) * 2 * TILE + (p % TILE) * 2 + (col & 1);
}

// Rows [r, r + TILE) of `expert` as bfloat16: where they lie (bfloat16 weights), else decoded into
// `buffer`. Sets their stride in bytes.
template <int FMT>
const uint16_t* tile_rows(const Matrix& m, int64_t expert, int64_t r, uint16_t* buffer, int64_t* row_bytes) {
  if constexpr (FMT == BF16) {
    *row_bytes = m.w_row;
    return (const uint16_t*)m.row(expert, r).w;
  }
  for (int i = 0; i < TILE; ++i) bf16_row<FMT>(m, expert, r + i, buffer + i * m.cols);
  *row_bytes = 2 * m.cols;
  return buffer;
}

inline int64_t tiles_of(int64_t n) { return (n + TILE - 1) / TILE; }

constexpr int64_t TASK_ROWS = 64;  // weight rows per task

// Experts with this many pairs or more go to tile_prefill where it takes the call: from 4 on, tiles beat
// the matrix-vector path (scripts/bench_cpu.py's Qwen3-like prefill, 64 tokens, about 4 pairs per expert:
// 4-bit 856 -> 916 tok/s, 8-bit 752 -> 834 with 4 rather than 8).
constexpr int64_t TILE_PAIRS = 4;

// Whether tile_prefill takes the calls that prefill_fits: AMX usable.
bool tiles_usable() { return amx_usable(); }

// Each unit's output rows [0, rows) in blocks of TASK_ROWS handed to the threads in turn, each block run
// as work(unit, first row, past its last row) with the tiles configured.
template <class Work>
void tile_tasks(const std::vector<Unit*>& units, int64_t rows, int64_t threads, const Work& work) {
  const TileConfig config;
  const int64_t tasks = rows / TASK_ROWS + (rows % TASK_ROWS != 0);
  share(int64_t(units.size()) * tasks, threads, [&](int64_t task) {
    const int64_t first = (task % tasks) * TASK_ROWS;
    tiles_configured(config);
    work(*units[task / tasks], first, std::min(rows, first + TASK_ROWS));
    tiles_released();
  });
}

// The pairs of `units` (bfloat16 activations): gate/up and the activation into h, then down into out, as
// matrix_vector computes them, with tiles.
template <int FMT>
void tile_prefill(lm_call& c, std::vector<Unit*>& units) {
  using N = Num<DT_BF16>;
  const int64_t H = c.hidden, I = c.inter;
  int64_t padded = 0;  // pairs, each unit's rounded up to whole tiles
  for (Unit* u : units) u->first = padded, padded += tiles_of(int64_t(u->pairs.size())) * TILE;
  std::vector<uint16_t> xin(padded * H, 0), h(padded * I, 0);
  for (Unit* u : units)
    for (int64_t i = 0; i < int64_t(u->pairs.size()); ++i) {
      const int64_t pair = u->pairs[i];
      const uint8_t* row = c.x + (pair / c.k) * c.x_row;
      uint16_t* dst = xin.data() + u->first * H;
      for (int64_t e = 0; e < H; ++e) {
        const float v = N::get(row, e);
        dst[arranged_pair(i, e, H)] = bf16_bits(c.input_scale ? N::round(v * c.input_scale[pair]) : v);
      }
    }
  tile_tasks(units, I, c.threads, [&](const Unit& u, int64_t first, int64_t last) {
    const int64_t P = int64_t(u.pairs.size());
    const lm_stack& st = *u.stack;
    const uint8_t* bias = bias_of(st.gate_up_bias, st.gate_up_bias_expert, u.expert);
    thread_local std::vector<uint16_t> buffer;
    buffer.resize(2 * TILE * H);
    alignas(64) float out[4][TILE][TILE];
    for (int64_t r = first; r < last; r += TILE) {
      int64_t gate_row, up_row;
      const uint16_t* gate = tile_rows<FMT>(st.gate_up, u.expert, r, buffer.data(), &gate_row);
      const uint16_t* up = tile_rows<FMT>(st.gate_up, u.expert, I + r, buffer.data() + TILE * H, &up_row);
      for (int64_t p0 = 0; p0 < P; p0 += 2 * TILE) {
        const uint16_t* b = xin.data() + (u.first + p0) * H;
        if (P - p0 > TILE)
          tile_products<2>(gate, gate_row, up, up_row, b, b + TILE * H, H, &out[0][0][0]);
        else
          tile_products<1>(gate, gate_row, up, up_row, b, b, H, &out[0][0][0]);
        for (int64_t p = p0; p < std::min(P, p0 + 2 * TILE); ++p) {
          const int t = int(p - p0) / TILE * 2;  // gate's tile for this pair, then up's
          for (int64_t i = 0; i < TILE; ++i) {
            const float g = N::round(out[t][i][p % TILE] + (bias ? N::get(bias, r + i) : 0.f));
            const float v = N::round(out[t + 1][i][p % TILE] + (bias ? N::get(bias, I + r + i) : 0.f));
            h[u.first * I + arranged_pair(p, r + i, I)] = bf16_bits(activate<DT_BF16>(c, g, v));
          }
        }
      }
    }
  });
  tile_tasks(units, H, c.threads, [&](const Unit& u, int64_t first, int64_t last) {
    const int64_t P = int64_t(u.pairs.size());
    const lm_stack& st = *u.stack;
    const uint8_t* bias = bias_of(st.down_bias, st.down_bias_expert, u.expert);
    thread_local std::vector<uint16_t> buffer;
    buffer.resize(2 * TILE * I);
    alignas(64) float out[4][TILE][TILE];
    for (int64_t r = first; r < last; r += 2 * TILE) {
      int64_t row0, row1;
      const uint16_t* a0 = tile_rows<FMT>(st.down, u.expert, r, buffer.data(), &row0);
      const uint16_t* a1 = tile_rows<FMT>(st.down, u.expert, r + TILE, buffer.data() + TILE * I, &row1);
      for (int64_t p0 = 0; p0 < P; p0 += 2 * TILE) {
        const uint16_t* b = h.data() + (u.first + p0) * I;
        if (P - p0 > TILE)
          tile_products<2>(a0, row0, a1, row1, b, b + TILE * I, I, &out[0][0][0]);
        else
          tile_products<1>(a0, row0, a1, row1, b, b, I, &out[0][0][0]);
        for (int64_t p = p0; p < std::min(P, p0 + 2 * TILE); ++p) {
          uint8_t* o = c.out + u.pairs[p] * c.out_row;
          const int t = int(p - p0) / TILE * 2;
          for (int64_t i = 0; i < 2 * TILE; ++i)
            N::put(o, r + i, out[t + i / TILE][i % TILE][p % TILE] + (bias ? N::get(bias, r + i) : 0.f));
        }
      }
    }
  });
}

// `units` through tile_prefill, in a call prefill_fits
void tile_prefill_format(lm_call& c, std::vector<Unit*>& units) {
  switch (c.format) {
    case BF16: return tile_prefill<BF16>(c, units);
    case INT8: return tile_prefill<INT8>(c, units);
    case INT4: return tile_prefill<INT4>(c, units);
    case FP8: return tile_prefill<FP8>(c, units);
    case MXFP4: return tile_prefill<MXFP4>(c, units);
    case NVFP4: return tile_prefill<NVFP4>(c, units);
  }
}
#else
constexpr int64_t TILE_PAIRS = 0;
bool tiles_usable() { return false; }
void tile_prefill_format(lm_call&, std::vector<Unit*>&) {}
#endif

// ---------------------------------------------------------------------------------------------------
// Prefill without AMX: experts with VECTOR_PAIRS pairs or more, in bfloat16, in the formats tile_prefill
// reads, on the CPUs without tiles (AVX512-BF16: AMD Zen 4 and 5; AVX-512 or AVX2 alone: most others).
//
// As tile_prefill, one pass per expert over its weights: ROWS rows at a time decoded into a buffer that
// stays in the first-level cache (each weight exactly the reference's bfloat16 value; bfloat16 weights
// read where they lie), then multiplied with every pair's activations, ROWS rows by a few pairs a step,
// so that each loaded row vector serves several pairs and each activation vector several rows. With
// AVX512-BF16 the products are vdpbf16ps on bfloat16 (Bf16Rows); elsewhere fused multiply-adds on the
// same values in float32, where the products of two bfloat16 are exact (FloatRows). Each output has its
// own float32 accumulator vector, summed along the row in one order and then across its lanes: like the
// other paths it depends neither on the thread count nor on the other pairs, and differs from the
// reference's products by float32 summation order only. The dequantize-then-ATen path it replaces cost a
// fresh tensor per expert (page faults) and a second pass over RAM.

constexpr int ROWS = 4;  // weight rows per step

// Experts with this many pairs or more take the vector prefill where it fits. Below it the matrix-vector
// path is faster: its bfloat16 path reads 4-bit codes without decoding them into a buffer (one thread,
// 64 tokens top-2 of 32 experts of 2048 x 768, 4-bit: 22 ms from 4 pairs, 19 ms from 8, 19 from 12 or 16).
// Not above the caller's MANY_PAIRS (8), from which the matrix-vector path leaves experts to the caller.
constexpr int64_t VECTOR_PAIRS = 8;

// Whether a call's experts with many pairs can take a prefill path: bfloat16, a format the paths decode,
// widths in whole 32 columns (a tile's row, a bfloat16 vector).
bool prefill_fits(const lm_call& c) {
  const bool format = c.format == BF16 || c.format == INT8 || c.format == INT4 || c.format == FP8 ||
                      c.format == MXFP4 || c.format == NVFP4;
  return c.dtype == DT_BF16 && format && c.hidden % 32 == 0 && c.inter % 32 == 0;
}

#if defined(__AVX512BF16__)
struct Bf16Rows {
  using T = uint16_t;
  static constexpr int PAIRS = 4;  // pairs per step: 16 accumulators, 4 row vectors, one activation vector (6: no faster)
  static T value(float v) { return bf16_bits(v); }  // v: a bfloat16 value already
  // rows [r, r + ROWS) of `expert`: where they lie (bfloat16), else decoded into `buffer`; their stride
  template <int FMT>
  static const T* rows(const Matrix& m, int64_t expert, int64_t r, T* buffer, int64_t* stride) {
    if constexpr (FMT == BF16) {
      *stride = m.w_row / 2;
      return (const T*)m.row(expert, r).w;
    }
    for (int i = 0; i < ROWS; ++i) bf16_row<FMT>(m, expert, r + i, buffer + i * m.cols);
    *stride = m.cols;
    return buffer;
  }
  // out[i * out_stride + p] = row i of a . pair p of b, for ROWS rows and NP pairs
  template <int NP>
  static void products(const T* a, int64_t a_stride, const T* b, int64_t cols, float* out, int64_t out_stride) {
    __m512 acc[ROWS][NP];
    for (int i = 0; i < ROWS; ++i)
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += TILE_COLS) {
      BH w[ROWS];
      for (int i = 0; i < ROWS; ++i) w[i] = load_bh(a + i * a_stride + c);
      for (int p = 0; p < NP; ++p) {
        const BH x = load_bh(b + p * cols + c);
        for (int i = 0; i < ROWS; ++i) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], w[i], x);
      }
    }
    for (int i = 0; i < ROWS; ++i)
      for (int p = 0; p < NP; ++p) out[i * out_stride + p] = _mm512_reduce_add_ps(acc[i][p]);
  }
};
#endif

struct FloatRows {
  using T = float;
  static constexpr int PAIRS = MAX_PAIRS;  // as the matrix-vector path: what the registers hold
  static T value(float v) { return v; }
  template <int FMT>
  static const T* rows(const Matrix& m, int64_t expert, int64_t r, T* buffer, int64_t* stride) {
    for (int i = 0; i < ROWS; ++i) {
      float* row = buffer + i * m.cols;
      dequantize_row<FMT>(m, expert, r + i, row);
      if constexpr (FMT != BF16)  // the reference's weight: float32, rounded once to bfloat16
        for (int64_t c = 0; c < m.cols; ++c) row[c] = Num<DT_BF16>::round(row[c]);
    }
    *stride = m.cols;
    return buffer;
  }
  template <int NP>
  static void products(const T* a, int64_t a_stride, const T* b, int64_t cols, float* out, int64_t out_stride) {
    F acc[ROWS][NP];
    for (int i = 0; i < ROWS; ++i)
      for (int p = 0; p < NP; ++p) acc[i][p] = zero();
    for (int64_t c = 0; c < cols; c += W) {
      F w[ROWS];
      for (int i = 0; i < ROWS; ++i) w[i] = loadf(a + i * a_stride + c);
      for (int p = 0; p < NP; ++p) {
        const F x = loadf(b + p * cols + c);
        for (int i = 0; i < ROWS; ++i) acc[i][p] = fmadd(w[i], x, acc[i][p]);
      }
    }
    for (int i = 0; i < ROWS; ++i)
      for (int p = 0; p < NP; ++p) out[i * out_stride + p] = hsum(acc[i][p]);
  }
};

// K::products for n pairs, n <= NP
template <class K, int NP>
inline void pairs_step(int n, const typename K::T* a, int64_t a_stride, const typename K::T* b, int64_t cols,
                       float* out, int64_t out_stride) {
  if constexpr (NP > 0) {
    if (n == NP) return K::template products<NP>(a, a_stride, b, cols, out, out_stride);
    pairs_step<K, NP - 1>(n, a, a_stride, b, cols, out, out_stride);
  }
}

// ROWS rows of `a` against `pairs` activation vectors of `cols` columns (b, one after another), K::PAIRS
// at a time: out[i * pairs + p]
template <class K>
void row_products(const typename K::T* a, int64_t a_stride, const typename K::T* b, int64_t pairs, int64_t cols,
                  float* out) {
  for (int64_t p = 0; p < pairs; p += K::PAIRS) {
    const int n = int(std::min<int64_t>(pairs - p, K::PAIRS));
    pairs_step<K, K::PAIRS>(n, a, a_stride, b + p * cols, cols, out + p, pairs);
  }
}

// The pairs of `units` (bfloat16 activations): gate/up and the activation into h, then down into out, as
// matrix_vector computes them, ROWS weight rows at a time.
template <class K, int FMT>
void vector_prefill(lm_call& c, std::vector<Unit*>& units) {
  using N = Num<DT_BF16>;
  using T = typename K::T;
  const int64_t H = c.hidden, I = c.inter;
  int64_t pairs = 0;
  for (Unit* u : units) u->first = pairs, pairs += int64_t(u->pairs.size());
  std::vector<T> xin(pairs * H), h(pairs * I);
  for (Unit* u : units)
    for (int64_t i = 0; i < int64_t(u->pairs.size()); ++i) {
      const int64_t pair = u->pairs[i];
      const uint8_t* row = c.x + (pair / c.k) * c.x_row;
      T* dst = xin.data() + (u->first + i) * H;
      for (int64_t e = 0; e < H; ++e) {
        const float v = N::get(row, e);
        dst[e] = K::value(c.input_scale ? N::round(v * c.input_scale[pair]) : v);
      }
    }
  const int64_t gu_tasks = (I + ROW_BLOCK - 1) / ROW_BLOCK;
  share(int64_t(units.size()) * gu_tasks, c.threads, [&](int64_t task) {
    const Unit& u = *units[task / gu_tasks];
    const int64_t P = int64_t(u.pairs.size());
    const lm_stack& st = *u.stack;
    const uint8_t* bias = bias_of(st.gate_up_bias, st.gate_up_bias_expert, u.expert);
    thread_local std::vector<T> buffer;
    thread_local std::vector<float> out;
    buffer.resize(2 * ROWS * H), out.resize(2 * ROWS * P);
    for (int64_t r = (task % gu_tasks) * ROW_BLOCK, end = std::min(I, r + ROW_BLOCK); r < end; r += ROWS) {
      int64_t gate_stride, up_stride;
      const T* gate = K::template rows<FMT>(st.gate_up, u.expert, r, buffer.data(), &gate_stride);
      const T* up = K::template rows<FMT>(st.gate_up, u.expert, I + r, buffer.data() + ROWS * H, &up_stride);
      row_products<K>(gate, gate_stride, xin.data() + u.first * H, P, H, out.data());
      row_products<K>(up, up_stride, xin.data() + u.first * H, P, H, out.data() + ROWS * P);
      for (int64_t p = 0; p < P; ++p)
        for (int i = 0; i < ROWS; ++i) {
          const float g = N::round(out[i * P + p] + (bias ? N::get(bias, r + i) : 0.f));
          const float v = N::round(out[(ROWS + i) * P + p] + (bias ? N::get(bias, I + r + i) : 0.f));
          h[(u.first + p) * I + r + i] = K::value(activate<DT_BF16>(c, g, v));
        }
    }
  });
  const int64_t dn_tasks = (H + ROW_BLOCK - 1) / ROW_BLOCK;
  share(int64_t(units.size()) * dn_tasks, c.threads, [&](int64_t task) {
    const Unit& u = *units[task / dn_tasks];
    const int64_t P = int64_t(u.pairs.size());
    const lm_stack& st = *u.stack;
    const uint8_t* bias = bias_of(st.down_bias, st.down_bias_expert, u.expert);
    thread_local std::vector<T> buffer;
    thread_local std::vector<float> out;
    buffer.resize(ROWS * I), out.resize(ROWS * P);
    for (int64_t r = (task % dn_tasks) * ROW_BLOCK, end = std::min(H, r + ROW_BLOCK); r < end; r += ROWS) {
      int64_t stride;
      const T* rows = K::template rows<FMT>(st.down, u.expert, r, buffer.data(), &stride);
      row_products<K>(rows, stride, h.data() + u.first * I, P, I, out.data());
      for (int64_t p = 0; p < P; ++p) {
        uint8_t* o = c.out + u.pairs[p] * c.out_row;
        for (int i = 0; i < ROWS; ++i) N::put(o, r + i, out[i * P + p] + (bias ? N::get(bias, r + i) : 0.f));
      }
    }
  });
}

// `units` through vector_prefill, in a call prefill_fits
template <class K>
void vector_prefill_format(lm_call& c, std::vector<Unit*>& units) {
  switch (c.format) {
    case BF16: return vector_prefill<K, BF16>(c, units);
    case INT8: return vector_prefill<K, INT8>(c, units);
    case INT4: return vector_prefill<K, INT4>(c, units);
    case FP8: return vector_prefill<K, FP8>(c, units);
    case MXFP4: return vector_prefill<K, MXFP4>(c, units);
    case NVFP4: return vector_prefill<K, NVFP4>(c, units);
  }
}

// The experts with many pairs of a call prefill_fits: on tiles where AMX is usable, else vector_prefill
void prefill(lm_call& c, std::vector<Unit*>& units) {
  if (tiles_usable()) return tile_prefill_format(c, units);
#if defined(__AVX512BF16__)
  vector_prefill_format<Bf16Rows>(c, units);
#else
  vector_prefill_format<FloatRows>(c, units);
#endif
}

}  // namespace

extern "C" {

// The pairs of experts with fewer than `many` pairs into `out`; the others listed in `left`. 0, or 1
// for a slot or expert id out of its stack's range.
int lm_expert_pairs(lm_call* c, double alpha, double limit, double gate_limit) {
  c->alpha = float(alpha), c->limit = float(limit), c->gate_limit = float(gate_limit);
  const int64_t count = c->tokens * c->k;
  std::vector<int64_t> unit_of[2] = {std::vector<int64_t>(c->pool.experts, -1),
                                     std::vector<int64_t>(c->ids ? c->host.experts : 0, -1)};
  std::vector<Unit> units;
  for (int64_t p = 0; p < count; ++p) {
    const int which = c->slots[p] >= 0 ? 0 : 1;
    const int64_t row = which == 0 ? c->slots[p] : (c->ids ? c->ids[p] : -1);
    if (row < 0) continue;
    if (row >= int64_t(unit_of[which].size())) return 1;
    int64_t& u = unit_of[which][row];
    if (u < 0) u = int64_t(units.size()), units.push_back({which == 0 ? &c->pool : &c->host, row, {}});
    units[u].pairs.push_back(p);
  }
  std::vector<Unit*> few, blocked, left;
  c->left_count = 0;
  const int64_t many = std::min<int64_t>(c->many, MAX_PAIRS_PER_UNIT);
  const int64_t blocked_from = prefill_fits(*c) ? (tiles_usable() ? TILE_PAIRS : VECTOR_PAIRS) : INT64_MAX;
  for (Unit& u : units) {
    const int64_t n = int64_t(u.pairs.size());
    (n >= blocked_from ? blocked : n < many ? few : left).push_back(&u);
  }
  if (!blocked.empty()) prefill(*c, blocked);
  for (Unit* u : left) {
    c->left[2 * c->left_count] = u->stack == &c->pool ? 0 : 1;
    c->left[2 * c->left_count + 1] = u->expert;
    ++c->left_count;
  }
  if (c->dtype == DT_F32) run_format<DT_F32>(*c, few);
  if (c->dtype == DT_BF16) run_format<DT_BF16>(*c, few);
  if (c->dtype == DT_F16) run_format<DT_F16>(*c, few);
  return 0;
}

// Whether experts with many pairs run on AMX tiles here (else they are left to the caller).
int lm_tiles() {
#if defined(LOCALMOE_AMX) && defined(__AVX512BF16__) && defined(__linux__) && defined(__x86_64__)
  return amx_usable();
#else
  return 0;
#endif
}

// One expert's matrix dequantized into `out` [rows, cols] in the compute dtype, exactly as
// kernels/quantized.py does (float32 arithmetic, one rounding).
void lm_dequantize(const Matrix* m, int64_t format, int64_t expert, int64_t dtype, uint8_t* out, int64_t threads) {
  if (dtype == DT_F32) dequantize_format<DT_F32>(*m, format, expert, out, threads);
  if (dtype == DT_BF16) dequantize_format<DT_BF16>(*m, format, expert, out, threads);
  if (dtype == DT_F16) dequantize_format<DT_F16>(*m, format, expert, out, threads);
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------
// Dense products of a few rows (decode's attention projections, routers, shared experts, dense MLPs and
// LM heads; kernels/cpu_experts.py's dense_linear): out[m, n] = sum_c x[m, c] w[n, c] (+ bias[n]), all
// bfloat16, summed in float32 and rounded once. Blocks of DENSE_BLOCK weight rows are handed to the
// threads; each output is one weight row's dot product with one activation row in a fixed order (vector
// lanes over the columns, then the lanes, then the bias), so it depends neither on the thread count nor
// on which other rows are computed with it: a token gets the same bits decoded alone or verified with
// others. Each weight vector read serves DENSE_ACTIVATIONS activation rows.

namespace {

constexpr int64_t DENSE_BLOCK = 64;  // weight rows per task: one long stream per 4 rows, few tasks to share
constexpr int DENSE_ROWS = 4;  // weight rows read side by side: each activation vector loaded once for 4
// activation rows per pass: with more, the products rather than the reads bound a pass (passes of 4 rows
// of activations read 23 GB/s against 28 for 1 and 27 for 2, on 2 threads of a Xeon with AVX512-BF16)
constexpr int DENSE_ACTIVATIONS = 2;

#if defined(__AVX512BF16__)
constexpr int64_t DENSE_STEP = 32;  // bfloat16 pairs multiplied and summed into float32 (vdpbf16ps)

// The first `n` (at most 32) bfloat16 of p, zeros after
inline BH load_bh_head(const uint16_t* p, int64_t n) {
  return bh(_mm512_maskz_loadu_epi16(n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1, p));
}

template <int NR, int NA>
void dense_pass(const uint16_t* const* w, const uint16_t* x, int64_t x_stride, int64_t cols, float* out) {
  F acc[NR][NA];
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = zero();
  for (int64_t c = 0; c < cols; c += DENSE_STEP) {
    const int64_t n = cols - c;
    BH wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = n >= DENSE_STEP ? load_bh(w[r] + c) : load_bh_head(w[r] + c, n);
    for (int a = 0; a < NA; ++a) {
      const uint16_t* xa = x + a * x_stride + c;
      const BH xv = n >= DENSE_STEP ? load_bh(xa) : load_bh_head(xa, n);
      for (int r = 0; r < NR; ++r) acc[r][a] = _mm512_dpbf16_ps(acc[r][a], wv[r], xv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < NA; ++a) out[r * NA + a] = hsum(acc[r][a]);
}
#else
// W columns at a time in float32 vectors, the columns past the last whole vector one by one after
template <int NR, int NA>
void dense_pass(const uint16_t* const* w, const uint16_t* x, int64_t x_stride, int64_t cols, float* out) {
  F acc[NR][NA];
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = zero();
  const int64_t whole = cols - cols % W;
  for (int64_t c = 0; c < whole; c += W) {
    F wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = from_bf16(w[r] + c);
    for (int a = 0; a < NA; ++a) {
      const F xv = from_bf16(x + a * x_stride + c);
      for (int r = 0; r < NR; ++r) acc[r][a] = fmadd(wv[r], xv, acc[r][a]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < NA; ++a) {
      float tail = 0.f;
      for (int64_t c = whole; c < cols; ++c) tail += bf16_value(w[r][c]) * bf16_value(x[a * x_stride + c]);
      out[r * NA + a] = hsum(acc[r][a]) + tail;
    }
}
#endif

struct Dense {
  uint16_t* out;
  const uint16_t *x, *w, *bias;  // bias: null for none
  int64_t activations, rows, cols, out_stride, x_stride, w_stride;  // strides in elements
};

// Weight rows [r, r + NR) against activation rows [a, a + NA): sums [NR, NA]
template <int NR, int NA>
void dense_sums(const Dense& d, int64_t r, int64_t a, float* sums) {
  const uint16_t* w[NR];
  for (int i = 0; i < NR; ++i) w[i] = d.w + (r + i) * d.w_stride;
  dense_pass<NR, NA>(w, d.x + a * d.x_stride, d.x_stride, d.cols, sums);
}

// Weight rows [r, r + NR) against every activation row, DENSE_ACTIVATIONS at a time
template <int NR>
void dense_rows(const Dense& d, int64_t r) {
  for (int64_t a = 0; a < d.activations; a += DENSE_ACTIVATIONS) {
    float sums[NR * DENSE_ACTIVATIONS];
    const int na = int(std::min<int64_t>(DENSE_ACTIVATIONS, d.activations - a));
    if (na == 2) dense_sums<NR, 2>(d, r, a, sums);
    else dense_sums<NR, 1>(d, r, a, sums);
    for (int i = 0; i < NR; ++i) {
      const float b = d.bias ? bf16_value(d.bias[r + i]) : 0.f;
      for (int j = 0; j < na; ++j) d.out[(a + j) * d.out_stride + r + i] = bf16_bits(sums[i * na + j] + b);
    }
  }
}

}  // namespace

extern "C" {

// out [activations, rows] = x [activations, cols] times w [rows, cols] transposed, plus bias [rows]
// where given; bfloat16, rows of each contiguous, strides in elements.
void lm_dense(uint16_t* out, const uint16_t* x, const uint16_t* w, const uint16_t* bias, int64_t activations,
              int64_t rows, int64_t cols, int64_t out_stride, int64_t x_stride, int64_t w_stride, int64_t threads) {
  const Dense d{out, x, w, bias, activations, rows, cols, out_stride, x_stride, w_stride};
  const auto task = [&](int64_t t) {
    const int64_t end = std::min(rows, (t + 1) * DENSE_BLOCK);
    int64_t r = t * DENSE_BLOCK;
    for (; r + DENSE_ROWS <= end; r += DENSE_ROWS) dense_rows<DENSE_ROWS>(d, r);
    for (; r < end; ++r) dense_rows<1>(d, r);
  };
  const int64_t tasks = (rows + DENSE_BLOCK - 1) / DENSE_BLOCK;
  if (tasks == 1) return task(0);  // a gate or a small head: no threads to wake
  share(tasks, threads, task);
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------
// RMS normalisation of a few rows of bfloat16 (models/layers.py's RMSNorm.scaled, through
// kernels/cpu_experts.py's rms_norm): each row's mean square summed in float32, x times 1 / sqrt(it + eps)
// rounded to bfloat16, then times the weight, rounded again, as the reference's float32 norm, cast and
// bfloat16 product do. One thread: a decode token's rows are a few microseconds' work, and ATen's
// half-dozen ops for the same cost more than that each.

extern "C" {

// out [rows, cols] = x [rows, cols] normalised, times weight row r % weight_rows ([weight_rows, cols])
void lm_rms_norm(uint16_t* out, const uint16_t* x, const uint16_t* weight, int64_t rows, int64_t cols,
                 int64_t weight_rows, double eps) {
  const int64_t whole = cols - cols % W;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t *xr = x + r * cols, *wr = weight + (r % weight_rows) * cols;
    F acc = zero();
    for (int64_t c = 0; c < whole; c += W) {
      const F v = from_bf16(xr + c);
      acc = fmadd(v, v, acc);
    }
    float squares = hsum(acc);
    for (int64_t c = whole; c < cols; ++c) squares += bf16_value(xr[c]) * bf16_value(xr[c]);
    const float inverse = 1.f / std::sqrt(squares / float(cols) + float(eps));
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = bf16_bits(bf16_value(wr[c]) * bf16_value(bf16_bits(bf16_value(xr[c]) * inverse)));
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------
// Rotary embedding of one position's rows in bfloat16 (models/rotary.py's apply_rotary, through
// kernels/cpu_experts.py's rotary): the first `rot` dims turned in halves, x cos + rotate_half(x) sin, each
// product and the sum rounded to bfloat16 as the reference's three tensor ops do (the same bits); the
// rest copied.

extern "C" {

// out [rows, dim] from x [rows, dim] (row stride x_stride), cos and sin [rot]
void lm_rotary(uint16_t* out, const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t rows, int64_t dim,
               int64_t rot, int64_t x_stride) {
  const int64_t half = rot / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * x_stride;
    uint16_t* o = out + r * dim;
    for (int64_t c = 0; c < rot; ++c) {
      const float turned = c < half ? -bf16_value(xr[c + half]) : bf16_value(xr[c - half]);
      const float a = bf16_value(bf16_bits(bf16_value(xr[c]) * bf16_value(cos[c])));
      const float b = bf16_value(bf16_bits(turned * bf16_value(sin[c])));
      o[c] = bf16_bits(a + b);
    }
    for (int64_t c = rot; c < dim; ++c) o[c] = xr[c];
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------
// Attention of one query position over a layer's cached keys (models/attention.py's Attention, through
// kernels/cpu_experts.py's decode_attention), bfloat16 in and out: each head's scores summed in float32,
// the softmax and the weighted sum of values in float32, rounded once. Query heads are handed to the
// threads in turn, each in one fixed order, so the result does not depend on the thread count.

namespace {

struct DecodeAttention {
  uint16_t* out;  // [batch, heads, v_dim]
  const uint16_t *q, *k, *v;
  const uint8_t* visible;  // [keys] booleans shared by every head, or null: all
  int64_t heads, kv_heads, keys, dim, v_dim;
  int64_t q_batch, q_head, k_batch, k_head, k_key, v_batch, v_head, v_key;  // strides in elements
  float scale;
};

float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t n) {
  const int64_t whole = n - n % W;
  F acc = zero();
  for (int64_t c = 0; c < whole; c += W) acc = fmadd(from_bf16(a + c), from_bf16(b + c), acc);
  float sum = hsum(acc);
  for (int64_t c = whole; c < n; ++c) sum += bf16_value(a[c]) * bf16_value(b[c]);
  return sum;
}

void attend_head(const DecodeAttention& d, int64_t b, int64_t h, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t g = h / (d.heads / d.kv_heads);
  const uint16_t* q = d.q + b * d.q_batch + h * d.q_head;
  const uint16_t* k = d.k + b * d.k_batch + g * d.k_head;
  const uint16_t* v = d.v + b * d.v_batch + g * d.v_head;
  float top = -INFINITY;
  for (int64_t s = 0; s < d.keys; ++s) {
    scores[s] = d.visible && !d.visible[s] ? -INFINITY : d.scale * dot_bf16(q, k + s * d.k_key, d.dim);
    top = std::max(top, scores[s]);
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  float total = 0.f;
  const int64_t whole = d.v_dim - d.v_dim % W;
  for (int64_t s = 0; s < d.keys; ++s) {
    if (scores[s] == -INFINITY) continue;
    const float p = std::exp(scores[s] - top);
    total += p;
    const uint16_t* vs = v + s * d.v_key;
    const F pv = set1(p);
    for (int64_t c = 0; c < whole; c += W) storef(acc.data() + c, fmadd(pv, from_bf16(vs + c), loadf(acc.data() + c)));
    for (int64_t c = whole; c < d.v_dim; ++c) acc[c] += p * bf16_value(vs[c]);
  }
  uint16_t* o = d.out + (b * d.heads + h) * d.v_dim;
  for (int64_t c = 0; c < d.v_dim; ++c) o[c] = bf16_bits(acc[c] / total);  // no key visible: 0 / 0, NaN as ATen
}

}  // namespace

extern "C" {

// strides: q's batch and head, k's batch, head and key, v's batch, head and key (elements)
void lm_decode_attention(uint16_t* out, const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint8_t* visible,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t keys, int64_t dim, int64_t v_dim,
                         const int64_t* strides, double scale, int64_t threads) {
  const DecodeAttention d{out,   q,          k,          v,          visible,    heads,      kv_heads,
                          keys,  dim,        v_dim,      strides[0], strides[1], strides[2], strides[3],
                          strides[4], strides[5], strides[6], strides[7], float(scale)};
  share(batch * heads, threads, [&](int64_t task) {
    thread_local std::vector<float> scores, acc;
    scores.resize(keys), acc.resize(v_dim);
    attend_head(d, task / heads, task % heads, scores, acc);
  });
}

}  // extern "C"
