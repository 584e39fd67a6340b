/* adapterhub's bnb kernels: plain C, loaded with ctypes (converters/formats/native.py).
 *
 * Why hand-written: bitsandbytes 0.50's CPU quantizer for 4-bit (NF4, FP4) is
 * a chain of whole-tensor torch operations ending in torch.bucketize, a binary
 * search per element, and its C library (libbitsandbytes_cpu.so) has no 4-bit
 * quantizer at all (only 8-bit blockwise quantization and 4-bit
 * dequantization). Here one pass over each block does bitsandbytes'
 * arithmetic directly on the bf16, f16 or f32 source: the block's absmax, the
 * float32 scale, the code of each scaled value and the packing, two codes a
 * byte. LLM.int8's row-wise quantizer is the same kind of pass over a row.
 *
 * The output must be bitsandbytes' own, byte for byte: tests/test_bnb_native.py
 * and tests/test_bnb_cpu.py compare it with bitsandbytes.functional. So every
 * float operation is the one bitsandbytes' torch code does, in its order, in
 * float32 (build without -ffast-math, and with -ffp-contract=off, so that no
 * multiply and add are fused into one fma):
 *
 *   full block:  absmax = max |x|;  s = x * (1 / max(absmax, (float)1e-38))
 *   last block:  a = max(max |x|, (float)1e-38) (stored so); s = x / a
 *   code:        the number of the 15 sorted code midpoints strictly below s
 *                (torch.bucketize), mapped through FP4's code order; an odd
 *                element count gets the code of 0.0 appended
 *   int8 row:    h = float16(x) (round to nearest even); m = max |h|;
 *                q = round_half_even(h * ((1 / m) * 127)); a zero row gives 0
 *
 * A block or row whose absmax is inf or NaN gets unspecified codes: the
 * functions count them, and the caller redoes them with torch (adapterhub
 * refuses such weights anyway).
 *
 * Portable C: the code of s is a branch-free count of s > midpoint over the
 * 15 midpoints, which compilers vectorize (about 1.4 ns an element with SSE2).
 * On x86-64 with GCC or clang, AVX2 (0.55-0.7 ns) and AVX-512 (0.35 ns)
 * versions search the midpoints in four steps instead, and the first call
 * picks the best one the CPU runs (__builtin_cpu_supports), so one build runs
 * on any x86-64; ah_bnb_set_isa lets the tests run every level. Elsewhere
 * (aarch64) the file is plain C.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A multiply and an add stay two roundings: clang reads this; GCC needs -ffp-contract=off (setup.py). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* The interface version the Python side checks before using this library. */
int ah_abi_version(void) { return 1; }

enum { SRC_BF16 = 0, SRC_F16 = 1, SRC_F32 = 2 };
enum { MODE_NF4 = 0, MODE_FP4 = 1 };
enum { MAX_BLOCK = 4096 }; /* bitsandbytes' largest block size */

/* x86-64 with GCC or clang: AVX2 and AVX-512 versions of the hot loops, picked at run time. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AH_X86 1
#include <immintrin.h>
#define AH_AVX2 __attribute__((target("avx2,f16c")))
#define AH_AVX512 __attribute__((target("avx512f")))
#endif
/* The portable bodies are inlined into each ISA's wrapper and compiled for it. */
#define AH_INLINE static inline __attribute__((always_inline))

/* bitsandbytes' 4-bit codes (get_4bit_type), float32. FP4's are the values
 * over 12 in bit-pattern order, rounded from double as torch.tensor does. */
static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};
static const double FP4_TIMES_12[16] = {0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                        0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0};
/* FP4's code indices by increasing value, as torch.argsort orders them (its zeros: 0, then 8). */
static const uint8_t FP4_ORDER[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};

AH_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
AH_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Bucket b's code is base + sum of step[k] for the midpoints k below s. */
typedef struct {
    float mid[15];
    int32_t step[15];
    int32_t base;
    uint8_t order[16];
} codebook;

