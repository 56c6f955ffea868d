// fp32 linear y = x W^T + b on the CPU with a GEMM of our own (AVX-512 + FMA), for the calibration pass.
//
// Why: on the AMD Zen 4 CPU we measure on, the fp32 GEMM torch calls (MKL) reaches 56-77 GFLOP/s on one core
// at SmolLM2's calibration shapes (2208 x 576 x 576 / 1536), 55-70 % of the core's FMA peak (~112 GFLOP/s).
// This kernel takes 0.63-0.91x of F.linear's time there on one thread and 0.70-0.86x on two (per-call
// microbenchmarks; in a whole SmolLM2 forward the recorded Linears save about 5 %). The statistics op
// (linear_stats_merge_cpu_, linear_with_stats_cpu) runs it in the statistics pass's own parallel region: each
// thread, having finished its channels' statistics, computes its range of output rows, so a calibration
// forward needs no extra fork / join for the GEMM.
//
// Blocking: each thread takes a range of rows of x; 256 rows at a time (K above 2048 split into blocks of at
// most 768 columns) are packed into 32-row tiles, column-major within a tile (16 x 16 register transposes).
// For every 12 weight rows the 32 x 12 tile kernel (24 zmm accumulators) broadcasts w[n, k] against 32 rows'
// x[:, k]; the result is transposed back in registers and stored with the bias (the first K block) or added
// to y (later K blocks). Weight rows are read in place, or copied to a 64-byte-longer stride when K * 4 is a
// multiple of 2 KiB (L1 set aliasing, see unaliased_stride).
//
// Summation order differs from MKL's: results agree to fp32 rounding, not bit for bit.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <utility>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#if !defined(__clang__)
// GCC 12 reports false positives on the deliberately undefined registers inside <immintrin.h> casts.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define PK_X86 1
#define PK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define PK_X86 0
#endif

#include "common.h"
#include "transpose_avx512.h"

namespace persona_kernels {
namespace {

constexpr int kTileM = 32;               // rows of x per tile (two zmm of 16 rows)
constexpr int kTileN = 12;               // weight rows per tile
// Block sizes from a sweep at SmolLM2's shapes (256 and 2208 rows, 1 thread; 64-256 rows, K blocks from 512
// columns or none up to K = 2048): 256 rows and no K blocks up to 2048 columns were fastest, though within
// the noise of this shared machine for K = 576.
constexpr int64_t kBlockRows = 256;      // rows of x packed at a time
constexpr int64_t kMaxBlockK = 2048;     // K above this is cut into even blocks
constexpr int64_t kTargetBlockK = 768;   // ... of at most this many columns (multiples of 16)
constexpr int64_t kMinRows = 32;         // fewer rows: at::linear

int64_t block_k(int64_t K) {
  if (K <= kMaxBlockK) return K;
  const int64_t nb = (K + kTargetBlockK - 1) / kTargetBlockK;
  return ((K + nb - 1) / nb + 15) / 16 * 16;
}

#if PK_X86
// x rows [0, rows) x columns [0, kc) (row stride ldx) -> xp: tile t, column p holds rows 32t .. 32t+31 at
// xp[(t * kp + p) * 32 + i], kp = kc rounded up to 16; rows beyond `rows` and columns beyond kc are 0.
PK_TARGET_AVX512 void pack_block(const float* x, int64_t ldx, int64_t rows, int64_t kc, float* xp) {
  const int64_t kp = (kc + 15) / 16 * 16, T = (rows + kTileM - 1) / kTileM;
  for (int64_t t = 0; t < T; ++t) {
    float* tile = xp + t * kp * kTileM;
    for (int h = 0; h < kTileM; h += 16) {
      const float* src[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = t * kTileM + h + i;
        src[i] = m < rows ? x + m * ldx : nullptr;
      }
      for (int64_t p = 0; p < kp; p += 16) {
        const __mmask16 valid = kc - p >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (kc - p)) - 1u);
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          r[i] = src[i] ? _mm512_maskz_loadu_epi32(valid, src[i] + p) : _mm512_setzero_si512();
        }
        transpose16_dwords(r);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(tile + (p + c) * kTileM + h, r[c]);
      }
    }
  }
}

