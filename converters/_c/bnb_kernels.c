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
#include "bnb_kernels.h"

/* The interface version the Python side checks before using this library. */
int ah_abi_version(void) { return 1; }

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

/* ------------------------------------------------------------------ 4-bit, portable */

AH_HIDDEN int64_t full_blocks_base(const void *src, int kind, int64_t nblocks, int bs, const codebook *cb,
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

AH_HIDDEN int64_t int8_rows_base(const void *src, int kind, int64_t rows, int64_t cols, int8_t *cb, float *scb,
                              float *h) {
    return int8_rows_body(src, kind, rows, cols, cb, scb, h);
}

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