static void make_codebook(int mode, codebook *cb) {
    float code[16];
    for (int i = 0; i < 16; i++) {
        code[i] = mode == MODE_NF4 ? NF4_CODE[i] : (float)(FP4_TIMES_12[i] / 12.0);
        cb->order[i] = mode == MODE_NF4 ? (uint8_t)i : FP4_ORDER[i];
    }
    for (int k = 0; k < 15; k++) {
        volatile float sum = code[cb->order[k]] + code[cb->order[k + 1]]; /* float32, then halved */
        cb->mid[k] = sum / 2.0f;
        cb->step[k] = (int32_t)cb->order[k + 1] - (int32_t)cb->order[k];
    }
    cb->base = cb->order[0];
}

/* The 15 midpoints (float32) and the 16 code indices by increasing value, for the tests. */
int ah_bnb_codebook(int32_t mode, float *mid, uint8_t *order) {
    if (mode != MODE_NF4 && mode != MODE_FP4) return -1;
    codebook cb;
    make_codebook(mode, &cb);
    memcpy(mid, cb.mid, sizeof cb.mid);
    memcpy(order, cb.order, sizeof cb.order);
    return 0;
}

/* float16 bits -> float32, exact for every value (NaN payloads aside). */
AH_INLINE float half_to_float(uint16_t h) {
    uint32_t mag = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = mag & 0x0f800000u;
    uint32_t normal = mag + ((uint32_t)(127 - 15) << 23);
    uint32_t special = normal + ((uint32_t)(128 - 16) << 23);  /* inf, NaN */
    float sub = u2f(mag + (113u << 23)) - u2f(113u << 23);      /* zero, subnormal: exact */
    uint32_t o = exp == 0x0f800000u ? special : (exp == 0 ? f2u(sub) : normal);
    return u2f(o | ((uint32_t)(h & 0x8000u) << 16));
}

/* float32 -> the nearest float16 (ties to even) as float32, as torch's
 * .to(float16) rounds; overflow gives inf, NaN stays NaN. */
AH_INLINE float round_to_half(float f) {
    uint32_t x = f2u(f);
    uint32_t sign = x & 0x80000000u;
    x ^= sign;
    /* normal: round the mantissa to 10 bits, carrying into the exponent */
    uint32_t r = x + 0xfffu + ((x >> 13) & 1u);
    uint32_t normal = r & 0xffffe000u;
    /* subnormal half (|f| < 2^-14): adding 0.5 rounds at 2^-24, the half subnormal step */
    float sub = (u2f(x) + 0.5f) - 0.5f;
    uint32_t o = x >= 0x7f800000u ? x                                   /* inf, NaN */
               : x >= 0x477ff000u ? 0x7f800000u                         /* rounds past 65504 */
               : x < 0x38800000u ? f2u(sub) : normal;
    return u2f(o | sign);
}

/* n values of the source from element i0, as float32. */
AH_INLINE void load_f32(const void *src, int kind, int64_t i0, int n, float *restrict x) {
    if (kind == SRC_BF16) {
        const uint16_t *h = (const uint16_t *)src + i0;
        for (int i = 0; i < n; i++) x[i] = u2f((uint32_t)h[i] << 16);
    } else if (kind == SRC_F16) {
        const uint16_t *h = (const uint16_t *)src + i0;
        for (int i = 0; i < n; i++) x[i] = half_to_float(h[i]);
    } else {
        memcpy(x, (const float *)src + i0, (size_t)n * sizeof(float));
    }
}

