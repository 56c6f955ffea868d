// Row-wise selection of the `count` largest (or smallest) entries, for mask building (scoring.py).
//
// select_mask_cpu(scores [R, K], scale [K] | None, counts int64 [R], largest, prefer_low_index, packed)
//   -> bool [R, K] (or int32 [R, ceil(K/32)] packed like pack_mask) marking, in every row i, the counts[i]
//   entries first in the order "value descending (ascending when !largest), then index ascending
//   (descending when !prefer_low_index)". With `scale`, the values are |scores[i, j]| * scale[j] in fp32
//   (scores is then a weight in fp32/bf16/fp16: the Wanda score formed on the fly, never stored).
//
// Per row: values become order-preserving uint32 keys (-0.0 == +0.0). The key of ascending rank K - count is
// found without sorting: a bracket [lo, hi] (the previous row's, rows of one matrix being alike, else one
// from a strided sample of 256 keys) is checked by one vectorised pass that counts the keys below it and
// gathers those inside; a histogram (16-256 bins) of the few gathered keys finds the bin holding the rank, and
// nth_element runs inside that bin. A final pass writes the mask, resolving ties at the threshold by index.
// Cost per row: ~3 linear passes, whatever the count (small rho costs no more than 0.5). Rows are handed to
// threads dynamically (an atomic counter), so a thread slowed by other processes does not hold others up.
// Errors: non-finite weight entries (with scale) or NaN scores raise ValueError naming the first bad row.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace persona_kernels {
namespace {

constexpr int64_t kSample = 256;       // sample size of the threshold bracket
constexpr int64_t kSmallRow = 256;     // rows up to this length: plain nth_element
constexpr int64_t kWorkItem = 16384;   // values per work item handed to a thread
constexpr int64_t kMinPerThread = int64_t{1} << 19;  // values per thread before a second one is used

typedef uint32_t u32x4 __attribute__((vector_size(16)));  // GCC/Clang vector extension (SSE2 or NEON)

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

// Order-preserving key of a non-NaN float (+0.0 and -0.0 map to one key); `flip` reverses the order.
inline uint32_t ordered_key(float v, uint32_t flip) {
  const uint32_t b = float_bits(v + 0.0f);  // -0.0 + 0.0 == +0.0
  return (b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u)) ^ flip;
}

struct Scratch {
  std::vector<uint32_t> keys, cand, sub, sample;
  std::vector<uint8_t> bytes;
  uint32_t hist[256];
  // bracket [lo, hi] of the previous row's threshold (rows of one matrix are alike: usually a hit)
  bool has_bracket = false;
  uint32_t lo = 0, hi = 0;
  explicit Scratch(int64_t k) : keys(k), cand(k + 1), sub(k), sample(kSample), bytes(k + 32) {}
};

// Gathers the keys in [lo, hi] into cand; returns how many keys are below lo.
int64_t gather(const uint32_t* keys, int64_t k, uint32_t lo, uint32_t hi, uint32_t* cand, int64_t& n_cand) {
  const uint32_t width = hi - lo;
  int64_t below = 0, j = 0;
  n_cand = 0;
  const u32x4 lo_v = {lo, lo, lo, lo}, width_v = {width, width, width, width};
  // blocks of 16: a vectorised test first, the (serial) gathering only for blocks holding candidates
  for (; j + 16 <= k; j += 16) {
    u32x4 under = {0, 0, 0, 0}, hit = {0, 0, 0, 0};
    for (int64_t t = 0; t < 16; t += 4) {
      u32x4 v;
      std::memcpy(&v, keys + j + t, sizeof(v));
      under -= reinterpret_cast<u32x4>(v < lo_v);  // a true lane is all ones (-1)
      hit |= reinterpret_cast<u32x4>((v - lo_v) <= width_v);
    }
    below += under[0] + under[1] + under[2] + under[3];
    if ((hit[0] | hit[1] | hit[2] | hit[3]) == 0) continue;
    for (int64_t t = 0; t < 16; ++t) {
      const uint32_t v = keys[j + t];
      cand[n_cand] = v;
      n_cand += (v - lo) <= width;
    }
  }
  for (; j < k; ++j) {
    const uint32_t v = keys[j];
    below += v < lo;
    cand[n_cand] = v;
    n_cand += (v - lo) <= width;
  }
  return below;
}

