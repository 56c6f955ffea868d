// Per-channel batch statistics of activations (calibration): welford_partials_cpu, linear_with_stats_cpu.
//
// Numerics. The rows are cut into fixed chunks (a function of the row count only). The pass over one chunk
// and a group of channels (run_chunk) keeps, per channel, a shift (the first valid finite value seen in the
// chunk) and accumulates, for tiles of at most kTileRows rows, shifted sums  n, Σd, Σd², Σ(|x|-|shift|),
// Σ(|x|-|shift|)², Σx²  in fp32 vector registers; after each tile they are folded into fp64 accumulators.
// The shift makes the sums well conditioned (|d| ~ std, not the mean) and the short fp32 runs keep rounding
// at a few ulps of the tile sums. Chunk partials (fp64) are merged with Chan's formula in chunk order, so
// results do not depend on the thread count or on how channels are split over threads.
//
// Threads: a run of channels per thread over all chunks (then the chunk merge and the caller's per-channel
// merge run in the same parallel region), or, with fewer channel blocks than threads, tasks over
// chunk x channel group followed by a parallel chunk merge.
//
// Vectorisation: over channels, blocks of 16 (one zmm, or two ymm). The tile kernel exists for AVX-512
// (masked ops, masked tail loads), AVX2+FMA+F16C and portable C++ (compiled with target attributes); the
// variant is chosen at run time with persona_kernels::cpu_isa(). fp16/bf16 are widened to fp32 on load.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#if !defined(__clang__)
// GCC 12 reports false positives on the deliberately undefined registers inside <immintrin.h> casts.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "simd_loads.h"