/* max |x| as float32 bits: integer order is float order for |x|, and NaN sorts above inf. */
AH_INLINE uint32_t absmax_bits(const float *restrict x, int n) {
    uint32_t m = 0;
    for (int i = 0; i < n; i++) {
        uint32_t a = f2u(x[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}

/* The code of s: base plus the steps of the midpoints strictly below s (torch.bucketize, then FP4's order). */
AH_INLINE uint8_t code_of(float s, const float *mid, const int32_t *step, int32_t base) {
    int32_t c = base;
#pragma GCC unroll 15
    for (int k = 0; k < 15; k++) c += s > mid[k] ? step[k] : 0;
    return (uint8_t)c;
}

/* The code of each x * inv (a full block), or x / div (the partial last block) where div > 0, into q. */
AH_INLINE void codes(const float *restrict x, int n, float inv, float div, const codebook *cb,
                         uint8_t *restrict q) {
    float mid[15];
    memcpy(mid, cb->mid, sizeof mid);
    int32_t c[MAX_BLOCK + 1];
    if (div > 0.0f)
        for (int i = 0; i < n; i++) {
            float s = x[i] / div;
            int32_t v = 0;
#pragma GCC unroll 15
            for (int k = 0; k < 15; k++) v += s > mid[k];
            c[i] = v;
        }
    else
        for (int i = 0; i < n; i++) {
            float s = x[i] * inv;
            int32_t v = 0;
#pragma GCC unroll 15
            for (int k = 0; k < 15; k++) v += s > mid[k];
            c[i] = v;
        }
    if (cb->base == 0)
        for (int i = 0; i < n; i++) q[i] = (uint8_t)c[i];
    else
        for (int i = 0; i < n; i++) q[i] = cb->order[c[i]];
}

AH_INLINE void pack(const uint8_t *restrict q, int n, uint8_t *restrict out) {
    for (int j = 0; j < n / 2; j++) out[j] = (uint8_t)((q[2 * j] << 4) | q[2 * j + 1]);
}

/* ------------------------------------------------------------------ 4-bit, portable */

/* (float)1e-38: torch converts clamp's Python float to the tensor's float32. */
#define FLOOR38 ((float)1e-38)

/* The full blocks [0, nblocks): absmax, scale, codes, packing. Returns the non-finite blocks. */
AH_INLINE int64_t full_blocks_body(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                   uint8_t *packed, float *absmax) {
    float x[MAX_BLOCK];
    uint8_t q[MAX_BLOCK];
    int64_t bad = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        load_f32(src, kind, b * bs, bs, x);
        uint32_t m = absmax_bits(x, bs);
        float am = u2f(m);
        absmax[b] = am;
        if (m >= 0x7f800000u) { /* inf or NaN: the caller redoes the block */
            bad++;
            continue;
        }
        float inv = 1.0f / (am < FLOOR38 ? FLOOR38 : am);
        codes(x, bs, inv, 0.0f, cb, q);
        pack(q, bs, packed + b * (bs / 2));
    }
    return bad;
}

static int64_t full_blocks_base(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                uint8_t *packed, float *absmax) {
    return full_blocks_body(src, kind, nblocks, bs, cb, packed, absmax);
}

/* bitsandbytes' partial last block: absmax clamped and stored so, a true division, 0.0 appended if odd. */
static int64_t last_block(const void *src, int kind, int64_t i0, int n, const codebook *cb, uint8_t *packed,
                          float *absmax) {
    float x[MAX_BLOCK + 1];
    uint8_t q[MAX_BLOCK + 1];
    load_f32(src, kind, i0, n, x);
    uint32_t m = absmax_bits(x, n);
    float am = u2f(m) < FLOOR38 ? FLOOR38 : u2f(m);
    *absmax = am;
    if (m >= 0x7f800000u) return 1;
    codes(x, n, 0.0f, am, cb, q);
    if (n % 2) q[n] = code_of(0.0f, cb->mid, cb->step, cb->base);
    pack(q, n + n % 2, packed);
    return 0;
}

/* ------------------------------------------------------------------ int8, portable */

/* Rows [0, rows) of LLM.int8; h is scratch for one row. Returns the non-finite rows. */
AH_INLINE int64_t int8_rows_body(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                                 float *h) {
    enum { PIECE = 1024 };
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        uint32_t m = 0;
        for (int64_t c0 = 0; c0 < cols; c0 += PIECE) {
            int len = (int)(cols - c0 < PIECE ? cols - c0 : PIECE);
            float *hp = h + c0;
            load_f32(src, kind, r * cols + c0, len, hp);
            for (int i = 0; i < len; i++) hp[i] = round_to_half(hp[i]);
            uint32_t mp = absmax_bits(hp, len);
            m = mp > m ? mp : m;
        }
        float stats = u2f(m);
        scb[r] = stats;
        int8_t *out = cb + r * cols;
        if (m >= 0x7f800000u) {
            bad++;
            continue;
        }
        if (m == 0) { /* 0 * (127 / 0) is NaN, which torch's cast to int8 makes 0 */
            memset(out, 0, (size_t)cols);
            continue;
        }
        float scale = (1.0f / stats) * 127.0f;
        const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds |y| < 2^22 to an integer, ties to even */
        for (int64_t i = 0; i < cols; i++) {
            float y = h[i] * scale;
            float t = y + magic;
            out[i] = (int8_t)(int32_t)(f2u(t) - f2u(magic));
        }
    }
    return bad;
}

static int64_t int8_rows_base(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                              float *h) {
    return int8_rows_body(src, kind, rows, cols, cb, scb, h);
}

/* ------------------------------------------------------------------ x86-64: AVX2, AVX-512 */

#ifdef AH_X86
/* 8 source values from element i as float32 (bf16 and f16 widen exactly). */
AH_AVX2 static inline __m256 load8(const void *src, int kind, int64_t i) {
    if (kind == SRC_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (kind == SRC_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
    return _mm256_loadu_ps((const float *)src + i);
}

AH_AVX2 static inline uint32_t max_lane8(__m256i v) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

/* AVX2: the same binary search as AVX-512's, 8 values at a time. After the
 * first step (mid[7]) the next midpoint is one of two (a blend), then one of
 * four and one of eight (a permute each); FP4's order is two permutes and a
 * blend; two codes a byte from each 64-bit lane, gathered by a byte shuffle. */
AH_AVX2 static int64_t full_blocks_avx2(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                        uint8_t *packed, float *absmax) {
    if (bs % 8) return full_blocks_base(src, kind, nblocks, bs, cb, packed, absmax);
    const float *mid = cb->mid;
    const __m256 M7 = _mm256_set1_ps(mid[7]), M3 = _mm256_set1_ps(mid[3]), M11 = _mm256_set1_ps(mid[11]);
    const __m256 TB = _mm256_setr_ps(mid[1], mid[5], mid[9], mid[13], mid[13], mid[13], mid[13], mid[13]);
    const __m256 TC = _mm256_setr_ps(mid[0], mid[2], mid[4], mid[6], mid[8], mid[10], mid[12], mid[14]);
    const uint8_t *o = cb->order;
    const __m256i LO = _mm256_setr_epi32(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]);
    const __m256i HI = _mm256_setr_epi32(o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15]);
    const __m256i ABS = _mm256_set1_epi32(0x7fffffff), FOUR = _mm256_set1_epi32(4), TWO = _mm256_set1_epi32(2),
                  EIGHT = _mm256_set1_epi32(8);
    /* bytes 0 and 8 of each 128-bit lane to bytes 0 and 1 */
    const __m256i PAIRS = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const int remap = cb->base != 0; /* FP4 */
    int64_t bad = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t i0 = b * bs;
        __m256i m = _mm256_setzero_si256();
        for (int i = 0; i < bs; i += 8)
            m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(load8(src, kind, i0 + i)), ABS));
        uint32_t mb = max_lane8(m);
        float am = u2f(mb);
        absmax[b] = am;
        if (mb >= 0x7f800000u) {
            bad++;
            continue;
        }
        const __m256 inv = _mm256_set1_ps(1.0f / (am < FLOOR38 ? FLOOR38 : am));
        uint8_t *out = packed + b * (bs / 2);
        for (int i = 0; i < bs; i += 8) {
            __m256 s = _mm256_mul_ps(load8(src, kind, i0 + i), inv);
            __m256 k8 = _mm256_cmp_ps(s, M7, _CMP_GT_OQ);
            __m256i idx = _mm256_and_si256(_mm256_castps_si256(k8), EIGHT);
            __m256 k = _mm256_cmp_ps(s, _mm256_blendv_ps(M3, M11, k8), _CMP_GT_OQ);
            idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(k), FOUR));
            k = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(TB, _mm256_srli_epi32(idx, 2)), _CMP_GT_OQ);
            idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(k), TWO));
            k = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(TC, _mm256_srli_epi32(idx, 1)), _CMP_GT_OQ);
            idx = _mm256_sub_epi32(idx, _mm256_castps_si256(k)); /* k is -1 where s is above: one up */
            if (remap) {
                __m256 lo = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(LO, idx));
                __m256 hi = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(HI, idx));
                idx = _mm256_castps_si256(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
            }
            __m256i pair = _mm256_or_si256(_mm256_slli_epi64(idx, 4), _mm256_srli_epi64(idx, 32));
            pair = _mm256_shuffle_epi8(pair, PAIRS);
            __m128i four = _mm_unpacklo_epi16(_mm256_castsi256_si128(pair), _mm256_extracti128_si256(pair, 1));
            uint32_t w = (uint32_t)_mm_cvtsi128_si32(four);
            memcpy(out + i / 2, &w, 4);
        }
    }
    return bad;
}

