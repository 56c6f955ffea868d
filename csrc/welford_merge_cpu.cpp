// In-place merge of one batch's Welford partials into ActivationStats' float64 running state (CPU).
//
// ActivationStats keeps three stacked summaries per channel: row 0 = x, row 1 = |x|, row 2 = the
// per-sequence L2 norm of x. A batch arrives as WelfordPartials (count, mean, m2, abs_mean, abs_m2 per
// channel; seq_sumsq [S, K]). The Python merge (stats.py: _chan) is about thirty small tensor ops; this is
// one pass over the K channels doing the same arithmetic in float64:
//   n = n_a + n_b,  w = n_b / n,  d = mean_b - mean_a,
//   mean = mean_a + d * w,  m2 = m2_a + m2_b + d * d * n_a * w     (state unchanged where n_b == 0)
// Sequences count when they hold at least one valid row (row_mask) and enter with their L2 norm
// sqrt(seq_sumsq). `nonfinite` grows by (valid rows) * K - sum(count).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
// The merge loops select per channel (state unchanged where a batch has no values, max(0, v) before sqrt):
// GCC keeps them scalar unless it may evaluate FP operations whose result is then dropped, i.e. unless FP
// exceptions do not trap (nothing here reads the exception flags). No contraction into FMA, so that the
// AVX2/AVX-512 variants round exactly as the portable one.
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