// A bracket [lo, hi] likely to hold the key of rank r, from a strided sample of the row.
void sample_bracket(const uint32_t* keys, int64_t k, int64_t r, Scratch& s, uint32_t& lo, uint32_t& hi) {
  uint32_t* smp = s.sample.data();
  for (int64_t i = 0; i < kSample; ++i) smp[i] = keys[(i * k) / kSample + (k / kSample) / 2];
  const double p = (static_cast<double>(r) + 0.5) / static_cast<double>(k);
  const double pos = p * kSample;
  const int64_t d = static_cast<int64_t>(std::ceil(3.0 * std::sqrt(kSample * p * (1.0 - p)))) + 3;
  const int64_t lo_i = static_cast<int64_t>(pos) - d, hi_i = static_cast<int64_t>(pos) + d;
  lo = 0;
  hi = std::numeric_limits<uint32_t>::max();
  if (lo_i > 0) {
    std::nth_element(smp, smp + lo_i, smp + kSample);
    lo = smp[lo_i];
  }
  if (hi_i < kSample - 1) {
    const int64_t from = lo_i > 0 ? lo_i + 1 : 0;
    std::nth_element(smp + from, smp + hi_i, smp + kSample);
    hi = smp[hi_i];
  }
}

// Key of ascending rank r (0-based) of keys[0..k), with the number of keys below it and equal to it.
uint32_t rank_key(const uint32_t* keys, int64_t k, int64_t r, Scratch& s, int64_t& n_less, int64_t& n_equal) {
  uint32_t* cand = s.cand.data();
  int64_t below = 0, n_cand = 0;
  uint32_t lo = 0, hi = std::numeric_limits<uint32_t>::max();
  bool bracketed = false;
  if (k > kSmallRow) {
    if (s.has_bracket) {
      lo = s.lo;
      hi = s.hi;
      below = gather(keys, k, lo, hi, cand, n_cand);
      bracketed = below <= r && r < below + n_cand;
    }
    if (!bracketed) {
      sample_bracket(keys, k, r, s, lo, hi);
      below = gather(keys, k, lo, hi, cand, n_cand);
      bracketed = below <= r && r < below + n_cand;
    }
  }
  if (!bracketed) {  // short row, or the bracket missed the rank (rare): select among all keys
    std::copy(keys, keys + k, cand);
    below = 0;
    n_cand = k;
    lo = 0;
    hi = std::numeric_limits<uint32_t>::max();
  }
  // histogram of the candidates over [lo, hi]: the bin holding the rank, then nth_element in it
  const int64_t at = r - below;
  const uint32_t width = hi - lo;
  // bins: ~2 candidates per bin, 16..256 (short rows gather few candidates; the bins' fixed cost matters there)
  uint32_t bins = 16;
  while (bins < 256 && static_cast<int64_t>(bins) * 2 < n_cand) bins *= 2;
  int shift = 0;
  while (shift < 32 && (width >> shift) >= bins) ++shift;
  const int64_t nb = static_cast<int64_t>(width >> shift) + 1;  // bins in use, <= bins
  uint32_t* hist = s.hist;
  std::memset(hist, 0, sizeof(uint32_t) * nb);
  for (int64_t j = 0; j < n_cand; ++j) ++hist[(cand[j] - lo) >> shift];
  int64_t cum = 0, bin = 0;
  while (cum + static_cast<int64_t>(hist[bin]) <= at) cum += hist[bin++];
  uint32_t* sub = s.sub.data();
  int64_t n_sub = 0;
  for (int64_t j = 0; j < n_cand; ++j) {
    const uint32_t v = cand[j];
    sub[n_sub] = v;
    n_sub += ((v - lo) >> shift) == static_cast<uint32_t>(bin);
  }
  std::nth_element(sub, sub + (at - cum), sub + n_sub);
  const uint32_t t = sub[at - cum];
  int64_t less = 0, equal = 0;
  for (int64_t j = 0; j < n_sub; ++j) {
    less += sub[j] < t;
    equal += sub[j] == t;
  }
  n_less = below + cum + less;
  n_equal = equal;
  // bracket for the next row: the bins holding ranks r -/+ delta (delta ~ 4 binomial sd + 16)
  if (k > kSmallRow) {
    const double p = (static_cast<double>(r) + 0.5) / static_cast<double>(k);
    const int64_t delta = static_cast<int64_t>(4.0 * std::sqrt(k * p * (1.0 - p))) + 16;
    const int64_t a_lo = at - delta, a_hi = at + delta;
    uint32_t next_lo = lo, next_hi = hi;
    int64_t c = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c1 = c + hist[b];
      const uint64_t edge = static_cast<uint64_t>(lo) + (static_cast<uint64_t>(b) << shift);
      if (a_lo >= 0 && c <= a_lo && a_lo < c1) next_lo = static_cast<uint32_t>(edge);
      if (a_hi < n_cand && c <= a_hi && a_hi < c1) {
        const uint64_t top = edge + (uint64_t{1} << shift) - 1;
        next_hi = static_cast<uint32_t>(std::min<uint64_t>(top, hi));
        break;
      }
      c = c1;
    }
    s.has_bracket = true;
    s.lo = next_lo;
    s.hi = next_hi;
  }
  return t;
}