// One tile: rows 32t .. 32t + mrows - 1 of the packed block against NR weight rows (stride ldw) over kc
// columns. Writes y[i, r] (row stride ldy) = acc + bias[r] (bias may be null), or adds acc to y when `add`.
template <int NR>
PK_TARGET_AVX512 void tile_f32(const float* xp, const float* w, int64_t ldw, int64_t kc, float* y, int64_t ldy,
                               int mrows, bool add, const float* bias) {
  __m512 acc[NR][2];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 x0 = _mm512_loadu_ps(xp + p * kTileM), x1 = _mm512_loadu_ps(xp + p * kTileM + 16);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_set1_ps(w[r * ldw + p]);
      acc[r][0] = _mm512_fmadd_ps(x0, wv, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x1, wv, acc[r][1]);
    }
  }
  const __mmask16 cols = static_cast<__mmask16>((1u << NR) - 1u);
  const __m512 b = bias != nullptr && !add ? _mm512_maskz_loadu_ps(cols, bias) : _mm512_setzero_ps();
  for (int h = 0; h < 2 && h * 16 < mrows; ++h) {
    __m512i r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < NR ? _mm512_castps_si512(acc[i][h]) : _mm512_setzero_si512();
    transpose16_dwords(r);  // r[i]: row 16h + i, weight rows 0 .. NR-1 in lanes 0 .. NR-1
    const int n = std::min(16, mrows - h * 16);
    for (int i = 0; i < n; ++i) {
      float* yr = y + (h * 16 + i) * ldy;
      const __m512 v = _mm512_castsi512_ps(r[i]);
      const __m512 base = add ? _mm512_maskz_loadu_ps(cols, yr) : b;
      _mm512_mask_storeu_ps(yr, cols, _mm512_add_ps(v, base));
    }
  }
}

using TileFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, int, bool, const float*);
template <int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&tile_f32<R + 1>...};
}
#endif  // PK_X86

}  // namespace

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  PK_CHECK_ARG(weight.dim() == 2 && weight.size(1) == x.size(1), "weight", "expected shape [N, ", x.size(1),
               "], got ", weight.sizes());
  PK_CHECK_ARG(weight.scalar_type() == x.scalar_type(), "weight", "dtype ", weight.scalar_type(),
               " does not match x's dtype ", x.scalar_type());
  PK_CHECK_ARG(weight.device().is_cpu(), "weight", "expected a CPU tensor, got device ", weight.device());
  if (bias.has_value() && bias->defined()) {
    PK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type() &&
                     bias->device().is_cpu(),
                 "bias", "expected a CPU ", x.scalar_type(), " tensor [", weight.size(0), "], got ",
                 bias->scalar_type(), " ", bias->sizes());
  }
}

