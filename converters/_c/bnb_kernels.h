/* adapterhub's bnb kernels: what bnb_kernels.c (the portable code, the codebook and the
 * dispatch) and bnb_kernels_x86.c (AVX2, AVX-512) share: the source kinds, the codebook,
 * and the portable per-value steps, inlined into each instruction set's loops.
 * bnb_kernels.c's opening comment gives the arithmetic and why it is hand-written. */
#ifndef AH_BNB_KERNELS_H
#define AH_BNB_KERNELS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A multiply and an add stay two roundings: clang reads this; GCC needs -ffp-contract=off (setup.py). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

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

AH_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
AH_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Bucket b's code is base + sum of step[k] for the midpoints k below s. */
typedef struct {
    float mid[15];
    int32_t step[15];
    int32_t base;
    uint8_t order[16];
} codebook;

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

/* (float)1e-38: torch converts clamp's Python float to the tensor's float32. */
#define FLOOR38 ((float)1e-38)

/* A full block's absmax (bits m) stored in *absmax and its scale 1 / max(absmax, 1e-38) in *inv.
 * Returns 0 for an inf or NaN absmax, counted in *bad (the caller redoes the block), else 1. */
AH_INLINE int block_begin(uint32_t m, float *absmax, int64_t *bad, float *inv) {
    float am = u2f(m);
    *absmax = am;
    if (m >= 0x7f800000u) {
        ++*bad;
        return 0;
    }
    *inv = 1.0f / (am < FLOOR38 ? FLOOR38 : am);
    return 1;
}

/* The full blocks [0, nblocks): absmax, scale, codes, packing. Returns the non-finite blocks. */
AH_INLINE int64_t full_blocks_body(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                   uint8_t *packed, float *absmax) {
    float x[MAX_BLOCK];
    uint8_t q[MAX_BLOCK];
    int64_t bad = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        load_f32(src, kind, b * bs, bs, x);
        float inv;
        if (!block_begin(absmax_bits(x, bs), absmax + b, &bad, &inv)) continue;
        codes(x, bs, inv, 0.0f, cb, q);
        pack(q, bs, packed + b * (bs / 2));
    }
    return bad;
}

/* ------------------------------------------------------------------ int8, portable */

/* 1.5 * 2^23: adding it rounds |y| < 2^22 to an integer, ties to even. */
#define ROUND_MAGIC 12582912.0f

/* LLM.int8's code of a float16-rounded value h: round_half_even(h * scale). */
AH_INLINE int8_t int8_code(float h, float scale) {
    float y = h * scale;
    float t = y + ROUND_MAGIC;
    return (int8_t)(int32_t)(f2u(t) - f2u(ROUND_MAGIC));
}

/* Columns [from, cols) of the row starting at element i0, rounded to float16 (ties to even),
 * into h[from, cols); returns the bits of their largest |value|. */
AH_INLINE uint32_t half_row(const void *src, int kind, int64_t i0, int64_t from, int64_t cols, float *h) {
    enum { PIECE = 1024 };
    uint32_t m = 0;
    for (int64_t c0 = from; c0 < cols; c0 += PIECE) {
        int len = (int)(cols - c0 < PIECE ? cols - c0 : PIECE);
        float *hp = h + c0;
        load_f32(src, kind, i0 + c0, len, hp);
        for (int i = 0; i < len; i++) hp[i] = round_to_half(hp[i]);
        uint32_t mp = absmax_bits(hp, len);
        m = mp > m ? mp : m;
    }
    return m;
}

/* A row's absmax (bits m) stored in *scb and its scale (1 / absmax) * 127 in *scale. Returns 1 when
 * the caller is to compute the row's codes; 0 when not: an inf or NaN absmax is counted in *bad (the
 * caller redoes the row), and a zero row gets 0 codes here (0 * (127 / 0) is NaN, which torch's cast
 * to int8 makes 0). */
AH_INLINE int row_begin(uint32_t m, float *scb, int8_t *out, int64_t cols, int64_t *bad, float *scale) {
    float stats = u2f(m);
    *scb = stats;
    if (m >= 0x7f800000u) {
        ++*bad;
        return 0;
    }
    if (m == 0) {
        memset(out, 0, (size_t)cols);
        return 0;
    }
    *scale = (1.0f / stats) * 127.0f;
    return 1;
}

/* Rows [0, rows) of LLM.int8; h is scratch for one row. Returns the non-finite rows. */
AH_INLINE int64_t int8_rows_body(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                                 float *h) {
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        int8_t *out = cb + r * cols;
        float scale;
        if (!row_begin(half_row(src, kind, r * cols, 0, cols, h), scb + r, out, cols, &bad, &scale)) continue;
        for (int64_t i = 0; i < cols; i++) out[i] = int8_code(h[i], scale);
    }
    return bad;
}

/* Shared between bnb_kernels.c and bnb_kernels_x86.c, not exported from the library. */
#define AH_HIDDEN __attribute__((visibility("hidden")))
AH_HIDDEN int64_t full_blocks_base(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                   uint8_t *packed, float *absmax);
AH_HIDDEN int64_t int8_rows_base(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                                 float *h);
#ifdef AH_X86
AH_AVX2 AH_HIDDEN int64_t full_blocks_avx2(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                   uint8_t *packed, float *absmax);
AH_AVX2 AH_HIDDEN int64_t int8_rows_avx2(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                                 float *h);
AH_AVX512 AH_HIDDEN int64_t full_blocks_avx512(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
                                     uint8_t *packed, float *absmax);
AH_AVX512 AH_HIDDEN int64_t int8_rows_avx512(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                                   float *h);
#endif

#endif