namespace persona_kernels {
namespace {

#define PK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define PK_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int kLanes = 16;               // channels per block
constexpr int64_t kTileRows = 32;        // fp32 run length before folding into fp64
constexpr int64_t kGroupChannels = 128;  // channels per task (multiple of kLanes)
constexpr int64_t kMinElementsPerThread = int64_t{1} << 17;  // ~25 us of work: the pool is warm from the GEMM

// A run of rows of one chunk; its Σx² goes to seq_sumsq row `dst` (dst >= 0), to the chunk's split
// buffer (dst == kSplit: a sequence longer than a chunk), or nowhere (dst == kNoSeq).
constexpr int64_t kNoSeq = -1;
constexpr int64_t kSplit = -2;
struct Segment {
  int64_t begin, end, dst;
};
struct Chunk {
  int64_t begin, end, split_seq;  // split_seq: sequence whose Σx² this chunk holds a piece of, else -1
  int32_t seg0, nseg;
};

// Per-task running state of one group of channels: shift and count in fp32 (count <= rows per chunk is
// exact), shifted sums in fp64.
struct Scratch {
  alignas(64) float shift[kGroupChannels];
  alignas(64) float n[kGroupChannels];
  alignas(64) double s1[kGroupChannels];
  alignas(64) double s2[kGroupChannels];
  alignas(64) double a1[kGroupChannels];
  alignas(64) double a2[kGroupChannels];
  alignas(64) double q[kGroupChannels];
};

// Processes rows [r0, r1) (skipping masked rows) of the block of `lanes` <= 16 channels starting at column j;
// state at offset `off` of the scratch.
using TileFn = void (*)(const void* x, int64_t k, const bool* mask, int64_t r0, int64_t r1, int64_t j, int lanes,
                        Scratch& sc, int off);

constexpr float kInf = std::numeric_limits<float>::infinity();

// Calls ROWS<T, Partial, Seeded>(args...) with the run-time flags `partial` (fewer than kLanes channels) and
// `seeded` (every lane already has a shift) as template arguments: the SIMD tile functions are specialised on
// both. A macro, not a template, so that the call stays inside the caller's target("avx...") function.
#define PK_TILE_ROWS(ROWS, partial, seeded, ...) \
  do { \
    if (partial) { \
      if (seeded) ROWS<T, true, true>(__VA_ARGS__); else ROWS<T, true, false>(__VA_ARGS__); \
    } else { \
      if (seeded) ROWS<T, false, true>(__VA_ARGS__); else ROWS<T, false, false>(__VA_ARGS__); \
    } \
  } while (0)

// ---------------------------------------------------------------------------------------------- portable
template <typename T>
void tile_portable(const void* xp, int64_t k, const bool* mask, int64_t r0, int64_t r1, int64_t j, int lanes,
                   Scratch& sc, int off) {
  const T* x = static_cast<const T*>(xp);
  float sh[kLanes], cnt[kLanes], s1[kLanes] = {}, s2[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, q[kLanes] = {};
  std::memcpy(sh, sc.shift + off, sizeof(sh));
  std::memcpy(cnt, sc.n + off, sizeof(cnt));
  for (int64_t r = r0; r < r1; ++r) {
    if (mask != nullptr && !mask[r]) continue;
    const T* p = x + r * k + j;
    for (int l = 0; l < lanes; ++l) {
      const float v = static_cast<float>(p[l]);
      if (!(std::fabs(v) < kInf)) continue;
      if (cnt[l] == 0.0f) sh[l] = v;
      const float d = v - sh[l], ad = std::fabs(v) - std::fabs(sh[l]);
      cnt[l] += 1.0f;
      s1[l] += d;
      s2[l] += d * d;
      a1[l] += ad;
      a2[l] += ad * ad;
      q[l] += v * v;
    }
  }
  std::memcpy(sc.shift + off, sh, sizeof(sh));
  std::memcpy(sc.n + off, cnt, sizeof(cnt));
  for (int l = 0; l < kLanes; ++l) {
    sc.s1[off + l] += s1[l];
    sc.s2[off + l] += s2[l];
    sc.a1[off + l] += a1[l];
    sc.a2[off + l] += a2[l];
    sc.q[off + l] += q[l];
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PK_HAVE_X86_VARIANTS 1

// ---------------------------------------------------------------------------------------------- AVX-512
template <typename T>
PK_AVX512 inline __m512 load16(const T* p, __mmask16 m, bool partial);

template <>
PK_AVX512 inline __m512 load16<float>(const float* p, __mmask16 m, bool partial) {
  return partial ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

template <>
PK_AVX512 inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 m, bool partial) {
  const __m256i h = partial ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_maskz_cvtepu16_epi32(0xffff, h), 16));
}

template <>
PK_AVX512 inline __m512 load16<at::Half>(const at::Half* p, __mmask16 m, bool partial) {
  const __m256i h = partial ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_cvtph_ps(h);
}

PK_AVX512 inline void fold16(double* acc, __m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_store_pd(acc, _mm512_add_pd(_mm512_load_pd(acc), lo));
  _mm512_store_pd(acc + 8, _mm512_add_pd(_mm512_load_pd(acc + 8), hi));
}

// Seeded: every lane already has a shift (count > 0), so the shift is constant over the tile and the
// first-value bookkeeping drops out of the inner loop (the common case after the first tile of a chunk).
template <typename T, bool Partial, bool Seeded>
PK_AVX512 inline void tile_avx512_rows(const T* x, int64_t k, const bool* mask, int64_t r0, int64_t r1, int64_t j,
                                       __mmask16 lm, Scratch& sc, int off) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), inf = _mm512_set1_ps(kInf);
  const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 sh = _mm512_load_ps(sc.shift + off), cnt = _mm512_load_ps(sc.n + off);
  __m512 ash = _mm512_and_ps(sh, absm);
  __m512 s1 = zero, s2 = zero, a1 = zero, a2 = zero, q = zero;
  for (int64_t r = r0; r < r1; ++r) {
    if (mask != nullptr && !mask[r]) continue;
    const __m512 v = load16<T>(x + r * k + j, lm, Partial);
    const __m512 av = _mm512_and_ps(v, absm);
    const __mmask16 ok = _mm512_mask_cmp_ps_mask(lm, av, inf, _CMP_LT_OQ);  // false for inf, NaN
    if (!Seeded) {
      const __mmask16 first = _mm512_mask_cmp_ps_mask(ok, cnt, zero, _CMP_EQ_OQ);
      sh = _mm512_mask_mov_ps(sh, first, v);
      ash = _mm512_and_ps(sh, absm);
    }
    const __m512 d = _mm512_maskz_sub_ps(ok, v, sh);
    const __m512 ad = _mm512_maskz_sub_ps(ok, av, ash);
    cnt = _mm512_mask_add_ps(cnt, ok, cnt, one);
    s1 = _mm512_add_ps(s1, d);
    s2 = _mm512_fmadd_ps(d, d, s2);
    a1 = _mm512_add_ps(a1, ad);
    a2 = _mm512_fmadd_ps(ad, ad, a2);
    q = _mm512_mask3_fmadd_ps(v, v, q, ok);
  }
  _mm512_store_ps(sc.shift + off, sh);
  _mm512_store_ps(sc.n + off, cnt);
  fold16(sc.s1 + off, s1);
  fold16(sc.s2 + off, s2);
  fold16(sc.a1 + off, a1);
  fold16(sc.a2 + off, a2);
  fold16(sc.q + off, q);
}

template <typename T>
PK_AVX512 void tile_avx512(const void* x, int64_t k, const bool* mask, int64_t r0, int64_t r1, int64_t j, int lanes,
                           Scratch& sc, int off) {
  const bool partial = lanes != kLanes;
  const __mmask16 lm = partial ? static_cast<__mmask16>((1u << lanes) - 1u) : static_cast<__mmask16>(0xffff);
  const __mmask16 unseeded =
      _mm512_mask_cmp_ps_mask(lm, _mm512_load_ps(sc.n + off), _mm512_setzero_ps(), _CMP_EQ_OQ);
  PK_TILE_ROWS(tile_avx512_rows, partial, unseeded == 0, static_cast<const T*>(x), k, mask, r0, r1, j, lm, sc, off);
}

// ---------------------------------------------------------------------------------------------- AVX2
struct Acc8 {
  __m256 sh, ash, cnt, s1, s2, a1, a2, q;
};

template <bool Seeded>
PK_AVX2 inline void update8(Acc8& a, __m256 v, __m256 lane_ok) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 av = _mm256_and_ps(v, absm);
  const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(av, _mm256_set1_ps(kInf), _CMP_LT_OQ), lane_ok);
  if (!Seeded) {
    const __m256 first = _mm256_and_ps(ok, _mm256_cmp_ps(a.cnt, zero, _CMP_EQ_OQ));
    a.sh = _mm256_blendv_ps(a.sh, v, first);
    a.ash = _mm256_and_ps(a.sh, absm);
  }
  const __m256 d = _mm256_and_ps(_mm256_sub_ps(v, a.sh), ok);  // masked-out lanes (inf/NaN too) -> +0
  const __m256 ad = _mm256_and_ps(_mm256_sub_ps(av, a.ash), ok);
  const __m256 xv = _mm256_and_ps(v, ok);
  a.cnt = _mm256_add_ps(a.cnt, _mm256_and_ps(_mm256_set1_ps(1.0f), ok));
  a.s1 = _mm256_add_ps(a.s1, d);
  a.s2 = _mm256_fmadd_ps(d, d, a.s2);
  a.a1 = _mm256_add_ps(a.a1, ad);
  a.a2 = _mm256_fmadd_ps(ad, ad, a.a2);
  a.q = _mm256_fmadd_ps(xv, xv, a.q);
}

