// CUDA per-channel activation statistics of one batch (the "welford_partials" contract of docs/DESIGN.md),
// and the fused linear_with_stats (the GEMM of gemm_tiles.cuh reducing the x tiles it stages; see below).
//
// For x [R, K] (fp32 / fp16 / bf16), optional row_mask bool [R], seq_len >= 0:
//   count int64[K]   valid rows (row_mask True) whose x[:, j] is finite
//   mean, m2 f32[K]  Welford mean and sum of squared deviations over those rows; abs_mean, abs_m2 for |x|
//   seq_sumsq f32[S, K], S = R // seq_len (seq_len > 0, else S = 0): sum of x^2 over the valid finite rows
//   of sequence s = rows [s * seq_len, (s + 1) * seq_len). Rows past S * seq_len count in the channel
//   statistics only.
//
// Deterministic, no atomics:
//   pass 1  grid (ceil(K/64), min(ceil(G/4), 65535)), block (64 channels, 4 segments). The rows are cut into G segments
//           of at most L rows that never straddle a sequence boundary. A thread reduces one channel of one
//           segment: batches of 8 rows are reduced exactly (two-pass in registers) and merged into the
//           running state with Chan's formula (one division per batch). The 4 segment states of a block
//           are merged in a fixed order and written as one partial per (block row, channel); each
//           segment's sum of squares goes to its sequence (directly when a sequence is one segment, else
//           to a per-segment workspace).
//   pass 2  one thread per channel merges the block partials in order (in fp64) into the outputs;
//           when a sequence spans several segments a third small kernel adds their sums in order.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "gemm_tiles.cuh"

