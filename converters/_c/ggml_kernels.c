/* adapterhub's ggml kernels: GGUF tensor encoding (F32, F16, BF16, Q8_0) from bf16, f16 or f32 rows.
 *
 * Plain C with no Python C API, loaded with ctypes (converters/formats/native.py,
 * used by converters/formats/gguf_quant.py); ctypes drops the GIL for each call,
 * so the GGUF writer's threads run it on every core.
 *
 * Why it is written here: the `gguf` package's numpy quantizers, the reference,
 * run at about 50 MB/s of float32 on the 2-core machine (70 s for a 0.94B model
 * at Q8_0, against a few seconds of I/O), and ggml's own C quantizer is not a
 * Python dependency adapterhub can rely on. The torch code in gguf_quant.py is
 * the fallback where this library is not built; it needs torch itself, whose
 * import alone costs more than converting the model here.
 *
 * The bits are the reference's: tests/test_gguf_native.py and
 * tests/test_gguf_quant.py compare this library byte for byte with
 * `gguf.quants.quantize`, with numpy's float16 conversion and with the torch
 * path, on random values and on every rounding edge, with the SIMD code and
 * with the portable code.
 *
 * - Q8_0, per block of 32 values x: d = max|x| / 127 in float32, inv = 1 / d
 *   (0 where d is 0), q = x * inv rounded half away from zero, as
 *   trunc(y + copysign(0.49999997, y)) (gguf_quant.py's docstring shows that
 *   this equals the reference's rounding for every |y| < 2^22), then d as
 *   float16 (round to nearest even) and the 32 int8 values: 34 bytes.
 * - F16: IEEE round to nearest even, subnormals kept, overflow to infinity.
 * - BF16 from f32 or f16: round to nearest even, NaN as 0x7FC0 (as torch).
 * - F32: exact.
 *
 * No -ffast-math and no contraction into fused multiply-adds: every float
 * operation is the IEEE operation written. The SIMD functions (AVX2 + F16C,
 * chosen at run time with __builtin_cpu_supports) are compiled for those
 * instructions only; the rest of the file is plain C for any target, so one
 * wheel runs on every x86-64, and the file builds on aarch64.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF /* gcc: -ffp-contract=off (setup.py), and off under -std=c11 anyway */
#endif

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AH_NO_SIMD)
#define AH_X86 1
#include <immintrin.h>
#endif

/* GGML type numbers (the `type` of a GGUF tensor), used for sources and outputs. */
enum { T_F32 = 0, T_F16 = 1, T_Q8_0 = 8, T_BF16 = 30 };

/* The interface version the Python side checks before using this library. */
int ah_abi_version(void) { return 1; }

/* ------------------------------------------------------------------ scalar conversions */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000 | (m << 13));       /* inf, NaN */
    if (e) return bits_f32(sign | ((e + 112) << 23) | (m << 13));        /* normal */
    if (!m) return bits_f32(sign);                                       /* zero */
    while (!(m & 0x400)) { m <<= 1; e++; }                               /* subnormal: normalise */
    return bits_f32(sign | ((113 - e) << 23) | ((m & 0x3ff) << 13));
}

/* IEEE float -> half, round to nearest even; NaN stays NaN (quiet, top payload bits kept). */
static uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);              /* >= 65520: infinity */
    if (ax >= 0x38800000)                                                /* normal half */
        return (uint16_t)(sign | ((ax - 0x38000000 + 0xfff + ((ax >> 13) & 1)) >> 13));
    uint32_t e = ax >> 23;
    if (e < 102) return (uint16_t)sign;                                  /* below 2^-25: zero */
    uint32_t mant = (ax & 0x7fffff) | 0x800000, shift = 126 - e;         /* units of 2^-24 */
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

static uint16_t f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return 0x7fc0;
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static inline float load_one(const void *src, int st, int64_t i) {
    if (st == T_BF16) return bits_f32((uint32_t)((const uint16_t *)src)[i] << 16);
    if (st == T_F16) return f16_to_f32(((const uint16_t *)src)[i]);
    return ((const float *)src)[i];
}

/* ------------------------------------------------------------------ portable rows */

#define HALF_BELOW 0.49999997019767761f /* the largest float below one half */

/* trunc(z) saturated to int8, as the SIMD code's convert and packs give it: x86 turns NaN and
 * values beyond int32 into INT32_MIN, so -128. Only blocks the reference leaves undefined
 * (NaN, infinity, a scale whose inverse overflows) meet the first case. */