PK_AVX2 inline void fold8(double* acc, __m256 v) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  _mm256_store_pd(acc, _mm256_add_pd(_mm256_load_pd(acc), lo));
  _mm256_store_pd(acc + 4, _mm256_add_pd(_mm256_load_pd(acc + 4), hi));
}

PK_AVX2 inline void load_acc8(Acc8& a, const Scratch& sc, int off) {
  a.sh = _mm256_load_ps(sc.shift + off);
  a.ash = _mm256_and_ps(a.sh, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
  a.cnt = _mm256_load_ps(sc.n + off);
  a.s1 = a.s2 = a.a1 = a.a2 = a.q = _mm256_setzero_ps();
}

PK_AVX2 inline void store_acc8(const Acc8& a, Scratch& sc, int off) {
  _mm256_store_ps(sc.shift + off, a.sh);
  _mm256_store_ps(sc.n + off, a.cnt);
  fold8(sc.s1 + off, a.s1);
  fold8(sc.s2 + off, a.s2);
  fold8(sc.a1 + off, a.a1);
  fold8(sc.a2 + off, a.a2);
  fold8(sc.q + off, a.q);
}

template <typename T, bool Partial, bool Seeded>
PK_AVX2 inline void tile_avx2_rows(const T* x, int64_t k, const bool* mask, int64_t r0, int64_t r1, int64_t j,
                                   int lanes, Scratch& sc, int off) {
  alignas(32) int32_t okbits[kLanes];
  for (int l = 0; l < kLanes; ++l) okbits[l] = (!Partial || l < lanes) ? -1 : 0;
  const __m256 ok0 = _mm256_load_ps(reinterpret_cast<const float*>(okbits));
  const __m256 ok1 = _mm256_load_ps(reinterpret_cast<const float*>(okbits + 8));
  Acc8 lo, hi;
  load_acc8(lo, sc, off);
  load_acc8(hi, sc, off + 8);
  T tmp[kLanes];
  for (int64_t r = r0; r < r1; ++r) {
    if (mask != nullptr && !mask[r]) continue;
    const T* p = x + r * k + j;
    if (Partial) {
      std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
      std::memcpy(static_cast<void*>(tmp), p, sizeof(T) * lanes);
      p = tmp;
    }
    update8<Seeded>(lo, load8_as_f32<T>(p), ok0);
    update8<Seeded>(hi, load8_as_f32<T>(p + 8), ok1);
  }
  store_acc8(lo, sc, off);
  store_acc8(hi, sc, off + 8);
}

template <typename T>
PK_AVX2 void tile_avx2(const void* x, int64_t k, const bool* mask, int64_t r0, int64_t r1, int64_t j, int lanes,
                       Scratch& sc, int off) {
  bool seeded = true;
  for (int l = 0; l < lanes; ++l) seeded &= sc.n[off + l] > 0.0f;
  PK_TILE_ROWS(tile_avx2_rows, lanes != kLanes, seeded, static_cast<const T*>(x), k, mask, r0, r1, j, lanes, sc, off);
}
#endif

TileFn pick_tile(at::ScalarType dtype) {
  const int d = dtype == at::kFloat ? 0 : (dtype == at::kHalf ? 1 : 2);
  static const TileFn portable[3] = {tile_portable<float>, tile_portable<at::Half>, tile_portable<at::BFloat16>};
#ifdef PK_HAVE_X86_VARIANTS
  static const TileFn avx512[3] = {tile_avx512<float>, tile_avx512<at::Half>, tile_avx512<at::BFloat16>};
  static const TileFn avx2[3] = {tile_avx2<float>, tile_avx2<at::Half>, tile_avx2<at::BFloat16>};
  switch (cpu_isa()) {
    case Isa::Avx512: return avx512[d];
    case Isa::Avx2: return avx2[d];
    default: break;
  }
#endif
  return portable[d];
}

struct Ctx {
  const void* x;
  int64_t rows, k;
  const bool* mask;  // nullptr = all rows valid
  const Chunk* chunks;
  const Segment* segs;
  int64_t nchunks;
  TileFn tile;
  float* seq_out;   // [S, K]
  double* part;     // [nchunks, 5, K]: n, mean, m2, abs_mean, abs_m2
  double* split_q;  // [nchunks, K]
};

// The batch partials of channels [j0, j1) from the chunk partials: Chan's merge in chunk order, fp64, then
// rounded to the output's fp32; split sequences' Σx² pieces are summed in order.
void finish_channels(const Ctx& c, const PartialsView& out, int64_t j0, int64_t j1) {
  const int64_t k = c.k, nchunks = c.nchunks;
  const double* pp = c.part;
  const double* sq = c.split_q;
  for (int64_t j = j0; j < j1; ++j) {
    double n = 0, mu = 0, m = 0, amu = 0, am = 0, qacc = 0;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const double* p = pp + ci * 5 * k;
      const double nb = p[j];
      if (nb > 0) {  // the first chunk with values enters exactly (weight nb / nn = 1, cross term * 0)
        const double nn = n + nb, delta = p[k + j] - mu, adelta = p[3 * k + j] - amu;
        mu += delta * (nb / nn);
        m += p[2 * k + j] + delta * delta * (n * nb / nn);
        amu += adelta * (nb / nn);
        am += p[4 * k + j] + adelta * adelta * (n * nb / nn);
        n = nn;
      }
      const int64_t s = c.chunks[ci].split_seq;
      if (s >= 0) {
        const bool first_piece = ci == 0 || c.chunks[ci - 1].split_seq != s;
        const bool last_piece = ci + 1 == nchunks || c.chunks[ci + 1].split_seq != s;
        qacc = (first_piece ? 0.0 : qacc) + sq[ci * k + j];
        if (last_piece) out.seq_sumsq[s * k + j] = static_cast<float>(qacc);
      }
    }
    out.count[j] = static_cast<int64_t>(n);
    out.mean[j] = static_cast<float>(mu);
    out.m2[j] = static_cast<float>(m);
    out.abs_mean[j] = static_cast<float>(amu);
    out.abs_m2[j] = static_cast<float>(am);
  }
}