namespace persona_kernels {
namespace {

// The merge's inputs and running state (see merge_raw); one struct so that the ISA variants below share a
// signature.
template <typename P>
struct MergeArgs {
  int64_t k;
  int64_t* n;
  double *mean, *m2;
  const int64_t* cnt;
  const P *pmean, *pm2, *pamean, *pam2, *seq_sumsq;
  int64_t nseq;
  const char* seq_ok;
  int64_t n_seq_ok;
};

// One channel block [j0, j1) of the merge. always_inline, so that each ISA wrapper below compiles it with its
// own instruction set (GCC inlines a default-target function into a target("...") caller): the loops run
// over channels, with the same IEEE operations per channel in every variant (no FP contraction, see the
// pragma above; exact-rounded sqrt), so the variants agree bit for bit. Per-sequence norms are summed over
// sequences in order. `l2` holds (nseq + 2) * (j1 - j0) doubles.
template <typename P>
[[gnu::always_inline]] inline void merge_block(const MergeArgs<P>& args, int64_t j0, int64_t j1,
                                               double* __restrict l2) {
  const int64_t k = args.k, nseq = args.nseq, n_seq_ok = args.n_seq_ok;
  int64_t* __restrict n = args.n;
  double* __restrict mean = args.mean;
  double* __restrict m2 = args.m2;
  const int64_t* __restrict cnt = args.cnt;
  const P* __restrict pmean = args.pmean;
  const P* __restrict pm2 = args.pm2;
  const P* __restrict pamean = args.pamean;
  const P* __restrict pam2 = args.pam2;
  const P* __restrict seq_sumsq = args.seq_sumsq;
  const char* seq_ok = args.seq_ok;
  const int64_t w = j1 - j0;
  // Chan's update of summary r (0: x, 1: |x|, 2: per-sequence L2 norms) with (nb, mb, m2b) per channel;
  // the state is unchanged where nb == 0.
  auto chan_row = [&](int r, auto nb_of, auto mean_of, auto m2_of) {
    int64_t* __restrict nr = n + r * k + j0;
    double* __restrict mr = mean + r * k + j0;
    double* __restrict sr = m2 + r * k + j0;
    for (int64_t jj = 0; jj < w; ++jj) {
      const int64_t na = nr[jj], nb = nb_of(jj), nn = na + nb;
      const double wgt = static_cast<double>(nb) / static_cast<double>(nn > 0 ? nn : 1);
      const double d = mean_of(jj) - mr[jj];
      const double mu = mr[jj] + d * wgt;
      const double s2 = sr[jj] + m2_of(jj) + d * d * (static_cast<double>(na) * wgt);
      const bool take = nb > 0;
      nr[jj] = take ? nn : na;
      mr[jj] = take ? mu : mr[jj];
      sr[jj] = take ? s2 : sr[jj];
    }
  };
  const int64_t* c = cnt + j0;
  chan_row(0, [&](int64_t jj) { return c[jj]; }, [&](int64_t jj) { return static_cast<double>(pmean[j0 + jj]); },
           [&](int64_t jj) { return static_cast<double>(pm2[j0 + jj]); });
  chan_row(1, [&](int64_t jj) { return c[jj]; }, [&](int64_t jj) { return static_cast<double>(pamean[j0 + jj]); },
           [&](int64_t jj) { return static_cast<double>(pam2[j0 + jj]); });
  if (n_seq_ok == 0) return;
  // per-sequence L2 norms (max(0, v): NaN -> 0, -0.0 -> +0.0), their mean, then the sum of squared deviations
  double* __restrict sum = l2 + nseq * w;
  double* __restrict ss = sum + w;
  for (int64_t jj = 0; jj < w; ++jj) sum[jj] = 0.0, ss[jj] = 0.0;
  for (int64_t q = 0; q < nseq; ++q) {
    const P* __restrict src = seq_sumsq + q * k + j0;
    double* __restrict dst = l2 + q * w;
    for (int64_t jj = 0; jj < w; ++jj) {
      const double v = static_cast<double>(src[jj]);
      dst[jj] = std::sqrt(v > 0.0 ? v : 0.0);
    }
    if (!seq_ok[q]) continue;
    for (int64_t jj = 0; jj < w; ++jj) sum[jj] += dst[jj];
  }
  const double cnt_ok = static_cast<double>(n_seq_ok);
  for (int64_t jj = 0; jj < w; ++jj) sum[jj] /= cnt_ok;  // now the mean
  for (int64_t q = 0; q < nseq; ++q) {
    if (!seq_ok[q]) continue;
    const double* __restrict src = l2 + q * w;
    for (int64_t jj = 0; jj < w; ++jj) {
      const double d = src[jj] - sum[jj];
      ss[jj] += d * d;
    }
  }
  chan_row(2, [&](int64_t) { return n_seq_ok; }, [&](int64_t jj) { return sum[jj]; },
           [&](int64_t jj) { return ss[jj]; });
}

template <typename P>
using MergeBlockFn = void (*)(const MergeArgs<P>&, int64_t, int64_t, double*);

template <typename P>
void merge_block_portable(const MergeArgs<P>& args, int64_t j0, int64_t j1, double* l2) {
  merge_block<P>(args, j0, j1, l2);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
template <typename P>
__attribute__((target("avx2,fma"))) void merge_block_avx2(const MergeArgs<P>& args, int64_t j0, int64_t j1,
                                                          double* l2) {
  merge_block<P>(args, j0, j1, l2);
}

template <typename P>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void merge_block_avx512(const MergeArgs<P>& args,
                                                                                      int64_t j0, int64_t j1,
                                                                                      double* l2) {
  merge_block<P>(args, j0, j1, l2);
}
#endif

template <typename P>
MergeBlockFn<P> pick_merge_block() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  switch (cpu_isa()) {
    case Isa::Avx512: return &merge_block_avx512<P>;
    case Isa::Avx2: return &merge_block_avx2<P>;
    default: break;
  }
#endif
  return &merge_block_portable<P>;
}

// Blocks of kMergeBlock channels keep the norms' buffer small (per-thread scratch, (nseq + 2) * block).
constexpr int64_t kMergeBlock = 256;

// The merge of channels [j0, j1), on the calling thread.
template <typename P>
void merge_channels(const MergeArgs<P>& args, MergeBlockFn<P> block, int64_t j0, int64_t j1) {
  double* l2 = static_cast<double*>(
      thread_scratch(ScratchSlot::MergeNorms, static_cast<size_t>((args.nseq + 2) * kMergeBlock) * sizeof(double)));
  for (int64_t j = j0; j < j1; j += kMergeBlock) block(args, j, std::min(j1, j + kMergeBlock), l2);
}

template <typename P>
void merge_impl(int64_t k, int64_t* n, double* mean, double* m2, const int64_t* cnt, const P* pmean,
                const P* pm2, const P* pamean, const P* pam2, const P* seq_sumsq, int64_t nseq,
                const std::vector<char>& seq_ok, int64_t n_seq_ok) {
  const MergeArgs<P> args{k, n, mean, m2, cnt, pmean, pm2, pamean, pam2, seq_sumsq, nseq, seq_ok.data(), n_seq_ok};
  const MergeBlockFn<P> block = pick_merge_block<P>();
  const int64_t nblocks = (k + kMergeBlock - 1) / kMergeBlock;
  auto body = [&](int64_t b0, int64_t b1) {
    merge_channels(args, block, b0 * kMergeBlock, std::min(k, b1 * kMergeBlock));
  };
  if (k * (2 + nseq) < 65536) body(0, nblocks);
  else at::parallel_for(0, nblocks, 1, body);
}

void check_state(const at::Tensor& n, const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& nonfinite,
                 int64_t k) {
  PK_CHECK_ARG(n.device().is_cpu() && n.scalar_type() == at::kLong && n.is_contiguous() && n.dim() == 2 &&
                   n.size(0) == 3 && n.size(1) == k,
               "n", "expected a contiguous int64 CPU tensor [3, ", k, "], got ", n.scalar_type(), " ", n.sizes());
  for (auto* t : {&mean, &m2}) {
    PK_CHECK_ARG(t->device().is_cpu() && t->scalar_type() == at::kDouble && t->is_contiguous() &&
                     t->sizes() == n.sizes(),
                 "mean/m2", "expected contiguous float64 CPU tensors [3, ", k, "], got ", t->scalar_type(), " ",
                 t->sizes());
  }
  PK_CHECK_ARG(nonfinite.device().is_cpu() && nonfinite.scalar_type() == at::kLong && nonfinite.numel() == 1,
               "nonfinite", "expected an int64 CPU scalar tensor");
}

// What the merge needs beyond the partials: which sequences hold a valid row, their number, and the valid
// rows. `seq_ok` is the calling thread's buffer (reused); `mask`: nullptr or `rows` bools.
struct RowCounts {
  const std::vector<char>* seq_ok;
  int64_t n_seq_ok, valid_rows;
};
RowCounts count_rows(const bool* mask, int64_t seq_len, int64_t rows, int64_t nseq) {
  thread_local std::vector<char> seq_ok;
  seq_ok.assign(static_cast<size_t>(nseq), 1);
  int64_t valid_rows = rows;
  if (mask != nullptr) {
    valid_rows = 0;
    for (int64_t r = 0; r < rows; ++r) valid_rows += mask[r] ? 1 : 0;
    for (int64_t q = 0; q < nseq; ++q) {
      char any = 0;
      for (int64_t t = 0; t < seq_len && !any; ++t) any = mask[q * seq_len + t] ? 1 : 0;
      seq_ok[q] = any;
    }
  }
  int64_t n_seq_ok = 0;
  for (char c : seq_ok) n_seq_ok += c;
  return RowCounts{&seq_ok, n_seq_ok, valid_rows};
}

// nonfinite grows by the valid values the batch did not count (inf/NaN).
void add_nonfinite(at::Tensor& nonfinite, const int64_t* cnt, int64_t k, int64_t valid_rows) {
  int64_t total = 0;
  for (int64_t j = 0; j < k; ++j) total += cnt[j];
  nonfinite.data_ptr<int64_t>()[0] += valid_rows * k - total;
}

// The merge proper on raw partials (P = float or double); `mask`: nullptr or `rows` bools.
template <typename P>
void merge_raw(at::Tensor& n, at::Tensor& mean, at::Tensor& m2, at::Tensor& nonfinite, int64_t k, const int64_t* cnt,
               const P* pmean, const P* pm2, const P* pamean, const P* pam2, const P* seq_sumsq, int64_t nseq,
               const bool* mask, int64_t seq_len, int64_t rows) {
  const RowCounts rc = count_rows(mask, seq_len, rows, nseq);
  merge_impl<P>(k, n.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>(), cnt, pmean, pm2, pamean,
                pam2, seq_sumsq, nseq, *rc.seq_ok, rc.n_seq_ok);
  add_nonfinite(nonfinite, cnt, k, rc.valid_rows);
}

void welford_merge_cpu(at::Tensor n, at::Tensor mean, at::Tensor m2, at::Tensor nonfinite, const at::Tensor& count,
                       const at::Tensor& pmean, const at::Tensor& pm2, const at::Tensor& pamean, const at::Tensor& pam2,
                       const at::Tensor& seq_sumsq, const c10::optional<at::Tensor>& row_mask, int64_t seq_len,
                       int64_t rows) {
  const int64_t k = count.numel();
  check_state(n, mean, m2, nonfinite, k);
  PK_CHECK_ARG(count.device().is_cpu() && count.scalar_type() == at::kLong && count.dim() == 1 && count.is_contiguous(),
               "count", "expected a contiguous int64 CPU tensor [K]");
  const auto pt = pmean.scalar_type();
  PK_CHECK_ARG(pt == at::kFloat || pt == at::kDouble, "partials", "expected float32 or float64 moments, got ", pt);
  for (const at::Tensor* t : {&pmean, &pm2, &pamean, &pam2}) {
    PK_CHECK_ARG(t->device().is_cpu() && t->scalar_type() == pt && t->dim() == 1 && t->size(0) == k &&
                     t->is_contiguous(),
                 "partials", "expected contiguous CPU ", pt, " tensors [", k, "], got ", t->scalar_type(), " ",
                 t->sizes());
  }
  PK_CHECK_ARG(seq_sumsq.device().is_cpu() && seq_sumsq.scalar_type() == pt && seq_sumsq.dim() == 2 &&
                   seq_sumsq.size(1) == k && seq_sumsq.is_contiguous(),
               "seq_sumsq", "expected a contiguous CPU ", pt, " tensor [S, ", k, "], got ", seq_sumsq.sizes());
  const int64_t nseq = seq_sumsq.size(0);
  PK_CHECK_ARG(rows >= 0, "rows", "expected >= 0, got ", rows);
  PK_CHECK_ARG(seq_len >= 0, "seq_len", "expected >= 0, got ", seq_len);
  const bool* mask = nullptr;
  if (row_mask.has_value()) {
    const at::Tensor& rm = *row_mask;
    PK_CHECK_ARG(rm.device().is_cpu() && rm.scalar_type() == at::kBool && rm.numel() == rows && rm.is_contiguous(),
                 "row_mask", "expected a contiguous bool CPU tensor of ", rows, " rows, got ", rm.scalar_type(), " ",
                 rm.sizes());
    PK_CHECK_ARG(nseq == 0 || (seq_len > 0 && nseq * seq_len == rows), "seq_sumsq", nseq,
                 " sequences do not tile ", rows, " rows with seq_len ", seq_len);
    mask = rm.data_ptr<bool>();
  }
  const int64_t* cnt = count.data_ptr<int64_t>();
  if (pt == at::kFloat) {
    merge_raw<float>(n, mean, m2, nonfinite, k, cnt, pmean.data_ptr<float>(), pm2.data_ptr<float>(),
                     pamean.data_ptr<float>(), pam2.data_ptr<float>(), seq_sumsq.data_ptr<float>(), nseq, mask,
                     seq_len, rows);
  } else {
    merge_raw<double>(n, mean, m2, nonfinite, k, cnt, pmean.data_ptr<double>(), pm2.data_ptr<double>(),
                      pamean.data_ptr<double>(), pam2.data_ptr<double>(), seq_sumsq.data_ptr<double>(), nseq, mask,
                      seq_len, rows);
  }
}

}  // namespace

// linear_with_stats_cpu followed by the in-place merge, in one call from Python (the recorder's per-Linear
// path). The batch partials go to per-thread buffers reused across calls, so the only allocation is y: the
// statistics add no allocator traffic to the forward (a separate pass returning six tensors measured
// +1..2 % over F.linear on SmolLM2 shapes beyond its own arithmetic).
at::Tensor linear_stats_merge_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& row_mask, int64_t seq_len, at::Tensor n,
                                  at::Tensor mean, at::Tensor m2, at::Tensor nonfinite) {
  // the state is merged before the GEMM runs, so everything the GEMM could reject is checked first
  check_linear_with_stats_args(x_in, weight, bias, row_mask, seq_len);
  const int64_t rows = x_in.size(0), k = x_in.size(1), nseq = seq_len > 0 ? rows / seq_len : 0;
  check_state(n, mean, m2, nonfinite, k);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor rm = row_mask.has_value() && row_mask->defined() ? row_mask->contiguous() : at::Tensor();
  const bool* mask = rm.defined() ? rm.data_ptr<bool>() : nullptr;
  // count [K] (int64), then mean, m2, abs_mean, abs_m2 [K] and seq_sumsq [S, K] (float)
  const size_t bytes = static_cast<size_t>(k) * (sizeof(int64_t) + static_cast<size_t>(4 + nseq) * sizeof(float));
  int64_t* cnt = static_cast<int64_t*>(thread_scratch(ScratchSlot::BatchPartials, bytes));
  float* b = reinterpret_cast<float*>(cnt + k);
  // Each channel range is merged into the state as soon as the pass has finished it, inside the pass's
  // parallel region: on two threads a serial merge after the pass left one core waiting.
  const RowCounts rc = count_rows(mask, seq_len, rows, nseq);
  const MergeArgs<float> args{k,  n.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>(), cnt, b,
                              b + k, b + 2 * k, b + 3 * k, b + 4 * k, nseq, rc.seq_ok->data(), rc.n_seq_ok};
  struct HookCtx {
    const MergeArgs<float>* args;
    MergeBlockFn<float> block;
  } hook_ctx{&args, pick_merge_block<float>()};
  const ChannelHook hook{[](void* c, int64_t j0, int64_t j1) {
                           const auto* h = static_cast<const HookCtx*>(c);
                           merge_channels(*h->args, h->block, j0, j1);
                         },
                         &hook_ctx};
  at::Tensor y = stats_then_linear(x, weight, bias, mask, seq_len,
                                   PartialsView{cnt, b, b + k, b + 2 * k, b + 3 * k, b + 4 * k}, &hook);
  add_nonfinite(nonfinite, cnt, k, rc.valid_rows);
  return y;
}

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("linear_stats_merge_cpu_(Tensor x, Tensor weight, Tensor? bias, Tensor? row_mask, int seq_len, "
        "Tensor(a!) n, Tensor(b!) mean, Tensor(c!) m2, Tensor(d!) nonfinite) -> Tensor",
        &linear_stats_merge_cpu);
  m.def("welford_merge_cpu_(Tensor(a!) n, Tensor(b!) mean, Tensor(c!) m2, Tensor(d!) nonfinite, Tensor count, "
        "Tensor pmean, Tensor pm2, Tensor pamean, Tensor pam2, Tensor seq_sumsq, Tensor? row_mask, int seq_len, "
        "int rows) -> ()",
        &welford_merge_cpu);
}

}  // namespace persona_kernels