/* AVX2 LLM.int8: float16 rounding by the F16C conversion (ties to even). */
AH_AVX2 static int64_t int8_rows_avx2(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb,
                                      float *scb, float *h) {
    const int64_t vec = cols - cols % 8;
    const __m256i ABS = _mm256_set1_epi32(0x7fffffff);
    const float magic = 12582912.0f;
    const __m256 MAGIC = _mm256_set1_ps(magic);
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i0 = r * cols;
        __m256i mv = _mm256_setzero_si256();
        for (int64_t i = 0; i < vec; i += 8) {
            __m128i x16 = _mm256_cvtps_ph(load8(src, kind, i0 + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256 x = _mm256_cvtph_ps(x16);
            _mm256_storeu_ps(h + i, x);
            mv = _mm256_max_epu32(mv, _mm256_and_si256(_mm256_castps_si256(x), ABS));
        }
        uint32_t m = max_lane8(mv);
        if (vec < cols) {
            load_f32(src, kind, i0 + vec, (int)(cols - vec), h + vec);
            for (int64_t i = vec; i < cols; i++) h[i] = round_to_half(h[i]);
            uint32_t mt = absmax_bits(h + vec, (int)(cols - vec));
            m = mt > m ? mt : m;
        }
        float stats = u2f(m);
        scb[r] = stats;
        int8_t *out = cb + i0;
        if (m >= 0x7f800000u) {
            bad++;
            continue;
        }
        if (m == 0) {
            memset(out, 0, (size_t)cols);
            continue;
        }
        const float scale = (1.0f / stats) * 127.0f;
        const __m256 S = _mm256_set1_ps(scale);
        for (int64_t i = 0; i < vec; i += 8) {
            __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(h + i), S), MAGIC);
            __m256i q = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(MAGIC));
            __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(q16, q16));
        }
        for (int64_t i = vec; i < cols; i++) {
            float y = h[i] * scale;
            float t = y + magic;
            out[i] = (int8_t)(int32_t)(f2u(t) - f2u(magic));
        }
    }
    return bad;
}