// The pass over chunk `ci` for channels [j0, j1) (j0 a multiple of kLanes, j1 - j0 <= kGroupChannels): writes
// the chunk's partials (and its sequences' Σx²) for those channels. Channels are independent, so the result
// does not depend on how the channels are grouped.
void run_chunk(const Ctx& c, int64_t ci, int64_t j0, int64_t j1) {
  const Chunk& ch = c.chunks[ci];
  const int64_t k = c.k;
  const int nblocks = static_cast<int>((j1 - j0 + kLanes - 1) / kLanes);
  Scratch sc;
  std::memset(&sc, 0, sizeof(sc));
  for (int32_t si = ch.seg0; si < ch.seg0 + ch.nseg; ++si) {
    const Segment& seg = c.segs[si];
    std::memset(sc.q, 0, sizeof(sc.q));
    for (int64_t t0 = seg.begin; t0 < seg.end; t0 += kTileRows) {
      const int64_t t1 = std::min(seg.end, t0 + kTileRows);
      for (int b = 0; b < nblocks; ++b) {
        const int64_t j = j0 + b * kLanes;
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, j1 - j));
        c.tile(c.x, k, c.mask, t0, t1, j, lanes, sc, b * kLanes);
      }
    }
    if (seg.dst >= 0) {
      for (int64_t j = j0; j < j1; ++j) c.seq_out[seg.dst * k + j] = static_cast<float>(sc.q[j - j0]);
    } else if (seg.dst == kSplit) {
      for (int64_t j = j0; j < j1; ++j) c.split_q[ci * k + j] = sc.q[j - j0];
    }
  }
  double* part = c.part + ci * 5 * k;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t l = j - j0;
    const double n = sc.n[l];
    double mean = 0, m2 = 0, amean = 0, am2 = 0;
    if (n > 0) {
      const double sh = sc.shift[l], ash = std::fabs(sh);
      mean = sh + sc.s1[l] / n;
      m2 = std::max(0.0, sc.s2[l] - sc.s1[l] * sc.s1[l] / n);
      amean = ash + sc.a1[l] / n;
      am2 = std::max(0.0, sc.a2[l] - sc.a1[l] * sc.a1[l] / n);
    }
    part[j] = n;
    part[k + j] = mean;
    part[2 * k + j] = m2;
    part[3 * k + j] = amean;
    part[4 * k + j] = am2;
  }
}