static inline int8_t to_int8(float z) {
    if (!(z > -2147483648.0f && z < 2147483648.0f) || z < -128.0f) return -128;
    if (z >= 127.0f) return 127;
    return (int8_t)(int32_t)z;
}

static void q8_0_row_c(const void *src, int st, int64_t cols, uint8_t *dst) {
    float v[32];
    for (int64_t b = 0; b < cols / 32; b++, dst += 34) {
        uint32_t amax = 0; /* max |x| as bits: for |x| the order of floats, and NaN above all */
        for (int i = 0; i < 32; i++) {
            v[i] = load_one(src, st, b * 32 + i);
            uint32_t a = f32_bits(v[i]) & 0x7fffffff;
            if (a > amax) amax = a;
        }
        float d = bits_f32(amax) / 127.0f;
        float inv = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = f32_to_f16(d);
        memcpy(dst, &dh, 2);
        for (int i = 0; i < 32; i++) {
            float y = v[i] * inv;
            float z = y + (f32_bits(y) >> 31 ? -HALF_BELOW : HALF_BELOW);
            dst[2 + i] = (uint8_t)to_int8(z);
        }
    }
}

static void row_c(const void *src, int st, int64_t cols, void *dst, int dt) {
    int64_t i;
    switch (dt) {
    case T_F32:
        for (i = 0; i < cols; i++) ((float *)dst)[i] = load_one(src, st, i);
        break;
    case T_F16:
        for (i = 0; i < cols; i++) ((uint16_t *)dst)[i] = f32_to_f16(load_one(src, st, i));
        break;
    case T_BF16:
        for (i = 0; i < cols; i++) ((uint16_t *)dst)[i] = f32_to_bf16(load_one(src, st, i));
        break;
    default:
        q8_0_row_c(src, st, cols, dst);
    }
}

/* ------------------------------------------------------------------ AVX2 + F16C rows */

#ifdef AH_X86
#define SIMD __attribute__((target("avx2,f16c"))) static inline

/* Eight values from position i of a row, as float32. */
SIMD __m256 load8(const void *src, int st, int64_t i) {
    if (st == T_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (st == T_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
    return _mm256_loadu_ps((const float *)src + i);
}

/* round half away from zero, then to int32: trunc(y + copysign(0.49999997, y)) */
SIMD __m256i round_away(__m256 y) {
    __m256 sign = _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
    __m256 c = _mm256_or_ps(sign, _mm256_set1_ps(HALF_BELOW));
    return _mm256_cvttps_epi32(_mm256_add_ps(y, c));
}

SIMD __m256i abs8(__m256 v) { return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)); }

/* max|x| of the block of 32 values at position i, taken on the bits as the portable code does
 * (for |x| the integer order is the float order, and a NaN is above everything) */
SIMD float block_amax(const void *src, int st, int64_t i) {
    __m256i m = _mm256_max_epi32(_mm256_max_epi32(abs8(load8(src, st, i)), abs8(load8(src, st, i + 8))),
                                 _mm256_max_epi32(abs8(load8(src, st, i + 16)), abs8(load8(src, st, i + 24))));
    __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return bits_f32((uint32_t)_mm_cvtsi128_si32(h));
}

/* the 32 int8 values of the block at position i, scaled by inv, to dst */
SIMD void block_q8(const void *src, int st, int64_t i, float inv, uint8_t *dst) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 vi = _mm256_set1_ps(inv);
    __m256i q0 = round_away(_mm256_mul_ps(load8(src, st, i), vi));
    __m256i q1 = round_away(_mm256_mul_ps(load8(src, st, i + 8), vi));
    __m256i q2 = round_away(_mm256_mul_ps(load8(src, st, i + 16), vi));
    __m256i q3 = round_away(_mm256_mul_ps(load8(src, st, i + 24), vi));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(p, order));
}