/* 16 source values from element i as float32 (bf16 and f16 widen exactly). */
AH_AVX512 static inline __m512 load16(const void *src, int kind, int64_t i) {
    if (kind == SRC_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (kind == SRC_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i)));
    return _mm512_loadu_ps((const float *)src + i);
}

/* AVX-512: the code of 16 values at a time by a 4-step binary search over the
 * 15 midpoints (a midpoint table looked up per lane with a permute), FP4's
 * order by one more permute, and two codes a byte from each 64-bit lane. */
AH_AVX512 static int64_t full_blocks_avx512(const void *src, int kind, int64_t nblocks, int bs,
                                            const codebook *cb, uint8_t *packed, float *absmax) {
    if (bs % 16) return full_blocks_base(src, kind, nblocks, bs, cb, packed, absmax);
    float ta[16], tb[16], tc[16];
    int32_t ord[16];
    for (int i = 0; i < 16; i++) { /* after steps of 8, 4, 2: compare with mid[idx + 3], [idx + 1], [idx] */
        ta[i] = cb->mid[i + 3 < 15 ? i + 3 : 14];
        tb[i] = cb->mid[i + 1 < 15 ? i + 1 : 14];
        tc[i] = cb->mid[i < 15 ? i : 14];
        ord[i] = cb->order[i];
    }
    const __m512 TA = _mm512_loadu_ps(ta), TB = _mm512_loadu_ps(tb), TC = _mm512_loadu_ps(tc);
    const __m512 T7 = _mm512_set1_ps(cb->mid[7]);
    const __m512i ORD = _mm512_loadu_si512(ord), ABS = _mm512_set1_epi32(0x7fffffff);
    const __m512i ONE = _mm512_set1_epi32(1), TWO = _mm512_set1_epi32(2), FOUR = _mm512_set1_epi32(4),
                  EIGHT = _mm512_set1_epi32(8);
    const int remap = cb->base != 0; /* FP4 */
    int64_t bad = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t i0 = b * bs;
        __m512i m = _mm512_setzero_si512();
        for (int i = 0; i < bs; i += 16)
            m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(load16(src, kind, i0 + i)), ABS));
        uint32_t mb = _mm512_reduce_max_epu32(m);
        float am = u2f(mb);
        absmax[b] = am;
        if (mb >= 0x7f800000u) {
            bad++;
            continue;
        }
        const __m512 inv = _mm512_set1_ps(1.0f / (am < FLOOR38 ? FLOOR38 : am));
        uint8_t *out = packed + b * (bs / 2);
        for (int i = 0; i < bs; i += 16) {
            __m512 s = _mm512_mul_ps(load16(src, kind, i0 + i), inv);
            __m512i idx = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, T7, _CMP_GT_OQ), EIGHT);
            __mmask16 k = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(idx, TA), _CMP_GT_OQ);
            idx = _mm512_mask_add_epi32(idx, k, idx, FOUR);
            k = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(idx, TB), _CMP_GT_OQ);
            idx = _mm512_mask_add_epi32(idx, k, idx, TWO);
            k = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(idx, TC), _CMP_GT_OQ);
            idx = _mm512_mask_add_epi32(idx, k, idx, ONE);
            if (remap) idx = _mm512_permutexvar_epi32(idx, ORD);
            __m512i pair = _mm512_or_si512(_mm512_slli_epi64(idx, 4), _mm512_srli_epi64(idx, 32));
            _mm_storel_epi64((__m128i *)(out + i / 2), _mm512_cvtepi64_epi8(pair));
        }
    }
    return bad;
}