// Chunk size: a function of the row count only, so the result is the same for any thread count. At least
// 1024 rows: a calibration batch (a few hundred rows) is then one chunk, whose partials need no merge.
int64_t chunk_rows_for(int64_t rows) { return std::max<int64_t>(1024, (rows + 63) / 64); }

void build_chunks(int64_t rows, int64_t seq_len, std::vector<Chunk>& chunks, std::vector<Segment>& segs) {
  const int64_t crows = chunk_rows_for(rows);
  const int64_t nseq = seq_len > 0 ? rows / seq_len : 0;
  auto add_chunk = [&](int64_t b, int64_t e, int64_t split_seq) {
    chunks.push_back(Chunk{b, e, split_seq, static_cast<int32_t>(segs.size()), 0});
  };
  auto add_seg = [&](int64_t b, int64_t e, int64_t dst) {
    segs.push_back(Segment{b, e, dst});
    chunks.back().nseg += 1;
  };
  if (nseq > 0 && seq_len <= crows) {
    const int64_t per = crows / seq_len;  // whole sequences per chunk
    for (int64_t s0 = 0; s0 < nseq; s0 += per) {
      const int64_t s1 = std::min(nseq, s0 + per);
      add_chunk(s0 * seq_len, s1 * seq_len, -1);
      for (int64_t s = s0; s < s1; ++s) add_seg(s * seq_len, (s + 1) * seq_len, s);
    }
  } else if (nseq > 0) {
    const int64_t pieces = (seq_len + crows - 1) / crows;
    for (int64_t s = 0; s < nseq; ++s) {
      for (int64_t p = 0; p < pieces; ++p) {
        const int64_t b = s * seq_len + p * seq_len / pieces, e = s * seq_len + (p + 1) * seq_len / pieces;
        add_chunk(b, e, s);
        add_seg(b, e, kSplit);
      }
    }
  }
  for (int64_t b = nseq * seq_len; b < rows; b += crows) {  // rows outside any sequence
    const int64_t e = std::min(rows, b + crows);
    add_chunk(b, e, -1);
    add_seg(b, e, kNoSeq);
  }
}

