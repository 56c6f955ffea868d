// Bit packing of persona masks: bool [N, K] <-> int32 [N, ceil(K/32)], bit b of word w in row n is
// mask[n, 32*w + b] (least significant bit first); padding bits past K are zero.
#include <ATen/Parallel.h>

#include <cstring>

#include "common.h"

namespace persona_kernels {
namespace {

// Gathers eight 0/1 bytes into one byte, byte i -> bit i. The multiply moves byte i's low bit to
// bit 56 + i; no two products land on the same bit, so there are no carries into bits 56..63.
inline uint32_t gather8(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return static_cast<uint32_t>(((v & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56);
}

torch::Tensor pack_mask_cpu(const torch::Tensor& mask) {
  PK_CHECK_ARG(mask.dim() == 2, "mask", "expected a 2-D bool tensor [N, K], got ", mask.dim(), " dims");
  PK_CHECK_ARG(mask.scalar_type() == torch::kBool, "mask", "expected dtype torch.bool, got ", mask.scalar_type());
  PK_CHECK_ARG(mask.device().is_cpu(), "mask", "expected a CPU tensor");
  auto m = mask.contiguous();
  const int64_t n = m.size(0), k = m.size(1), words = packed_words(k);
  auto out = torch::empty({n, words}, torch::dtype(torch::kInt32));
  const uint8_t* src = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t full = k / 32;
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = src + r * k;
      uint32_t* orow = dst + r * words;
      for (int64_t w = 0; w < full; ++w) {
        const uint8_t* p = row + 32 * w;
        orow[w] = gather8(p) | (gather8(p + 8) << 8) | (gather8(p + 16) << 16) | (gather8(p + 24) << 24);
      }
      if (full < words) {
        uint32_t word = 0;
        for (int64_t b = 0; b < k - 32 * full; ++b) word |= static_cast<uint32_t>(row[32 * full + b] != 0) << b;
        orow[full] = word;
      }
    }
  });
  return out;
}

torch::Tensor unpack_mask_cpu(const torch::Tensor& packed, int64_t in_features) {
  PK_CHECK_ARG(packed.dim() == 2, "packed", "expected a 2-D int32 tensor [N, ceil(K/32)], got ", packed.dim(), " dims");
  PK_CHECK_ARG(packed.scalar_type() == torch::kInt32, "packed", "expected dtype torch.int32, got ", packed.scalar_type());
  PK_CHECK_ARG(packed.device().is_cpu(), "packed", "expected a CPU tensor");
  PK_CHECK_ARG(in_features >= 0, "in_features", "expected a non-negative integer, got ", in_features);
  PK_CHECK_ARG(packed.size(1) == packed_words(in_features), "packed",
               "expected ", packed_words(in_features), " words per row for in_features=", in_features, ", got ",
               packed.size(1));
  auto p = packed.contiguous();
  const int64_t n = p.size(0), k = in_features, words = p.size(1);
  auto out = torch::empty({n, k}, torch::dtype(torch::kBool));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* row = src + r * words;
      uint8_t* orow = dst + r * k;
      for (int64_t j = 0; j < k; ++j) orow[j] = static_cast<uint8_t>((row[j >> 5] >> (j & 31)) & 1u);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("pack_mask(Tensor mask) -> Tensor", &pack_mask_cpu);
  m.def("unpack_mask(Tensor packed, int in_features) -> Tensor", &unpack_mask_cpu);
}

}  // namespace persona_kernels
