// Bitmask-gated linear on the CPU, large M (prefill): y = x @ (W * G)^T + b, see gated_linear_cpu.cpp for the
// whole op and its strategies. This file holds the two large-M paths:
//
// * bf16 on CPUs with AVX512_BF16: a GEMM of our own. x is packed once per call into 32-row tiles of column
//   pairs; each thread gates 12 weight rows at a time into scratch (W read once, the next rows prefetched
//   meanwhile) and multiplies them with every x tile (bf16 dot products, fp32 accumulation, 24 accumulators
//   of 16 rows).
// * other dtypes or CPUs: each thread gates its range of W rows panel by panel (about 2 MiB) into its own
//   buffer and hands each panel to the GEMM torch uses (MKL / oneDNN), writing straight into a column slice
//   of y. bf16 runs a bf16 GEMM where the CPU has AVX512_BF16 (gamma * w rounded to bf16).
#include <ATen/ATen.h>
#include <torch/types.h>

#include <array>
#include <utility>

#include "gated_linear_cpu.h"
#include "transpose_avx512.h"

namespace persona_kernels {
namespace gated_cpu {
namespace {

// Panel of gated weights handed to one GEMM call (per thread): about 2 MiB, so it stays in cache.
constexpr int64_t kPanelBytes = int64_t{2} << 20;

int64_t panel_rows(int64_t K, int64_t elem) {
  const char* env = std::getenv("PERSONA_KERNELS_GATED_LINEAR_PANEL");
  if (env != nullptr && *env != '\0') return std::max<int64_t>(1, std::atoll(env));
  return std::max<int64_t>(16, kPanelBytes / (std::max<int64_t>(K, 1) * elem) / 16 * 16);
}

// ----------------------------------------------------------------------------------------------
// Panel gating for the GEMM path: rows [0, rows) of W (and their bits) -> gated rows in `out`
// (row stride K) as fp32, or as bf16 when the GEMM runs in bf16 (gamma * w then rounds to bf16).
// ----------------------------------------------------------------------------------------------
template <typename WT>
void gate_f32_portable(const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words, float gamma,
                       float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(w[r * K + k]);
      out[r * K + k] = bit_of(bits + r * words, k) ? v : v * gamma;
    }
}

void gate_bf16_portable(const BFloat16* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words, float gamma,
                        BFloat16* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const BFloat16 v = w[r * K + k];
      out[r * K + k] = bit_of(bits + r * words, k) ? v : BFloat16(static_cast<float>(v) * gamma);
    }
}

#if PK_X86
template <typename WT>
PK_TARGET_AVX512 void gate_f32_avx512(const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                                      float gamma, float* out) {
  const __m512 g = _mm512_set1_ps(gamma);
  for (int64_t r = 0; r < rows; ++r) {
    const WT* wr = w + r * K;
    const uint32_t* br = bits + r * words;
    float* o = out + r * K;
    // Full vectors with plain stores (masked stores are slow on AMD Zen 4), then the masked tail.
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __mmask16 keep = static_cast<__mmask16>(br[k >> 5] >> (k & 16));
      _mm512_storeu_ps(o + k, gated16_avx512<WT>(wr + k, keep, static_cast<__mmask16>(0xFFFF), g));
    }
    if (k < K) {
      const __mmask16 valid = static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __mmask16 keep = static_cast<__mmask16>(br[k >> 5] >> (k & 16));
      _mm512_mask_storeu_ps(o + k, valid, gated16_avx512<WT>(wr + k, keep, valid, g));
    }
  }
}

// Gates `rows` weight rows (row stride K) into `out` (row stride ldo >= K). With ldo >= K rounded up to 32 the
// last block is written whole (zeros past K), as our GEMM reads it; Split needs that.
template <int Mode>
PK_TARGET_AVX512BF16 void gate_rows_ld(const BFloat16* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                                       float gamma, BFloat16* out, int64_t ldo) {
  const __m512 g = _mm512_set1_ps(gamma);
  const bool whole = ldo >= (K + 31) / 32 * 32;
  for (int64_t r = 0; r < rows; ++r) {
    const BFloat16* wr = w + r * K;
    const uint32_t* br = bits + r * words;
    BFloat16* o = out + r * ldo;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) _mm512_storeu_si512(o + k, gate32_mode<Mode>(wr + k, br[k >> 5], ~0u, g));
    if (k < K) {
      const __mmask32 valid = static_cast<__mmask32>((1ull << (K - k)) - 1u);
      const __m512i v = gate32_mode<Mode>(wr + k, br[k >> 5], valid, g);
      if (whole) _mm512_storeu_si512(o + k, v);
      else _mm512_mask_storeu_epi16(o + k, valid, v);
    }
  }
}