void check_partials_args(const at::Tensor& x, const c10::optional<at::Tensor>& row_mask, int64_t seq_len) {
  PK_CHECK_ARG(x.dim() == 2, "x", "expected a 2-D tensor [R, K], got ", x.dim(), " dims");
  PK_CHECK_ARG(x.device().is_cpu(), "x", "expected a CPU tensor");
  const auto dtype = x.scalar_type();
  PK_CHECK_ARG(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "x",
               "expected dtype float32, float16 or bfloat16, got ", dtype);
  PK_CHECK_ARG(seq_len >= 0, "seq_len", "expected a non-negative integer, got ", seq_len);
  if (row_mask.has_value() && row_mask->defined()) {
    const at::Tensor& mask = *row_mask;
    PK_CHECK_ARG(mask.scalar_type() == at::kBool, "row_mask", "expected dtype torch.bool, got ", mask.scalar_type());
    PK_CHECK_ARG(mask.dim() == 1 && mask.size(0) == x.size(0), "row_mask", "expected shape [R] = [", x.size(0),
                 "], got ", mask.sizes());
    PK_CHECK_ARG(mask.device().is_cpu(), "row_mask", "expected a CPU tensor");
  }
}

}  // namespace

void check_linear_with_stats_args(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& row_mask,
                                  int64_t seq_len) {
  check_partials_args(x, row_mask, seq_len);
  check_linear_args(x, weight, bias);
}