namespace persona_kernels {
namespace cuda {
namespace {

constexpr int kChan = 64;  // channels per block (threadIdx.x)
constexpr int kSegs = 4;   // segments per block (threadIdx.y)
constexpr int kBatch = 8;  // rows reduced exactly before each Chan merge
constexpr int kMaxGridY = 65535;

// Running statistics of one channel over some rows: count, mean / m2 of x and of |x|.
struct Stat {
  int n;
  float mean, m2, amean, am2;
};

__device__ __forceinline__ void chan_merge(Stat& a, int nb, float mb, float m2b, float amb, float am2b) {
  if (nb == 0) return;
  const int n = a.n + nb;
  const float fb = static_cast<float>(nb) * __frcp_rn(static_cast<float>(n));
  const float cross = static_cast<float>(a.n) * fb;  // na * nb / n
  const float d = mb - a.mean;
  a.mean += d * fb;
  a.m2 += m2b + d * d * cross;
  const float ad = amb - a.amean;
  a.amean += ad * fb;
  a.am2 += am2b + ad * ad * cross;
  a.n = n;
}

// Exact statistics of up to B values in registers: v[i] counts when ok[i] and it is finite (ok[] is updated).
// Returns count, mean and m2 of v and of |v| (two passes); adds the values' squares to `sumsq`.
template <int B>
__device__ __forceinline__ Stat exact_batch(const float (&v)[B], bool (&ok)[B], float& sumsq) {
  int nb = 0;
  float sum = 0.f, asum = 0.f;
#pragma unroll
  for (int i = 0; i < B; ++i) {
    ok[i] = ok[i] && isfinite(v[i]);
    if (ok[i]) {
      ++nb;
      sum += v[i];
      asum += fabsf(v[i]);
      sumsq = fmaf(v[i], v[i], sumsq);
    }
  }
  if (nb == 0) return Stat{0, 0.f, 0.f, 0.f, 0.f};
  const float inv = __frcp_rn(static_cast<float>(nb));
  const float mb = sum * inv, amb = asum * inv;
  float m2b = 0.f, am2b = 0.f;
#pragma unroll
  for (int i = 0; i < B; ++i) {
    if (ok[i]) {
      const float d = v[i] - mb;
      const float ad = fabsf(v[i]) - amb;
      m2b = fmaf(d, d, m2b);
      am2b = fmaf(ad, ad, am2b);
    }
  }
  return Stat{nb, mb, m2b, amb, am2b};
}

// Segment g -> rows [row0, row1) and the sequence it belongs to (-1 for none).
struct Segments {
  int64_t rows;       // R
  int64_t seq_len;    // 0: no sequences
  int64_t num_seq;    // S
  int64_t seg_len;    // L
  int64_t per_seq;    // segments per sequence, ceil(seq_len / L) (0 when seq_len == 0)
  int64_t num_segs;   // G
  __host__ __device__ __forceinline__ void bounds(int64_t g, int64_t& row0, int64_t& row1, int64_t& seq) const {
    const int64_t seq_segs = num_seq * per_seq;
    if (g < seq_segs) {
      // 32-bit division (the host checks num_segs < 2^31): a 64-bit one is a called subroutine.
      seq = static_cast<int64_t>(static_cast<uint32_t>(g) / static_cast<uint32_t>(per_seq));
      const int64_t p = g - seq * per_seq;
      row0 = seq * seq_len + p * seg_len;
      const int64_t end = (seq + 1) * seq_len;
      row1 = row0 + seg_len < end ? row0 + seg_len : end;
    } else {
      seq = -1;
      row0 = num_seq * seq_len + (g - seq_segs) * seg_len;
      row1 = row0 + seg_len < rows ? row0 + seg_len : rows;
    }
  }
};

// Segments of exactly `len` rows (fewer at a sequence's or the batch's end).
Segments fixed_segments(int64_t rows, int64_t seq_len, int64_t len) {
  Segments s{};
  s.rows = rows;
  s.seq_len = seq_len;
  s.num_seq = seq_len > 0 ? rows / seq_len : 0;
  s.seg_len = len;
  s.per_seq = seq_len > 0 ? ceil_div(seq_len, len) : 0;
  s.num_segs = s.num_seq * s.per_seq + ceil_div(rows - s.num_seq * seq_len, len);
  return s;
}

Segments make_segments(int64_t rows, int64_t seq_len) {
  // 32 rows per segment; longer ones when there are very many rows, to bound the pass-2 merge length.
  // (With short sequences the segment count cannot drop below one per sequence; the loop still ends.)
  for (int64_t len = 32;; len *= 2) {
    const Segments s = fixed_segments(rows, seq_len, len);
    if (ceil_div(s.num_segs, kSegs) <= 4096 || len >= 4096) return s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kChan * kSegs)
    welford_pass1_kernel(const T* __restrict__ x, const uint8_t* __restrict__ row_mask, int64_t k_in, Segments segs,
                         int* __restrict__ p_count, float* __restrict__ p_mean, float* __restrict__ p_m2,
                         float* __restrict__ p_amean, float* __restrict__ p_am2, float* __restrict__ seq_out) {
  __shared__ Stat st[kSegs][kChan];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kChan + tx;
  const int64_t parts = (segs.num_segs + kSegs - 1) / kSegs;

  // Block rows beyond the grid's y extent (at most 65535) are handled by a block-uniform stride loop.
  for (int64_t by = blockIdx.y; by < parts; by += gridDim.y) {
    const int64_t g = by * kSegs + ty;
    Stat s{0, 0.f, 0.f, 0.f, 0.f};
    if (j < k_in && g < segs.num_segs) {
      int64_t row0, row1, seq;
      segs.bounds(g, row0, row1, seq);
      float sumsq = 0.f;
      for (int64_t r0 = row0; r0 < row1; r0 += kBatch) {
        float v[kBatch];
        bool ok[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {  // all loads first: kBatch independent requests in flight
          const int64_t r = r0 + i;
          ok[i] = r < row1 && (row_mask == nullptr || row_mask[r] != 0);
          v[i] = ok[i] ? Elem<T>::to_float(x[r * k_in + j]) : 0.f;
        }
        const Stat b = exact_batch(v, ok, sumsq);
        chan_merge(s, b.n, b.mean, b.m2, b.amean, b.am2);
      }
      if (seq >= 0) {
        // One segment per sequence: the sequence's total. Else: this segment's share, summed by pass 3.
        const int64_t slot = segs.per_seq == 1 ? seq : g;
        seq_out[slot * k_in + j] = sumsq;
      }
    }
    st[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && j < k_in) {
      Stat acc = st[0][tx];
#pragma unroll
      for (int y = 1; y < kSegs; ++y) {
        const Stat b = st[y][tx];
        chan_merge(acc, b.n, b.mean, b.m2, b.amean, b.am2);
      }
      const int64_t o = by * k_in + j;
      p_count[o] = acc.n;
      p_mean[o] = acc.mean;
      p_m2[o] = acc.m2;
      p_amean[o] = acc.amean;
      p_am2[o] = acc.am2;
    }
    __syncthreads();  // st is rewritten by the next block row
  }
}

// Merge the block partials of channel j in block-row order, in fp64.
__global__ void welford_pass2_kernel(const int* __restrict__ p_count, const float* __restrict__ p_mean,
                                     const float* __restrict__ p_m2, const float* __restrict__ p_amean,
                                     const float* __restrict__ p_am2, int64_t parts, int64_t k_in,
                                     int64_t* __restrict__ count, float* __restrict__ mean, float* __restrict__ m2,
                                     float* __restrict__ amean, float* __restrict__ am2) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k_in) return;
  int64_t n = 0;
  double mu = 0.0, s2 = 0.0, amu = 0.0, as2 = 0.0;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t o = p * k_in + j;
    const int64_t nb = p_count[o];
    if (nb == 0) continue;
    const int64_t nn = n + nb;
    const double fb = static_cast<double>(nb) / static_cast<double>(nn);
    const double cross = static_cast<double>(n) * fb;
    const double d = static_cast<double>(p_mean[o]) - mu;
    mu += d * fb;
    s2 += static_cast<double>(p_m2[o]) + d * d * cross;
    const double ad = static_cast<double>(p_amean[o]) - amu;
    amu += ad * fb;
    as2 += static_cast<double>(p_am2[o]) + ad * ad * cross;
    n = nn;
  }
  count[j] = n;
  mean[j] = static_cast<float>(mu);
  m2[j] = static_cast<float>(s2);
  amean[j] = static_cast<float>(amu);
  am2[j] = static_cast<float>(as2);
}

// seq_sumsq[s, j] = sum over the sequence's segments p (in order) of seg_sumsq[s * per_seq + p, j].
__global__ void seq_sum_kernel(const float* __restrict__ seg_sumsq, int64_t num_seq, int64_t per_seq, int64_t k_in,
                               float* __restrict__ seq_sumsq) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k_in) return;
  for (int64_t s = blockIdx.y; s < num_seq; s += gridDim.y) {
    float acc = 0.f;
    for (int64_t p = 0; p < per_seq; ++p) acc += seg_sumsq[(s * per_seq + p) * k_in + j];
    seq_sumsq[s * k_in + j] = acc;
  }
}