template <typename WT>
PK_TARGET_AVX2 void gate_f32_avx2(const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                                  float gamma, float* out) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 g = _mm256_set1_ps(gamma);
  const __m256 one = _mm256_set1_ps(1.0f);
  const int64_t kv = K & ~int64_t{7};
  for (int64_t r = 0; r < rows; ++r) {
    const WT* wr = w + r * K;
    const uint32_t* br = bits + r * words;
    float* o = out + r * K;
    for (int64_t k = 0; k < kv; k += 8) {
      const int b8 = static_cast<int>((br[k >> 5] >> (k & 31)) & 0xFFu);
      const __m256 keep =
          _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b8), lane_bit), lane_bit));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(load8_as_f32<WT>(wr + k), _mm256_blendv_ps(g, one, keep)));
    }
    for (int64_t k = kv; k < K; ++k) {
      const float v = static_cast<float>(wr[k]);
      o[k] = bit_of(br, k) ? v : v * gamma;
    }
  }
}
#endif  // PK_X86

template <typename WT>
void gate_rows_f32(Isa isa, const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words, float gamma,
                   float* out) {
#if PK_X86
  if (isa == Isa::Avx512) return gate_f32_avx512<WT>(w, bits, rows, K, words, gamma, out);
  if (isa == Isa::Avx2) return gate_f32_avx2<WT>(w, bits, rows, K, words, gamma, out);
#endif
  gate_f32_portable<WT>(w, bits, rows, K, words, gamma, out);
}

void gate_rows_bf16(bool vector, const BFloat16* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                    float gamma, BFloat16* out) {
#if PK_X86
  if (vector) return gate_rows_ld<kGateMul>(w, bits, rows, K, words, gamma, out, K);
#endif
  gate_bf16_portable(w, bits, rows, K, words, gamma, out);
}

}  // namespace

#if PK_X86
namespace {

// ---- bf16 GEMM of our own (AVX512_BF16): gating fused into the only pass that prepares W ----
// x is packed once per call into tiles of 32 rows in column-pair order; each thread gates 12 weight rows at a
// time into scratch (natural layout) and runs the 32 x 12 tile kernel over every x tile, broadcasting one
// gated (w[n, 2p], w[n, 2p+1]) pair per row against 32 rows' x pairs: 24 accumulators of 16 rows each.
constexpr int kTileM = 32;
constexpr int kTileN = 12;

// x [M, K] (row stride ldx) -> xp: tile t, column pair p (of KB = K rounded up to 32, halved) holds rows
// t*32 .. t*32+31 as dwords (x[m, 2p] | x[m, 2p+1] << 16) at xp[(t * KB + p) * 32 + i], each 32-column block in
// split order when `split` (see GateMode); rows beyond M and columns beyond K are 0. Column pairs [p0, p1), both
// multiples of 16 (threads packing disjoint pair ranges write disjoint cache lines).
PK_TARGET_AVX512 void pack_x_pairs(const BFloat16* x, int64_t ldx, int64_t M, int64_t K, uint32_t* xp, int64_t p0,
                                   int64_t p1, bool split) {
  const int64_t KB = (K + 31) / 32 * 16, T = (M + kTileM - 1) / kTileM;
  for (int64_t t = 0; t < T; ++t) {
    uint32_t* tile = xp + t * KB * kTileM;
    // 16 rows x 16 column pairs (one 32-column block) at a time through a register transpose
    for (int h = 0; h < kTileM; h += 16) {
      const BFloat16* src[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = t * kTileM + h + i;
        src[i] = m < M ? x + m * ldx : nullptr;
      }
      for (int64_t p = p0; p < p1; p += 16) {
        const __mmask32 valid = K - 2 * p >= 32 ? ~0u : static_cast<__mmask32>((1ull << (K - 2 * p)) - 1u);
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          r[i] = src[i] ? _mm512_maskz_loadu_epi16(valid, src[i] + 2 * p) : _mm512_setzero_si512();
          if (split) r[i] = split_block(r[i]);
        }
        transpose16_dwords(r);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(tile + (p + c) * kTileM + h, r[c]);
      }
    }
  }
}