bool welford_partials_into(const at::Tensor& x, const bool* mask, int64_t seq_len, const PartialsView& out,
                           const ChannelHook* then, const TaskHook* also) {
  const int64_t rows = x.size(0), k = x.size(1);
  if (rows == 0 || k == 0) {
    const int64_t nseq = seq_len > 0 ? rows / seq_len : 0;
    std::fill(out.count, out.count + k, int64_t{0});
    for (float* p : {out.mean, out.m2, out.abs_mean, out.abs_m2}) std::fill(p, p + k, 0.0f);
    std::fill(out.seq_sumsq, out.seq_sumsq + nseq * k, 0.0f);
    if (then != nullptr) then->fn(then->ctx, 0, k);
    return false;
  }
  // the calling thread's chunk lists, reused (the pool's workers only read them through ctx)
  thread_local std::vector<Chunk> chunks;
  thread_local std::vector<Segment> segs;
  chunks.clear();
  segs.clear();
  build_chunks(rows, seq_len, chunks, segs);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  bool any_split = false;
  for (const auto& c : chunks) any_split |= c.split_seq >= 0;
  // chunk partials [nchunks, 5, K] then split pieces [nchunks, K]: each entry written by its task (split
  // pieces read only where written)
  double* part = static_cast<double*>(thread_scratch(
      ScratchSlot::WelfordChunks, static_cast<size_t>(nchunks * (any_split ? 6 : 5) * k) * sizeof(double)));
  double* split_q = any_split ? part + nchunks * 5 * k : nullptr;
  Ctx ctx{x.data_ptr(), rows, k, mask, chunks.data(), segs.data(), nchunks, pick_tile(x.scalar_type()),
          out.seq_sumsq, part, split_q};
  // channels [j0, j1) whole: the pass over every chunk, the chunk merge, then the caller's hook
  auto channels = [&](int64_t j0, int64_t j1) {
    for (int64_t g0 = j0; g0 < j1; g0 += kGroupChannels) {
      const int64_t g1 = std::min(j1, g0 + kGroupChannels);
      for (int64_t ci = 0; ci < nchunks; ++ci) run_chunk(ctx, ci, g0, g1);
    }
    finish_channels(ctx, out, j0, j1);
    if (then != nullptr) then->fn(then->ctx, j0, j1);
  };

  // The pass runs at ~0.2 ns per value on one core: each thread gets at least kMinElementsPerThread values,
  // since waking the thread pool costs more than small batches (and far more on a busy host).
  const int64_t nthreads = at::get_num_threads();
  const int64_t nblocks = (k + kLanes - 1) / kLanes;
  const int64_t useful = std::min<int64_t>(nthreads, (rows * k + kMinElementsPerThread - 1) / kMinElementsPerThread);
  if (useful <= 1 || at::in_parallel_region()) {
    channels(0, k);
    return false;
  }
  if (nblocks >= useful) {
    // One task per thread-sized run of channel blocks: each thread takes ceil(nblocks / useful) blocks, so
    // the threads finish together (five 128-channel tasks for K = 576 split 3/2 over two threads), and the
    // chunk merge and the hook run inside the same parallel region instead of serially after it.
    const int64_t per = (nblocks + useful - 1) / useful;
    const int64_t ntasks = (nblocks + per - 1) / per;
    // `also` runs in the tasks only when there is one task per thread
    const bool with_also = also != nullptr && ntasks == nthreads;
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        channels(t * per * kLanes, std::min(k, (t + 1) * per * kLanes));
        if (with_also) also->fn(also->ctx, t, ntasks);
      }
    });
    return with_also;
  }
  // few channels, many rows: tasks over chunk x channel group, then the chunk merge over channels
  const int64_t ngroups = (k + kGroupChannels - 1) / kGroupChannels;
  const int64_t ntasks = nchunks * ngroups;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ci = t / ngroups, g0 = (t % ngroups) * kGroupChannels;
      run_chunk(ctx, ci, g0, std::min(k, g0 + kGroupChannels));
    }
  });
  at::parallel_for(0, k, 64, [&](int64_t j0, int64_t j1) {
    finish_channels(ctx, out, j0, j1);
    if (then != nullptr) then->fn(then->ctx, j0, j1);
  });
  return false;
}