/* AVX-512 LLM.int8: float16 rounding by the hardware conversion (ties to even). */
AH_AVX512 static int64_t int8_rows_avx512(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb,
                                          float *scb, float *h) {
    const int64_t vec = cols - cols % 16;
    const __m512i ABS = _mm512_set1_epi32(0x7fffffff);
    const float magic = 12582912.0f;
    const __m512 MAGIC = _mm512_set1_ps(magic);
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i0 = r * cols;
        __m512i mv = _mm512_setzero_si512();
        for (int64_t i = 0; i < vec; i += 16) {
            __m512 x = load16(src, kind, i0 + i);
            __m512 x16 = _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            _mm512_storeu_ps(h + i, x16);
            mv = _mm512_max_epu32(mv, _mm512_and_si512(_mm512_castps_si512(x16), ABS));
        }
        uint32_t m = _mm512_reduce_max_epu32(mv);
        if (vec < cols) {
            load_f32(src, kind, i0 + vec, (int)(cols - vec), h + vec);
            for (int64_t i = vec; i < cols; i++) h[i] = round_to_half(h[i]);
            uint32_t mt = absmax_bits(h + vec, (int)(cols - vec));
            m = mt > m ? mt : m;
        }
        float stats = u2f(m);
        scb[r] = stats;
        int8_t *out = cb + i0;
        if (m >= 0x7f800000u) {
            bad++;
            continue;
        }
        if (m == 0) {
            memset(out, 0, (size_t)cols);
            continue;
        }
        const float scale = (1.0f / stats) * 127.0f;
        const __m512 S = _mm512_set1_ps(scale);
        for (int64_t i = 0; i < vec; i += 16) {
            __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(h + i), S), MAGIC);
            __m512i q = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(MAGIC));
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(q));
        }
        for (int64_t i = vec; i < cols; i++) {
            float y = h[i] * scale;
            float t = y + magic;
            out[i] = (int8_t)(int32_t)(f2u(t) - f2u(magic));
        }
    }
    return bad;
}
#endif

/* ------------------------------------------------------------------ dispatch */

