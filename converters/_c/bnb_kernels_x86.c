/* adapterhub's bnb kernels for x86-64: AVX2 (+F16C) and AVX-512 versions of the 4-bit
 * and LLM.int8 loops, each compiled for its instructions only (function target
 * attributes) and picked at run time by bnb_kernels.c; the same bits as the portable
 * code, which bnb_kernels.c's opening comment describes. Elsewhere this file is empty. */
#include "bnb_kernels.h"

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
AH_AVX2 AH_HIDDEN int64_t full_blocks_avx2(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
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
        float scale;
        if (!block_begin(mb, absmax + b, &bad, &scale)) continue;
        const __m256 inv = _mm256_set1_ps(scale);
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
AH_AVX2 AH_HIDDEN int64_t int8_rows_avx2(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb,
                                      float *scb, float *h) {
    const int64_t vec = cols - cols % 8;
    const __m256i ABS = _mm256_set1_epi32(0x7fffffff);
    const __m256 MAGIC = _mm256_set1_ps(ROUND_MAGIC);
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
        uint32_t mt = half_row(src, kind, i0, vec, cols, h); /* the columns past the last full vector */
        m = mt > m ? mt : m;
        int8_t *out = cb + i0;
        float scale;
        if (!row_begin(m, scb + r, out, cols, &bad, &scale)) continue;
        const __m256 S = _mm256_set1_ps(scale);
        for (int64_t i = 0; i < vec; i += 8) {
            __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(h + i), S), MAGIC);
            __m256i q = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(MAGIC));
            __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(q16, q16));
        }
        for (int64_t i = vec; i < cols; i++) out[i] = int8_code(h[i], scale);
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
AH_AVX512 AH_HIDDEN int64_t full_blocks_avx512(const void *src, int kind, int64_t nblocks, int bs,
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
        float scale;
        if (!block_begin(mb, absmax + b, &bad, &scale)) continue;
        const __m512 inv = _mm512_set1_ps(scale);
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
AH_AVX512 AH_HIDDEN int64_t int8_rows_avx512(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb,
                                          float *scb, float *h) {
    const int64_t vec = cols - cols % 16;
    const __m512i ABS = _mm512_set1_epi32(0x7fffffff);
    const __m512 MAGIC = _mm512_set1_ps(ROUND_MAGIC);
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
        uint32_t mt = half_row(src, kind, i0, vec, cols, h); /* the columns past the last full vector */
        m = mt > m ? mt : m;
        int8_t *out = cb + i0;
        float scale;
        if (!row_begin(m, scb + r, out, cols, &bad, &scale)) continue;
        const __m512 S = _mm512_set1_ps(scale);
        for (int64_t i = 0; i < vec; i += 16) {
            __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(h + i), S), MAGIC);
            __m512i q = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(MAGIC));
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(q));
        }
        for (int64_t i = vec; i < cols; i++) out[i] = int8_code(h[i], scale);
    }
    return bad;
}
#endif