/* Eight blocks at a time: their scales divided and converted in one vector each. */
SIMD void q8_0_row_avx2(const void *src, int st, int64_t cols, uint8_t *dst) {
    int64_t nb = cols / 32, b = 0;
    for (; b + 8 <= nb; b += 8) {
        float am[8], inv[8];
        uint16_t dh[8];
        for (int j = 0; j < 8; j++) am[j] = block_amax(src, st, (b + j) * 32);
        __m256 d = _mm256_div_ps(_mm256_loadu_ps(am), _mm256_set1_ps(127.0f));
        __m256 nz = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_NEQ_UQ);
        _mm256_storeu_ps(inv, _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d), nz));
        _mm_storeu_si128((__m128i *)dh, _mm256_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT));
        for (int j = 0; j < 8; j++, dst += 34) {
            memcpy(dst, &dh[j], 2);
            block_q8(src, st, (b + j) * 32, inv[j], dst + 2);
        }
    }
    for (; b < nb; b++, dst += 34) {
        float d = block_amax(src, st, b * 32) / 127.0f;
        float inv = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0);
        memcpy(dst, &dh, 2);
        block_q8(src, st, b * 32, inv, dst + 2);
    }
}

/* F16 and F32 outputs, eight values at a time; the tail (cols % 8) in plain C. */
SIMD void float_row_avx2(const void *src, int st, int64_t cols, void *dst, int dt) {
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) {
        __m256 v = load8(src, st, i);
        if (dt == T_F16)
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        else
            _mm256_storeu_ps((float *)dst + i, v);
    }
    for (; i < cols; i++) {
        float f = load_one(src, st, i);
        if (dt == T_F16) ((uint16_t *)dst)[i] = f32_to_f16(f);
        else ((float *)dst)[i] = f;
    }
}

__attribute__((target("avx2,f16c"))) static void row_avx2(const void *src, int st, int64_t cols, void *dst, int dt) {
    /* one specialised copy per source type, so the type tests leave the inner loops */
    if (dt == T_Q8_0) {
        if (st == T_BF16) q8_0_row_avx2(src, T_BF16, cols, dst);
        else if (st == T_F16) q8_0_row_avx2(src, T_F16, cols, dst);
        else q8_0_row_avx2(src, T_F32, cols, dst);
    } else if (st == T_BF16) {
        float_row_avx2(src, T_BF16, cols, dst, dt);
    } else if (st == T_F16) {
        float_row_avx2(src, T_F16, cols, dst, dt);
    } else {
        float_row_avx2(src, T_F32, cols, dst, dt);
    }
}
#endif

/* ------------------------------------------------------------------ entry points */

static int simd_state = -1; /* -1: not decided yet; 0: portable code; 1: AVX2 + F16C */

static int simd_supported(void) {
#ifdef AH_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* mode -1: ask; 0: use the portable code; 1: use SIMD where the CPU has it. Returns the state now. */
int ah_ggml_simd(int mode) {
    if (mode == 0) simd_state = 0;
    else if (mode == 1 || simd_state < 0) simd_state = simd_supported();
    return simd_state;
}

static int64_t out_row_bytes(int dt, int64_t cols) {
    switch (dt) {
    case T_F32: return cols * 4;
    case T_F16: case T_BF16: return cols * 2;
    case T_Q8_0: return cols / 32 * 34;
    default: return -1;
    }
}

/* Encode `rows` rows of `cols` values each into `dst`, row after row, in GGML type `dt`.
 *
 * Source row r starts at byte offset row_offsets[r] from `src` (any order: a
 * permuted view), or at r * row_stride where row_offsets is NULL; its values
 * are contiguous, of type `st` (F32, F16 or BF16). Returns 0, or -1 for a type
 * it does not handle, -2 for a Q8_0 row that is not whole blocks.
 */
int ah_ggml_encode_rows(const void *src, int st, const int64_t *row_offsets, int64_t row_stride,
                        int64_t rows, int64_t cols, void *dst, int dt) {
    if ((st != T_F32 && st != T_F16 && st != T_BF16) || out_row_bytes(dt, cols) < 0 || rows < 0 || cols < 0)
        return -1;
    if (dt == T_Q8_0 && cols % 32) return -2;
    int64_t ob = out_row_bytes(dt, cols), ib = st == T_F32 ? 4 : 2;
    int simd = simd_state < 0 ? ah_ggml_simd(-1) : simd_state;
    for (int64_t r = 0; r < rows; r++) {
        const char *s = (const char *)src + (row_offsets ? row_offsets[r] : r * row_stride);
        char *o = (char *)dst + r * ob;
        if (st == dt) {
            memcpy(o, s, (size_t)(cols * ib));
            continue;
        }
#ifdef AH_X86
        if (simd && dt != T_BF16) {
            row_avx2(s, st, cols, o, dt);
            continue;
        }
#endif
        (void)simd;
        row_c(s, st, cols, o, dt);
    }
    return 0;
}
