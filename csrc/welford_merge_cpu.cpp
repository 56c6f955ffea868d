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

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <vector>

#include "common.h"

namespace persona_kernels {
namespace {

inline void chan(int64_t& n_a, double& mean_a, double& m2_a, int64_t n_b, double mean_b, double m2_b) {
  if (n_b <= 0) return;
  const int64_t n = n_a + n_b;
  const double w = static_cast<double>(n_b) / static_cast<double>(n);
  const double d = mean_b - mean_a;
  mean_a = mean_a + d * w;
  m2_a = m2_a + m2_b + d * d * (static_cast<double>(n_a) * w);
  n_a = n;
}

// dst[j] = sqrt(max(0, src[j])) in float64 (as std::max(0.0, v): NaN -> 0, -0.0 -> +0.0); AVX2 when the CPU
// has it (GCC does not vectorise the scalar loop), bit-identical to the scalar code (sqrt is exact-rounded).
template <typename P>
void sqrt_nonneg_scalar(const P* src, double* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = std::sqrt(std::max(0.0, static_cast<double>(src[j])));
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
__attribute__((target("avx2"))) void sqrt_nonneg_avx2(const float* src, double* dst, int64_t n) {
  const __m256d zero = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(src + j));
    _mm256_storeu_pd(dst + j, _mm256_sqrt_pd(_mm256_max_pd(v, zero)));  // max(v, 0): NaN -> 0
  }
  sqrt_nonneg_scalar(src + j, dst + j, n - j);
}
#endif

inline void sqrt_nonneg(const float* src, double* dst, int64_t n) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool avx2 = cpu_isa() != Isa::Portable;
  if (avx2) return sqrt_nonneg_avx2(src, dst, n);
#endif
  sqrt_nonneg_scalar(src, dst, n);
}

inline void sqrt_nonneg(const double* src, double* dst, int64_t n) { sqrt_nonneg_scalar(src, dst, n); }

template <typename P>
void merge_impl(int64_t k, int64_t* n, double* mean, double* m2, const int64_t* cnt, const P* pmean,
                const P* pm2, const P* pamean, const P* pam2, const P* seq_sumsq, int64_t nseq,
                const std::vector<char>& seq_ok, int64_t n_seq_ok) {
  // Channels j0..j1: the per-sequence L2 norms are formed row by row over contiguous channels (vectorised
  // sqrt; summed over sequences in order, so the float64 results equal the per-channel loop's bit for bit),
  // then one Chan merge per channel and summary.
  auto body = [&](int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    std::vector<double> l2, sum, ss;
    if (n_seq_ok > 0) {
      l2.resize(static_cast<size_t>(nseq * w));
      sum.assign(static_cast<size_t>(w), 0.0);
      ss.assign(static_cast<size_t>(w), 0.0);
      for (int64_t q = 0; q < nseq; ++q) {
        double* dst = l2.data() + q * w;
        sqrt_nonneg(seq_sumsq + q * k + j0, dst, w);
        if (!seq_ok[q]) continue;
        for (int64_t j = 0; j < w; ++j) sum[j] += dst[j];
      }
      const double inv = static_cast<double>(n_seq_ok);
      for (int64_t j = 0; j < w; ++j) sum[j] /= inv;  // now the mean
      for (int64_t q = 0; q < nseq; ++q) {
        if (!seq_ok[q]) continue;
        const double* src = l2.data() + q * w;
        for (int64_t j = 0; j < w; ++j) {
          const double d = src[j] - sum[j];
          ss[j] += d * d;
        }
      }
    }
    for (int64_t jj = 0; jj < w; ++jj) {
      const int64_t j = j0 + jj;
      chan(n[j], mean[j], m2[j], cnt[j], static_cast<double>(pmean[j]), static_cast<double>(pm2[j]));
      chan(n[k + j], mean[k + j], m2[k + j], cnt[j], static_cast<double>(pamean[j]), static_cast<double>(pam2[j]));
      if (n_seq_ok > 0) chan(n[2 * k + j], mean[2 * k + j], m2[2 * k + j], n_seq_ok, sum[jj], ss[jj]);
    }
  };
  if (k * (2 + nseq) < 65536) body(0, k);
  else at::parallel_for(0, k, 512, body);
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

// The merge proper on raw partials (P = float or double); `mask`: nullptr or `rows` bools.
template <typename P>
void merge_raw(at::Tensor& n, at::Tensor& mean, at::Tensor& m2, at::Tensor& nonfinite, int64_t k, const int64_t* cnt,
               const P* pmean, const P* pm2, const P* pamean, const P* pam2, const P* seq_sumsq, int64_t nseq,
               const bool* mask, int64_t seq_len, int64_t rows) {
  // valid rows and valid sequences from the row mask
  std::vector<char> seq_ok(static_cast<size_t>(nseq), 1);
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
  int64_t total = 0;
  for (int64_t j = 0; j < k; ++j) total += cnt[j];
  merge_impl<P>(k, n.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>(), cnt, pmean, pm2, pamean,
                pam2, seq_sumsq, nseq, seq_ok, n_seq_ok);
  nonfinite.data_ptr<int64_t>()[0] += valid_rows * k - total;
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

// linear_with_stats_cpu followed by the in-place merge, in one call from Python (the recorder's per-Linear
// path). The batch partials go to per-thread buffers reused across calls, so the only allocation is y: the
// statistics add no allocator traffic to the forward (a separate pass returning six tensors measured
// +1..2 % over F.linear on SmolLM2 shapes beyond its own arithmetic).
at::Tensor linear_stats_merge_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& row_mask, int64_t seq_len, at::Tensor n,
                                  at::Tensor mean, at::Tensor m2, at::Tensor nonfinite) {
  check_linear_with_stats_args(x_in, weight, row_mask, seq_len);
  const int64_t rows = x_in.size(0), k = x_in.size(1), nseq = seq_len > 0 ? rows / seq_len : 0;
  check_state(n, mean, m2, nonfinite, k);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor rm = row_mask.has_value() && row_mask->defined() ? row_mask->contiguous() : at::Tensor();
  const bool* mask = rm.defined() ? rm.data_ptr<bool>() : nullptr;
  // count [K] (int64), then mean, m2, abs_mean, abs_m2 [K] and seq_sumsq [S, K] (float)
  const size_t bytes = static_cast<size_t>(k) * (sizeof(int64_t) + static_cast<size_t>(4 + nseq) * sizeof(float));
  int64_t* cnt = static_cast<int64_t*>(thread_scratch(ScratchSlot::BatchPartials, bytes));
  float* b = reinterpret_cast<float*>(cnt + k);
  welford_partials_into(x, mask, seq_len, PartialsView{cnt, b, b + k, b + 2 * k, b + 3 * k, b + 4 * k});
  at::Tensor y = at::linear(x, weight, bias);
  merge_raw<float>(n, mean, m2, nonfinite, k, cnt, b, b + k, b + 2 * k, b + 3 * k, b + 4 * k, nseq, mask, seq_len,
                   rows);
  return y;
}

}  // namespace

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