using Partials = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Workspace of the block partials ([parts, K] each) and of the per-segment sums of squares; finish() merges them
// into the outputs (pass 2, and the per-sequence sums when a sequence spans several segments).
struct PartialsWork {
  at::Tensor count, stats, seg_sumsq;
  int64_t parts = 0, k_in = 0;
  float* seq_target = nullptr;

  PartialsWork(const at::Tensor& x, const Segments& segs, int64_t parts_, Partials& out) : parts(parts_) {
    k_in = x.size(1);
    const auto fopt = x.options().dtype(at::kFloat);
    count = at::empty({parts, k_in}, x.options().dtype(at::kInt));
    stats = at::empty({4, parts, k_in}, fopt);
    if (segs.num_seq > 0) {
      if (segs.per_seq == 1) {
        seq_target = std::get<5>(out).mutable_data_ptr<float>();
      } else {
        seg_sumsq = at::empty({segs.num_seq * segs.per_seq, k_in}, fopt);
        seq_target = seg_sumsq.mutable_data_ptr<float>();
      }
    }
  }
  int* p_count() { return count.mutable_data_ptr<int>(); }
  float* p_stat(int i) { return stats.mutable_data_ptr<float>() + i * parts * k_in; }  // mean, m2, amean, am2

  void finish(const Segments& segs, Partials& out, cudaStream_t stream) {
    const int threads = 256;
    const dim3 grid2(static_cast<unsigned>(ceil_div(k_in, threads)));
    welford_pass2_kernel<<<grid2, threads, 0, stream>>>(
        count.const_data_ptr<int>(), p_stat(0), p_stat(1), p_stat(2), p_stat(3), parts, k_in,
        std::get<0>(out).mutable_data_ptr<int64_t>(), std::get<1>(out).mutable_data_ptr<float>(),
        std::get<2>(out).mutable_data_ptr<float>(), std::get<3>(out).mutable_data_ptr<float>(),
        std::get<4>(out).mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (segs.num_seq > 0 && segs.per_seq > 1) {
      const dim3 grid3(static_cast<unsigned>(ceil_div(k_in, threads)),
                       static_cast<unsigned>(std::min<int64_t>(segs.num_seq, kMaxGridY)));
      seq_sum_kernel<<<grid3, threads, 0, stream>>>(seg_sumsq.const_data_ptr<float>(), segs.num_seq, segs.per_seq,
                                                    k_in, std::get<5>(out).mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

template <typename T>
void run_welford(const at::Tensor& x, const uint8_t* mask, const Segments& segs, Partials& out, cudaStream_t stream) {
  using CT = typename CudaType<T>::type;
  const int64_t k_in = x.size(1);
  PartialsWork work(x, segs, ceil_div(segs.num_segs, kSegs), out);
  const dim3 grid1(static_cast<unsigned>(ceil_div(k_in, kChan)),
                   static_cast<unsigned>(std::min<int64_t>(work.parts, kMaxGridY)));
  const dim3 block1(kChan, kSegs);
  welford_pass1_kernel<CT><<<grid1, block1, 0, stream>>>(cptr<T>(x), mask, k_in, segs, work.p_count(),
                                                         work.p_stat(0), work.p_stat(1), work.p_stat(2),
                                                         work.p_stat(3), work.seq_target);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  work.finish(segs, out, stream);
}

// ---------------------------------------------------------------------------------------------------------------
// Fused linear_with_stats: one tiled GEMM launch (gemm_tiles.cuh) whose M tiles are the statistics segments
// (<= 64 rows, never across a sequence boundary). The blocks of the first N tile column also reduce every x tile
// they stage in shared memory: per channel, the valid finite rows of the tile's thread group exactly (two-pass
// in registers), the groups merged with Chan's formula in a fixed order, one partial per (segment, channel) --
// the layout pass 2 merges. x is read from global memory once for both the product and the statistics.
// ---------------------------------------------------------------------------------------------------------------
struct SegmentTiles {
  Segments segs;
  __device__ __forceinline__ bool tile(int, TileSpec& s) const {
    int64_t row0, row1, seq;
    segs.bounds(blockIdx.x, row0, row1, seq);
    s.order = nullptr;
    s.first = row0;
    s.count = static_cast<int>(row1 - row0);
    s.mask = nullptr;
    s.gamma = 1.f;
    s.gated = false;
    s.seq = seq;
    return s.count > 0;
  }
};

struct TileStats {
  static constexpr bool kOn = true;
  const uint8_t* row_mask;  // null: every row valid
  int64_t per_seq;
  int* p_count;
  float *p_mean, *p_m2, *p_amean, *p_am2;  // [num_segs, K]
  float* seq_out;                          // per_seq == 1: [S, K], else [S * per_seq, K]; null: no sequences

  // `get(row, kk)`: x[tile row, k0 + kk] from the staged tile. Called by every thread of the block.
  template <int BM, int BK, int THREADS, class Get>
  __device__ void consume(const Get& get, const TileSpec& ts, int64_t k0, int64_t k_in) const {
    constexpr int kGroups = THREADS / BK;  // thread groups over the tile's rows
    constexpr int kRows = BM / kGroups;    // rows per thread
    static_assert(kGroups * BK == THREADS && kRows * kGroups == BM, "tile shape");
    __shared__ Stat part[kGroups][BK];
    __shared__ float part_sq[kGroups][BK];
    const int kk = threadIdx.x % BK, grp = threadIdx.x / BK;
    const bool chan_ok = k0 + kk < k_in;
    float v[kRows];
    bool ok[kRows];
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = grp * kRows + i;
      ok[i] = chan_ok && r < ts.count && (row_mask == nullptr || row_mask[ts.first + r] != 0);
      v[i] = ok[i] ? get(r, kk) : 0.f;
    }
    const Stat st = exact_batch(v, ok, sq);
    part[grp][kk] = st;
    part_sq[grp][kk] = sq;
    __syncthreads();
    // `part` is rewritten only after the GEMM's next two __syncthreads, so no barrier is needed after this.
    if (grp == 0 && chan_ok) {
      Stat acc = part[0][kk];
      float sqs = part_sq[0][kk];
#pragma unroll
      for (int y = 1; y < kGroups; ++y) {
        const Stat b = part[y][kk];
        chan_merge(acc, b.n, b.mean, b.m2, b.amean, b.am2);
        sqs += part_sq[y][kk];
      }
      const int64_t j = k0 + kk;
      const int64_t o = static_cast<int64_t>(blockIdx.x) * k_in + j;
      p_count[o] = acc.n;
      p_mean[o] = acc.mean;
      p_m2[o] = acc.m2;
      p_amean[o] = acc.amean;
      p_am2[o] = acc.am2;
      if (ts.seq >= 0 && seq_out != nullptr) {
        const int64_t slot = per_seq == 1 ? ts.seq : static_cast<int64_t>(blockIdx.x);
        seq_out[slot * k_in + j] = sqs;
      }
    }
  }
};

template <typename T>
void run_linear_with_stats_fused(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const uint8_t* mask, int64_t seq_len, at::Tensor& y, Partials& out, int device) {
  using CT = typename CudaType<T>::type;
  const int64_t rows = x.size(0), k_in = x.size(1), n_out = weight.size(0);
  static_assert(kMmaBM == kSimtBM, "one segment length for both tiled kernels");
  const Segments segs = fixed_segments(rows, seq_len, kMmaBM);
  PartialsWork work(x, segs, segs.num_segs, out);
  const TileStats stats{mask,          segs.per_seq,  work.p_count(), work.p_stat(0), work.p_stat(1),
                        work.p_stat(2), work.p_stat(3), work.seq_target};
  const CT* xp = cptr<T>(x);
  const CT* wp = cptr<T>(weight);
  const CT* bp = bias.has_value() && bias->defined() ? cptr<T>(*bias) : nullptr;
  const bool vec = (k_in % 8 == 0) && aligned16(xp) && aligned16(wp);
  const bool use_wmma = !std::is_same<CT, float>::value && requested_path() != Path::Simt && device_cc_major(device) >= 8;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  launch_gemm_tiles<CT>(xp, wp, bp, mptr<T>(y), n_out, k_in, /*k_words=*/0, segs.num_segs, SegmentTiles{segs}, stats,
                        use_wmma, vec, stream);
  work.finish(segs, out, stream);
}

void check_stats_args(const at::Tensor& x, const std::optional<at::Tensor>& row_mask, int64_t seq_len) {
  PK_CUDA_CHECK_ARG(x.is_cuda(), "x", "expected a CUDA tensor, got device ", x.device());
  PK_CUDA_CHECK_ARG(x.dim() == 2, "x", "expected a 2-D tensor [R, K], got ", x.dim(), " dims");
  const auto dtype = x.scalar_type();
  PK_CUDA_CHECK_ARG(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "x",
                    "expected dtype float32, float16 or bfloat16, got ", dtype);
  PK_CUDA_CHECK_ARG(x.is_contiguous(), "x", "expected a contiguous tensor");
  PK_CUDA_CHECK_ARG(seq_len >= 0, "seq_len", "expected a non-negative integer, got ", seq_len);
  if (row_mask.has_value() && row_mask->defined()) {
    PK_CUDA_CHECK_ARG(row_mask->scalar_type() == at::kBool, "row_mask", "expected dtype torch.bool, got ",
                      row_mask->scalar_type());
    PK_CUDA_CHECK_ARG(row_mask->dim() == 1 && row_mask->size(0) == x.size(0), "row_mask", "expected shape [",
                      x.size(0), "], got ", row_mask->sizes());
    PK_CUDA_CHECK_ARG(row_mask->device() == x.device(), "row_mask", "expected device ", x.device(), ", got ",
                      row_mask->device());
    PK_CUDA_CHECK_ARG(row_mask->is_contiguous(), "row_mask", "expected a contiguous tensor");
  }
}

Partials welford_partials_impl(const at::Tensor& x, const std::optional<at::Tensor>& row_mask, int64_t seq_len) {
  const int64_t rows = x.size(0), k_in = x.size(1);
  const int64_t num_seq = seq_len > 0 ? rows / seq_len : 0;
  auto fopt = x.options().dtype(at::kFloat);
  Partials out{at::zeros({k_in}, x.options().dtype(at::kLong)), at::zeros({k_in}, fopt), at::zeros({k_in}, fopt),
               at::zeros({k_in}, fopt), at::zeros({k_in}, fopt), at::zeros({num_seq, k_in}, fopt)};
  if (rows == 0 || k_in == 0) return out;
  const Segments segs = make_segments(rows, seq_len);
  PK_CUDA_CHECK_ARG(segs.num_segs <= INT32_MAX, "x", "too many rows (", rows, ") for seq_len=", seq_len);
  const uint8_t* mask = nullptr;
  if (row_mask.has_value() && row_mask->defined()) {
    mask = reinterpret_cast<const uint8_t*>(row_mask->const_data_ptr<bool>());
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  switch (x.scalar_type()) {
    case at::kFloat: run_welford<float>(x, mask, segs, out, stream); break;
    case at::kHalf: run_welford<at::Half>(x, mask, segs, out, stream); break;
    default: run_welford<at::BFloat16>(x, mask, segs, out, stream); break;
  }
  return out;
}

Partials welford_partials_cuda(const at::Tensor& x, const std::optional<at::Tensor>& row_mask, int64_t seq_len) {
  check_stats_args(x, row_mask, seq_len);
  c10::cuda::CUDAGuard guard(x.device());
  return welford_partials_impl(x, row_mask, seq_len);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_with_stats_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& row_mask, int64_t seq_len) {
  check_stats_args(x, row_mask, seq_len);
  PK_CUDA_CHECK_ARG(weight.dim() == 2 && weight.size(1) == x.size(1), "weight", "expected shape [N, ", x.size(1),
                    "], got ", weight.sizes());
  PK_CUDA_CHECK_ARG(weight.scalar_type() == x.scalar_type(), "weight", "dtype ", weight.scalar_type(),
                    " does not match x's dtype ", x.scalar_type());
  PK_CUDA_CHECK_ARG(weight.device() == x.device(), "weight", "expected device ", x.device(), ", got ",
                    weight.device());
  if (bias.has_value() && bias->defined()) {
    PK_CUDA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias", "expected shape [",
                      weight.size(0), "], got ", bias->sizes());
    PK_CUDA_CHECK_ARG(bias->scalar_type() == x.scalar_type(), "bias", "dtype ", bias->scalar_type(),
                      " does not match x's dtype ", x.scalar_type());
    PK_CUDA_CHECK_ARG(bias->device() == x.device(), "bias", "expected device ", x.device(), ", got ",
                      bias->device());
  }
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), k_in = x.size(1), n_out = weight.size(0);
  // PERSONA_KERNELS_CUDA_LWS=cublas: at::linear (cuBLAS) then the statistics kernels on the same stream (x read
  // twice), for comparison; empty shapes take that path too (no GEMM tile would see x).
  const char* env = std::getenv("PERSONA_KERNELS_CUDA_LWS");
  const bool cublas = env != nullptr && std::strcmp(env, "cublas") == 0;
  PK_CUDA_CHECK_ARG(env == nullptr || env[0] == '\0' || cublas || std::strcmp(env, "fused") == 0,
                    "PERSONA_KERNELS_CUDA_LWS", "expected fused or cublas, got '", env, "'");
  if (cublas || rows == 0 || k_in == 0 || n_out == 0) {
    at::Tensor y = at::linear(x, weight, bias);
    auto p = welford_partials_impl(x, row_mask, seq_len);
    return {y, std::get<0>(p), std::get<1>(p), std::get<2>(p), std::get<3>(p), std::get<4>(p), std::get<5>(p)};
  }
  const Segments probe = fixed_segments(rows, seq_len, kMmaBM);
  PK_CUDA_CHECK_ARG(probe.num_segs <= INT32_MAX, "x", "too many rows (", rows, ") for seq_len=", seq_len);
  PK_CUDA_CHECK_ARG(weight.is_contiguous(), "weight", "expected a contiguous tensor");
  const int64_t num_seq = seq_len > 0 ? rows / seq_len : 0;
  auto fopt = x.options().dtype(at::kFloat);
  Partials p{at::empty({k_in}, x.options().dtype(at::kLong)), at::empty({k_in}, fopt), at::empty({k_in}, fopt),
             at::empty({k_in}, fopt), at::empty({k_in}, fopt), at::zeros({num_seq, k_in}, fopt)};
  at::Tensor y = at::empty({rows, n_out}, x.options());
  const uint8_t* mask = nullptr;
  if (row_mask.has_value() && row_mask->defined()) {
    mask = reinterpret_cast<const uint8_t*>(row_mask->const_data_ptr<bool>());
  }
  const int device = x.device().index();
  switch (x.scalar_type()) {
    case at::kFloat: run_linear_with_stats_fused<float>(x, weight, bias, mask, seq_len, y, p, device); break;
    case at::kHalf: run_linear_with_stats_fused<at::Half>(x, weight, bias, mask, seq_len, y, p, device); break;
    default: run_linear_with_stats_fused<at::BFloat16>(x, weight, bias, mask, seq_len, y, p, device); break;
  }
  return {y, std::get<0>(p), std::get<1>(p), std::get<2>(p), std::get<3>(p), std::get<4>(p), std::get<5>(p)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("welford_partials_cuda(Tensor x, Tensor? row_mask, int seq_len) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_with_stats_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? row_mask, int seq_len) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(persona_kernels_C, CUDA, m) {
  m.impl("welford_partials_cuda", &welford_partials_cuda);
  m.impl("linear_with_stats_cuda", &linear_with_stats_cuda);
}

}  // namespace cuda
}  // namespace persona_kernels