bool linear_fp32_own_applies(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
#if PK_X86
  const char* env = std::getenv("PERSONA_KERNELS_CPU_OWN_GEMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (cpu_isa() != Isa::Avx512) return false;
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return false;
  if (x.dim() != 2 || x.size(0) < kMinRows || x.size(1) == 0 || weight.size(0) == 0) return false;
  if (bias.has_value() && bias->defined() && bias->scalar_type() != at::kFloat) return false;
  return true;
#else
  (void)x, (void)weight, (void)bias;
  return false;
#endif
}

namespace {

// Rows [m0, m1) of y on the calling thread. x: row stride ldx; w: contiguous [N, K]; y: contiguous [M, N].
void linear_fp32_rows(const float* x, int64_t ldx, const float* w, int64_t N, int64_t K, const float* bias, float* y,
                      int64_t m0, int64_t m1) {
#if PK_X86
  if (m1 <= m0) return;
  static constexpr auto tiles = tile_table(std::make_integer_sequence<int, kTileN>{});
  const int64_t kb = block_k(K), kpb = (kb + 15) / 16 * 16;
  const bool copy_w = unaliased_stride(K, 4) != K;
  const int64_t ldc = unaliased_stride(kpb, 4);  // stride of the copied weight rows
  const size_t pack_floats = static_cast<size_t>(kBlockRows * kpb);
  float* xp = static_cast<float*>(
      thread_scratch(ScratchSlot::GemmPack, (pack_floats + (copy_w ? kTileN * ldc : 0)) * sizeof(float)));
  float* wc = xp + pack_floats;
  for (int64_t mb = m0; mb < m1; mb += kBlockRows) {
    const int64_t mc = std::min(kBlockRows, m1 - mb), T = (mc + kTileM - 1) / kTileM;
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      const int64_t kc = std::min(kb, K - k0), kp = (kc + 15) / 16 * 16;
      pack_block(x + mb * ldx + k0, ldx, mc, kc, xp);
      for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileN, N - n0));
        const float* wp = w + n0 * K + k0;
        int64_t ldw = K;
        if (copy_w) {
          for (int r = 0; r < rows; ++r) std::memcpy(wc + r * ldc, wp + r * K, static_cast<size_t>(kc) * 4);
          wp = wc;
          ldw = ldc;
        }
        for (int64_t t = 0; t < T; ++t) {
          tiles[rows - 1](xp + t * kp * kTileM, wp, ldw, kc, y + (mb + t * kTileM) * N + n0, N,
                          static_cast<int>(std::min<int64_t>(kTileM, mc - t * kTileM)), k0 > 0,
                          bias != nullptr ? bias + n0 : nullptr);
        }
      }
    }
  }
#else
  (void)x, (void)ldx, (void)w, (void)N, (void)K, (void)bias, (void)y, (void)m0, (void)m1;
  TORCH_CHECK(false, "persona_kernels: linear_fp32_rows needs an x86 CPU");
#endif
}

}  // namespace

void linear_fp32_task(const LinearFp32Args& a, int64_t task, int64_t ntasks) {
  // whole tiles per task (the last one takes what is left)
  const int64_t per = ((a.M + ntasks - 1) / ntasks + kTileM - 1) / kTileM * kTileM;
  linear_fp32_rows(a.x, a.ldx, a.w, a.N, a.K, a.bias, a.y, std::min(a.M, task * per), std::min(a.M, (task + 1) * per));
}

void linear_fp32_parallel(const LinearFp32Args& a) {
  const int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // at least two tiles' worth of rows per thread
  const int64_t ntasks = std::max<int64_t>(1, std::min<int64_t>(nthreads, a.M / (2 * kTileM)));
  if (ntasks == 1) return linear_fp32_task(a, 0, 1);
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) linear_fp32_task(a, t, ntasks);
  });
}

LinearFp32Args linear_fp32_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::Tensor& y) {
  return LinearFp32Args{x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(),
                        bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr,
                        y.data_ptr<float>(), x.size(0), weight.size(0), x.size(1)};
}

namespace {

// The op: y = x W^T + b with the GEMM above where it applies (fp32, AVX-512, at least 32 rows), else at::linear.
at::Tensor linear_fp32_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  PK_CHECK_ARG(x.dim() == 2 && x.device().is_cpu(), "x", "expected a 2-D CPU tensor [M, K], got ", x.sizes());
  check_linear_args(x, weight, bias);
  if (!linear_fp32_own_applies(x, weight, bias)) return at::linear(x, weight, bias);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const c10::optional<at::Tensor> bc =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  linear_fp32_parallel(linear_fp32_args(xc, wc, bc, y));
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("linear_fp32_cpu(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &linear_fp32_cpu);
}

}  // namespace persona_kernels