enum { ISA_BASE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int isa = -1; /* what ah_bnb_set_isa last chose; -1: the best the CPU runs, found on first use */

static int best_isa(void) {
#ifdef AH_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return ISA_AVX2;
#endif
    return ISA_BASE;
}

/* Use at most the given level (0 portable, 1 AVX2, 2 AVX-512; -1: the best
 * the CPU runs); returns the level now in use. The tests compare every level
 * this machine runs with bitsandbytes. */
int ah_bnb_set_isa(int32_t level) {
    int best = best_isa();
    isa = level < 0 || level > best ? best : level;
    return isa;
}

static int current_isa(void) {
    int v = isa;
    if (v < 0) v = isa = best_isa(); /* a benign race: every thread stores the same value */
    return v;
}

/* bitsandbytes' quantize_4bit of n values of src (kind: 0 bf16, 1 f16, 2 f32)
 * in blocks of blocksize, the last one partial when n is not a multiple:
 * packed gets (n + 1) / 2 bytes, absmax one float per block. mode: 0 NF4, 1 FP4.
 * Returns the number of blocks whose absmax is inf or NaN (their codes are
 * not written), or -1 for arguments it does not handle. */
int64_t ah_bnb_quantize_4bit(const void *src, int32_t kind, int64_t n, int64_t blocksize, int32_t mode,
                             uint8_t *packed, float *absmax) {
    if (kind < SRC_BF16 || kind > SRC_F32 || (mode != MODE_NF4 && mode != MODE_FP4) || n < 0 ||
        blocksize < 2 || blocksize > MAX_BLOCK || blocksize % 2)
        return -1;
    codebook cb;
    make_codebook(mode, &cb);
    int64_t nblocks = n / blocksize, rem = n % blocksize, bad;
    int bs = (int)blocksize;
    switch (current_isa()) {
#ifdef AH_X86
    case ISA_AVX512: bad = full_blocks_avx512(src, kind, nblocks, bs, &cb, packed, absmax); break;
    case ISA_AVX2: bad = full_blocks_avx2(src, kind, nblocks, bs, &cb, packed, absmax); break;
#endif
    default: bad = full_blocks_base(src, kind, nblocks, bs, &cb, packed, absmax);
    }
    if (rem)
        bad += last_block(src, kind, nblocks * blocksize, (int)rem, &cb, packed + nblocks * (blocksize / 2),
                          absmax + nblocks);
    return bad;
}

/* The float32 absmax of each block as ah_bnb_quantize_4bit stores it (the
 * double-quantization pre-pass). Returns the number of non-finite blocks, or -1. */
int64_t ah_bnb_block_absmax(const void *src, int32_t kind, int64_t n, int64_t blocksize, float *absmax) {
    if (kind < SRC_BF16 || kind > SRC_F32 || n < 0 || blocksize < 1 || blocksize > MAX_BLOCK) return -1;
    float x[MAX_BLOCK];
    int64_t bad = 0, nblocks = n / blocksize, rem = n % blocksize;
    for (int64_t b = 0; b < nblocks + (rem > 0); b++) {
        int len = b < nblocks ? (int)blocksize : (int)rem;
        load_f32(src, kind, b * blocksize, len, x);
        uint32_t m = absmax_bits(x, len);
        float am = u2f(m);
        absmax[b] = b < nblocks ? am : (am < FLOOR38 ? FLOOR38 : am);
        bad += m >= 0x7f800000u;
    }
    return bad;
}

/* LLM.int8 row-wise quantization (bitsandbytes' int8_vectorwise_quant of
 * the float16 weight) of rows x cols values of src: cb gets the int8 codes,
 * scb each row's float32 absmax. Returns the number of rows whose absmax is
 * inf or NaN (their codes are not written), or -1 for bad arguments. */
int64_t ah_bnb_int8_rowwise(const void *src, int32_t kind, int64_t rows, int64_t cols, int8_t *cb, float *scb) {
    if (kind < SRC_BF16 || kind > SRC_F32 || rows < 0 || cols < 1) return -1;
    float *h = malloc((size_t)cols * sizeof(float));
    if (!h) return -1;
    int64_t bad;
    switch (current_isa()) {
#ifdef AH_X86
    case ISA_AVX512: bad = int8_rows_avx512(src, kind, rows, cols, cb, scb, h); break;
    case ISA_AVX2: bad = int8_rows_avx2(src, kind, rows, cols, cb, scb, h); break;
#endif
    default: bad = int8_rows_base(src, kind, rows, cols, cb, scb, h);
    }
    free(h);
    return bad;
}