at::Tensor stats_then_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const bool* mask, int64_t seq_len, const PartialsView& out, const ChannelHook* then) {
  // Statistics pass first, while x is still in the caches from the op that produced it, then the GEMM.
  // Measured on a freshly produced x (as in a forward), 1 thread, SmolLM2 shapes: +1.2..3.8 % over the
  // plain GEMM in this order vs +2.7..7.3 % in the other (the GEMM's packing evicts x).
  if (!linear_fp32_own_applies(x, weight, bias)) {
    welford_partials_into(x, mask, seq_len, out, then);
    return at::linear(x, weight, bias);
  }
  const at::Tensor wc = weight.contiguous();
  const c10::optional<at::Tensor> bc =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  LinearFp32Args args = linear_fp32_args(x, wc, bc, y);
  // each thread computes its rows of y as soon as its channels' statistics are done
  const TaskHook gemm{[](void* c, int64_t task, int64_t ntasks) {
                        linear_fp32_task(*static_cast<const LinearFp32Args*>(c), task, ntasks);
                      },
                      &args};
  if (!welford_partials_into(x, mask, seq_len, out, then, &gemm)) linear_fp32_parallel(args);
  return y;
}

namespace {

using Partials = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The partials as new tensors, for arguments that passed check_partials_args, written by
// pass(x contiguous, mask or nullptr, view of the outputs).
template <typename Pass>
Partials partials_tensors(const at::Tensor& x_in, const c10::optional<at::Tensor>& row_mask, int64_t seq_len,
                          const Pass& pass) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = row_mask.has_value() && row_mask->defined() ? row_mask->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), k = x.size(1), nseq = seq_len > 0 ? rows / seq_len : 0;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor count = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({k}, f32), m2 = at::empty({k}, f32);
  at::Tensor amean = at::empty({k}, f32), am2 = at::empty({k}, f32);
  at::Tensor seq = at::empty({nseq, k}, f32);
  pass(x, mask.defined() ? mask.data_ptr<bool>() : nullptr,
       PartialsView{count.data_ptr<int64_t>(), mean.data_ptr<float>(), m2.data_ptr<float>(), amean.data_ptr<float>(),
                    am2.data_ptr<float>(), seq.data_ptr<float>()});
  return {count, mean, m2, amean, am2, seq};
}

Partials welford_partials_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& row_mask, int64_t seq_len) {
  check_partials_args(x, row_mask, seq_len);
  return partials_tensors(x, row_mask, seq_len, [&](const at::Tensor& xc, const bool* mask, const PartialsView& out) {
    welford_partials_into(xc, mask, seq_len, out);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_with_stats_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& row_mask, int64_t seq_len) {
  check_linear_with_stats_args(x, weight, bias, row_mask, seq_len);
  at::Tensor y;
  auto stats = partials_tensors(x, row_mask, seq_len, [&](const at::Tensor& xc, const bool* mask,
                                                          const PartialsView& out) {
    y = stats_then_linear(xc, weight, bias, mask, seq_len, out, nullptr);
  });
  return {y, std::get<0>(stats), std::get<1>(stats), std::get<2>(stats), std::get<3>(stats), std::get<4>(stats),
          std::get<5>(stats)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("welford_partials_cpu(Tensor x, Tensor? row_mask, int seq_len) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &welford_partials_cpu);
  m.def("linear_with_stats_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor? row_mask, int seq_len) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &linear_with_stats_cpu);
}

}  // namespace persona_kernels
