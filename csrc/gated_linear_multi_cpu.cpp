// Mixed-persona gated linear on the CPU: each row of x uses its own persona's keep-mask.
//
// Rows are grouped by persona with a stable counting sort over `index` (-1 = base model first, then
// personas 0..P-1). Each non-empty group is one pass: the rows are gathered, run through the
// single-persona kernel `gated_linear_cpu` (at::linear for the base group, exactly what an unpatched
// nn.Linear computes), and scattered back. A group whose rows are consecutive (e.g. a batch sorted by
// persona) runs on a view of x without gather; a batch with a single persona runs on x itself.
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace persona_kernels {
namespace {

using GatedLinearFn = torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                    const c10::optional<torch::Tensor>&, double);

torch::Tensor gated_linear_multi_cpu(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bank,
                                     const torch::Tensor& index, const c10::optional<torch::Tensor>& bias,
                                     c10::ArrayRef<double> gamma) {
  PK_CHECK_ARG(x.dim() == 2, "x", "expected a 2-D tensor [M, K], got ", x.sizes());
  PK_CHECK_ARG(weight.dim() == 2, "weight", "expected a 2-D tensor [N, K], got ", weight.sizes());
  PK_CHECK_ARG(x.size(1) == weight.size(1), "x", "K=", x.size(1), " does not match weight's K=", weight.size(1));
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  PK_CHECK_ARG(bank.dim() == 3 && bank.scalar_type() == torch::kInt && bank.size(1) == N &&
                   bank.size(2) == packed_words(K),
               "packed_bank", "expected int32 [P, ", N, ", ", packed_words(K), "], got ", bank.scalar_type(), " ",
               bank.sizes());
  const int64_t P = bank.size(0);
  PK_CHECK_ARG(index.dim() == 1 && index.size(0) == M, "persona_index", "expected shape [", M, "], got ",
               index.sizes());
  PK_CHECK_ARG(index.scalar_type() == torch::kInt || index.scalar_type() == torch::kLong, "persona_index",
               "expected an int32 or int64 tensor, got ", index.scalar_type());
  PK_CHECK_ARG(static_cast<int64_t>(gamma.size()) == P, "gamma", "expected ", P, " values (one per persona), got ",
               gamma.size());
  PK_CHECK_ARG(x.device().is_cpu() && weight.device().is_cpu() && bank.device().is_cpu() && index.device().is_cpu(),
               "x", "all tensors must be on the CPU");

  if (M == 0) return at::empty({0, N}, x.options());
  const torch::Tensor idx = index.to(torch::kLong).contiguous();
  const int64_t* iv = idx.data_ptr<int64_t>();

  // counting sort: group g = persona + 1 (group 0 = base model)
  std::vector<int64_t> start(P + 2, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t v = iv[i];
    PK_CHECK_ARG(v >= -1 && v < P, "persona_index", "values must be in [-1, ", P, "), got ", v, " at row ", i);
    ++start[v + 2];
  }
  for (int64_t g = 1; g < P + 2; ++g) start[g] += start[g - 1];
  torch::Tensor order = at::empty({M}, idx.options());
  int64_t* ov = order.data_ptr<int64_t>();
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < M; ++i) ov[fill[iv[i] + 1]++] = i;
  }

  static const auto single =
      c10::Dispatcher::singleton().findSchemaOrThrow("persona_kernels_C::gated_linear_cpu", "").typed<GatedLinearFn>();
  auto run_group = [&](int64_t g, const torch::Tensor& xs) -> torch::Tensor {
    if (g == 0) return at::linear(xs, weight, bias);
    return single.call(xs, weight, bank.select(0, g - 1), bias, gamma[g - 1]);
  };

  torch::Tensor y;
  for (int64_t g = 0; g < P + 1; ++g) {
    const int64_t count = start[g + 1] - start[g];
    if (count == 0) continue;
    if (count == M) return run_group(g, x);  // one persona for the whole batch: no gather / scatter
    if (!y.defined()) y = at::empty({M, N}, x.options());
    const int64_t first = ov[start[g]];
    if (ov[start[g] + count - 1] - first == count - 1) {  // the group is one run of consecutive rows: no gather
      y.narrow(0, first, count).copy_(run_group(g, x.narrow(0, first, count)));
      continue;
    }
    const torch::Tensor rows = order.narrow(0, start[g], count);
    y.index_copy_(0, rows, run_group(g, x.index_select(0, rows)));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def(
      "gated_linear_multi_cpu(Tensor x, Tensor weight, Tensor bank, Tensor index, Tensor? bias, float[] gamma) -> "
      "Tensor",
      &gated_linear_multi_cpu);
}

}  // namespace persona_kernels