// One tile: rows 32t .. 32t+31 of x against NR gated rows (row stride ldg dwords). Writes
// stage[r * 32 + i] = bf16(sum_p x pair p of row 32t + i . w[r] pair p + bias[r]). Meanwhile prefetches the first
// pf_lines cache lines from pf into L2 (the weight rows the thread gates next), one per column pair.
template <int NR>
PK_TARGET_AVX512BF16 void tile_bf16(const uint32_t* xp, const uint32_t* wg, int64_t ldg, int64_t KP, const float* bias,
                                    uint16_t* stage, const char* pf, int64_t pf_lines) {
  __m512 acc[NR][2];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p) {
    if (p < pf_lines) _mm_prefetch(pf + p * 64, _MM_HINT_T1);
    const __m512i x0 = _mm512_loadu_si512(xp + p * kTileM), x1 = _mm512_loadu_si512(xp + p * kTileM + 16);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_set1_epi32(static_cast<int>(wg[r * ldg + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)x0, (__m512bh)wv);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)x1, (__m512bh)wv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const __m512 b = _mm512_set1_ps(bias ? bias[r] : 0.0f);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_add_ps(acc[r][1], b), _mm512_add_ps(acc[r][0], b));
    _mm512_storeu_si512(stage + r * kTileM, (__m512i)v);
  }
}

using TileFn = void (*)(const uint32_t*, const uint32_t*, int64_t, int64_t, const float*, uint16_t*, const char*,
                        int64_t);
template <int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&tile_bf16<R + 1>...};
}

}  // namespace

torch::Tensor gated_linear_own_bf16(const torch::Tensor& x, const torch::Tensor& weight, const uint32_t* bits,
                                    const float* bias, float gamma) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1), words = packed_words(K);
  const int64_t KB = (K + 31) / 32 * 16, T = (M + kTileM - 1) / kTileM;  // column pairs, whole blocks
  const bool split = gamma != 0.0f;  // gamma = 0: zeroing move, natural order; else split order (see GateMode)
  torch::Tensor xp = torch::empty({T * KB * kTileM}, x.options().dtype(torch::kInt32));
  uint32_t* xpp = reinterpret_cast<uint32_t*>(xp.data_ptr<int32_t>());
  const BFloat16* xb = x.data_ptr<BFloat16>();
  run_chunks(KB, std::max<int64_t>(64, KB / (2 * at::get_num_threads())) / 16 * 16,
             [&](int64_t p0, int64_t p1) { pack_x_pairs(xb, x.stride(0), M, K, xpp, p0, p1, split); });
  torch::Tensor y = torch::empty({M, N}, x.options());
  BFloat16* yp = y.data_ptr<BFloat16>();
  const BFloat16* w = weight.data_ptr<BFloat16>();
  const int64_t ldg = unaliased_stride(KB, 4);  // dwords per gated row
  static constexpr auto tiles = tile_table(std::make_integer_sequence<int, kTileN>{});
  const int64_t nblocks = (N + kTileN - 1) / kTileN;
  run_chunks(nblocks, 1, [&](int64_t b0, int64_t b1) {
    uint32_t* wg = static_cast<uint32_t*>(thread_scratch(ScratchSlot::GatedBlock, kTileN * ldg * 4));
    alignas(64) uint16_t stage[kTileN * kTileM];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kTileN;
      const int rows = static_cast<int>(std::min<int64_t>(kTileN, N - n0));
      BFloat16* wgb = reinterpret_cast<BFloat16*>(wg);
      if (split) gate_rows_ld<kGateSplit>(w + n0 * K, bits + n0 * words, rows, K, words, gamma, wgb, 2 * ldg);
      else gate_rows_ld<kGateZero>(w + n0 * K, bits + n0 * words, rows, K, words, gamma, wgb, 2 * ldg);
      for (int64_t t = 0; t < T; ++t) {
        // the first tile prefetches the next block's weight rows (contiguous in W)
        const int64_t next = std::min<int64_t>(kTileN, N - n0 - rows);
        const int64_t lines = t == 0 && b + 1 < b1 && next > 0 ? next * K * 2 / 64 : 0;
        tiles[rows - 1](xpp + t * KB * kTileM, wg, ldg, KB, bias ? bias + n0 : nullptr, stage,
                        reinterpret_cast<const char*>(w + (n0 + rows) * K), lines);
        const int mrows = static_cast<int>(std::min<int64_t>(kTileM, M - t * kTileM));
        for (int i = 0; i < mrows; ++i) {
          uint16_t* yr = reinterpret_cast<uint16_t*>(yp + (t * kTileM + i) * N + n0);
          for (int r = 0; r < rows; ++r) yr[r] = stage[r * kTileM + i];
        }
      }
    }
  });
  return y;
}
#endif  // PK_X86