// Marks the `count` largest keys of a row into out[0..k) (0/1 bytes), ties by index.
void mark_row(const uint32_t* keys, int64_t k, int64_t count, bool prefer_low, Scratch& s, uint8_t* out) {
  if (count <= 0) {
    std::memset(out, 0, k);
    return;
  }
  if (count >= k) {
    std::memset(out, 1, k);
    return;
  }
  int64_t n_less = 0, n_equal = 0;
  const uint32_t t = rank_key(keys, k, k - count, s, n_less, n_equal);
  const int64_t need = count - (k - n_less - n_equal);  // tied keys to take, 1 <= need <= n_equal
  if (need == n_equal) {
    for (int64_t j = 0; j < k; ++j) out[j] = keys[j] >= t;
    return;
  }
  for (int64_t j = 0; j < k; ++j) out[j] = keys[j] > t;
  int64_t left = need;
  if (prefer_low) {
    for (int64_t j = 0; j < k && left > 0; ++j)
      if (keys[j] == t) out[j] = 1, --left;
  } else {
    for (int64_t j = k - 1; j >= 0 && left > 0; --j)
      if (keys[j] == t) out[j] = 1, --left;
  }
}

inline uint32_t gather8(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return static_cast<uint32_t>(((v & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56);
}

void pack_row(const uint8_t* bytes, int64_t k, uint32_t* words) {
  const int64_t full = k / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint8_t* p = bytes + 32 * w;
    words[w] = gather8(p) | (gather8(p + 8) << 8) | (gather8(p + 16) << 16) | (gather8(p + 24) << 24);
  }
  if (full < packed_words(k)) {
    uint32_t word = 0;
    for (int64_t b = 0; b < k - 32 * full; ++b) word |= static_cast<uint32_t>(bytes[32 * full + b] != 0) << b;
    words[full] = word;
  }
}

// Keys of one row; returns false on a non-finite weight (scaled) or a NaN score (unscaled).
template <typename T>
bool row_keys(const T* src, const float* scale, int64_t k, uint32_t flip, uint32_t* keys) {
  uint32_t bad = 0;
  if (scale != nullptr) {
    for (int64_t j = 0; j < k; ++j) {
      const float w = std::fabs(static_cast<float>(src[j]));
      bad |= static_cast<uint32_t>(float_bits(w) >= 0x7f800000u);
      keys[j] = ordered_key(w * scale[j], flip);
    }
  } else {
    for (int64_t j = 0; j < k; ++j) {
      const float v = static_cast<float>(src[j]);
      bad |= static_cast<uint32_t>((float_bits(v) & 0x7fffffffu) > 0x7f800000u);
      keys[j] = ordered_key(v, flip);
    }
  }
  return bad == 0;
}

template <typename T>
void select_impl(const T* src, const float* scale, const int64_t* counts, int64_t r, int64_t k, bool largest,
                 bool prefer_low, bool packed, void* out, std::atomic<int64_t>& bad_row) {
  const uint32_t flip = largest ? 0u : 0xffffffffu;
  const int64_t words = packed_words(k);
  const int64_t rows_per_item = std::max<int64_t>(1, kWorkItem / std::max<int64_t>(1, k));
  const int64_t items = (r + rows_per_item - 1) / rows_per_item;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    Scratch s(k);
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t r1 = std::min(r, (item + 1) * rows_per_item);
      for (int64_t i = item * rows_per_item; i < r1; ++i) {
        if (!row_keys(src + i * k, scale, k, flip, s.keys.data())) {
          int64_t seen = bad_row.load();
          while (i < seen && !bad_row.compare_exchange_weak(seen, i)) {
          }
          continue;
        }
        uint8_t* dst = packed ? s.bytes.data() : static_cast<uint8_t*>(out) + i * k;
        mark_row(s.keys.data(), k, std::min(std::max<int64_t>(counts[i], 0), k), prefer_low, s, dst);
        if (packed) pack_row(dst, k, static_cast<uint32_t*>(out) + i * words);
      }
    }
  };
  // a thread per kMinPerThread values at most: waking a thread costs a scheduler slice on a busy host, more
  // than a small layer's whole selection
  const int64_t by_size = std::max<int64_t>(1, (r * k) / kMinPerThread);
  const int64_t threads = std::min<int64_t>(std::min<int64_t>(at::get_num_threads(), items), by_size);
  if (threads <= 1 || at::in_parallel_region()) worker(0, 1);
  else at::parallel_for(0, threads, 1, worker);
}