// Large M: the threads of one parallel region claim panels of W rows one at a time, gate each into
// their own buffer and multiply it with the GEMM torch uses (inside the parallel region MKL / oneDNN
// run single-threaded), writing straight into the panel's column slice of y. One parallel region
// per call keeps the synchronisation cost low on a busy machine.
torch::Tensor gated_linear_gemm(const torch::Tensor& x, const torch::Tensor& weight, const uint32_t* bits,
                                const c10::optional<torch::Tensor>& bias, float gamma, Isa isa, bool bf16_gemm) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1), words = packed_words(K);
  const auto wtype = weight.scalar_type();
  const auto gtype = bf16_gemm ? torch::kBFloat16 : torch::kFloat;
  const torch::Tensor xg = x.to(gtype);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(gtype));
  const c10::optional<torch::Tensor> bg = bias.has_value() ? c10::optional<torch::Tensor>(bias->to(gtype)) : bias;
  const int64_t P = std::min<int64_t>(panel_rows(K, bf16_gemm ? 2 : 4), N);
  const int64_t panels = (N + P - 1) / P;
  run_chunks(panels, 1, [&](int64_t p0, int64_t p1) {
    // this thread's gated panel, reused across calls
    void* scratch = thread_scratch(ScratchSlot::GatedPanel, static_cast<size_t>(P * K) * (bf16_gemm ? 2 : 4));
    const torch::Tensor panel =
        torch::from_blob(scratch, {P * K}, torch::TensorOptions().dtype(gtype).device(torch::kCPU));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * P, np = std::min<int64_t>(P, N - n0);
      const uint32_t* b = bits + n0 * words;
      if (bf16_gemm) {
        gate_rows_bf16(isa == Isa::Avx512, weight.data_ptr<BFloat16>() + n0 * K, b, np, K, words, gamma,
                       panel.data_ptr<BFloat16>());
      } else if (wtype == torch::kFloat) {
        gate_rows_f32(isa, weight.data_ptr<float>() + n0 * K, b, np, K, words, gamma, panel.data_ptr<float>());
      } else if (wtype == torch::kHalf) {
        gate_rows_f32(isa, weight.data_ptr<Half>() + n0 * K, b, np, K, words, gamma, panel.data_ptr<float>());
      } else {
        gate_rows_f32(isa, weight.data_ptr<BFloat16>() + n0 * K, b, np, K, words, gamma, panel.data_ptr<float>());
      }
      const torch::Tensor wp = panel.narrow(0, 0, np * K).view({np, K});
      torch::Tensor yp = y.narrow(1, n0, np);
      if (bg.has_value()) {
        at::addmm_out(yp, bg->narrow(0, n0, np), xg, wp.t());
      } else {
        at::mm_out(yp, xg, wp.t());
      }
    }
  });
  return y.scalar_type() == wtype ? y : y.to(wtype);
}

}  // namespace gated_cpu
}  // namespace persona_kernels