at::Tensor select_mask_cpu(const at::Tensor& scores, const c10::optional<at::Tensor>& scale, const at::Tensor& counts,
                           bool largest, bool prefer_low_index, bool packed) {
  PK_CHECK_ARG(scores.dim() == 2 && scores.device().is_cpu(), "scores", "expected a 2-D CPU tensor, got ",
               scores.sizes());
  const auto st = scores.scalar_type();
  PK_CHECK_ARG(st == at::kFloat || (scale.has_value() && (st == at::kBFloat16 || st == at::kHalf)), "scores",
               "expected float32 (or bf16/fp16 with scale), got ", st);
  const int64_t r = scores.size(0), k = scores.size(1);
  PK_CHECK_ARG(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                   counts.size(0) == r,
               "counts", "expected an int64 CPU tensor [", r, "]");
  at::Tensor sc;
  if (scale.has_value()) {
    PK_CHECK_ARG(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->dim() == 1 &&
                     scale->size(0) == k,
                 "scale", "expected a float32 CPU tensor [", k, "]");
    sc = scale->contiguous();
  }
  auto src = scores.contiguous();
  auto cnt = counts.contiguous();
  auto out = packed ? at::empty({r, packed_words(k)}, scores.options().dtype(at::kInt))
                    : at::empty({r, k}, scores.options().dtype(at::kBool));
  if (r == 0 || k == 0) return out.zero_();
  std::atomic<int64_t> bad_row{std::numeric_limits<int64_t>::max()};
  const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  void* op = out.data_ptr();
  const int64_t* cp = cnt.data_ptr<int64_t>();
  switch (st) {
    case at::kFloat:
      select_impl(src.data_ptr<float>(), sp, cp, r, k, largest, prefer_low_index, packed, op, bad_row);
      break;
    case at::kBFloat16:
      select_impl(src.data_ptr<at::BFloat16>(), sp, cp, r, k, largest, prefer_low_index, packed, op, bad_row);
      break;
    default:
      select_impl(src.data_ptr<at::Half>(), sp, cp, r, k, largest, prefer_low_index, packed, op, bad_row);
      break;
  }
  const int64_t bad = bad_row.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    if (sp != nullptr) {
      TORCH_CHECK_VALUE(false, "persona_kernels.scoring: argument 'weight': contains non-finite values (first in row ",
                        bad, ")");
    }
    TORCH_CHECK_VALUE(false, "persona_kernels.scoring: argument 'scores': contains NaN (first in row ", bad, ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("select_mask_cpu(Tensor scores, Tensor? scale, Tensor counts, bool largest, bool prefer_low_index, "
        "bool packed) -> Tensor",
        &select_mask_cpu);
}

}  // namespace persona_kernels
