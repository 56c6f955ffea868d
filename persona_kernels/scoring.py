"""Persona mask scoring: Wanda, Contrastive-Wanda and Contrastive-Sparse keep-masks for one ``nn.Linear``.

Notation: ``weight`` is ``[N, K]`` (``nn.Linear`` layout, K = in_features), ``rho`` the sparsity, and every
row keeps ``k = K - floor(rho * K)`` weights (``floor`` taken with a 1e-9*K tolerance so that ``0.29 * 100``
gives 29; as sparsity -> 1 that tolerance lets k reach 0). Returned masks are bool ``[N, K]`` with
True = kept (or bit-packed int32 with ``packed=True``).

Statistics are :class:`persona_kernels.stats.ActivationStats` or any object with the same attributes
(``abs_mean``, ``abs_var``, ``l2_norm``, ``seq_l2_mean``, ``seq_l2_var``): each a ``[K]`` tensor of the inputs
of the layer on one persona's calibration data.

Tie rule (deterministic, reproducible): among equal scores the LOWER input index wins the keep.
Contrastive-Sparse is the single exception, see :func:`contrastive_sparse`.

Implementation: scores are formed in fp32 (weights may be bf16/fp16). On the CPU with the compiled
extension, one C++ op (``persona_kernels_C::select_mask_cpu``, csrc/select_cpu.cpp) forms each row's
scores in a per-thread buffer, finds the row's threshold by sampling (a strided sample brackets the wanted
rank, ``nth_element`` runs on the few keys inside the bracket: no full sort, so small ``rho`` costs no more
than large), and writes the mask (or its packed words) with the tie rule; rows are handed to threads
dynamically. Elsewhere (GPU, or no extension) a block of rows at a time (block size from
``memory_budget``) goes through ``numpy.partition`` (CPU) or ``torch.topk`` and a cumulative count
resolves the ties. Both paths give identical masks (tested).

Common keyword arguments of the mask builders: ``packed=True`` returns bit-packed int32 words instead
of bool (1 bit per weight: a 128256x4096 layer then needs ~64 MiB of output), ``memory_budget`` (bytes,
default 256 MiB) bounds the scratch memory of one block of rows (on the CPU blocks are smaller anyway,
~1 MiB of scores, which keeps them in cache), ``chunk_rows`` forces the block size. Results do not
depend on the blocking.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from persona_kernels.utils.errors import message
from persona_kernels.ops.packing import packed_words

__all__ = [
    "wanda",
    "contrastive_wanda",
    "contrastive_sparse",
    "compose",
    "wanda_scores",
    "contrastive_sparse_scores",
    "contrastive_wanda_factors",
    "num_pruned",
    "select_largest",
]

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of scratch memory per block of rows
_BYTES_PER_SCORE = 32  # fp32 scores of both sides, |W|, bool temporaries, topk values (upper bound)
_CPU_BLOCK_SCORES = 1 << 18  # cache-sized blocks on the CPU (1 MiB of fp32 scores)
_PHIS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"softplus": F.softplus, "relu": torch.relu}
_ACTIVATIONS = {"abs_mean": "abs_mean", "l2": "l2_norm", "l2_norm": "l2_norm"}
_STATISTICS = {"token": ("abs_mean", "abs_var"), "sequence": ("seq_l2_mean", "seq_l2_var")}


def _err(arg: str, msg: str) -> str:
    return message("scoring", msg, arg)


def num_pruned(sparsity: float, in_features: int) -> int:
    """``floor(sparsity * in_features)``, tolerant to binary rounding: ``num_pruned(0.29, 100) == 29``.

    The tolerance is ``1e-9 * K`` (far above float64 error, far below any meaningful sparsity step).
    """
    k = int(in_features)
    return min(k, int(math.floor(float(sparsity) * k + 1e-9 * max(1, k))))


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_weight(weight: Any) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(_err("weight", f"expected a torch.Tensor, got {type(weight).__name__}"))
    if weight.dim() != 2:
        raise ValueError(_err("weight", f"expected shape [N, K] (nn.Linear layout), got {tuple(weight.shape)}"))
    if not (weight.is_floating_point()):
        raise TypeError(_err("weight", f"expected a floating-point tensor, got {weight.dtype}"))
    return weight


def _check_sparsity(sparsity: Any, high: float, inclusive: bool) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(_err("sparsity", f"expected a float, got {type(sparsity).__name__}")) from None
    ok = 0.0 <= value <= high if inclusive else 0.0 <= value < high
    if not ok or math.isnan(value):
        interval = f"[0, {high}]" if inclusive else f"[0, {high})"
        raise ValueError(_err("sparsity", f"expected a value in {interval}, got {sparsity!r}"))
    return value


def _stat_vector(stats: Any, attr: str, arg: str, in_features: int) -> torch.Tensor:
    """``stats.<attr>`` as a float64 [K] vector on the CPU (K values only; callers move it to the weight's
    device in fp32, so devices without float64 work too); a bare tensor stands for itself."""
    if isinstance(stats, torch.Tensor):
        value = stats
        where = f"'{arg}'"
    else:
        if not hasattr(stats, attr):
            raise TypeError(
                _err(arg, f"expected ActivationStats (or an object with a '{attr}' attribute), "
                     f"got {type(stats).__name__} without '{attr}'")
            )
        value = getattr(stats, attr)
        where = f"'{arg}.{attr}'"
        seen = getattr(stats, "seq_count" if attr.startswith("seq_") else "count", None)
        if isinstance(seen, torch.Tensor) and seen.numel() and int(seen.max()) == 0:
            raise ValueError(_err(arg, f"holds no calibration data ({'sequences' if attr.startswith('seq_') else 'tokens'} seen: 0)"))
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
    if value.dim() != 1 or value.shape[0] != in_features:
        raise ValueError(
            f"persona_kernels.scoring: argument {where}: expected a [K] vector with K = weight.shape[1] = "
            f"{in_features}, got shape {tuple(value.shape)} (statistics of another layer?)"
        )
    value = value.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"persona_kernels.scoring: argument {where}: contains non-finite values")
    return value


def _activation_name(activation: Any) -> str:
    if activation not in _ACTIVATIONS:
        raise ValueError(_err("activation", f"expected one of 'abs_mean', 'l2'; got {activation!r}"))
    return _ACTIVATIONS[activation]


def _check_budget(memory_budget: Any, chunk_rows: Any) -> None:
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(_err("chunk_rows", f"expected a positive int or None, got {chunk_rows!r}"))
    if not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1:
        raise ValueError(_err("memory_budget", f"expected a positive int (bytes), got {memory_budget!r}"))


def _row_blocks(n: int, k: int, memory_budget: int, chunk_rows: int | None, device: torch.device):
    """Yield (start, stop) row ranges whose scratch memory fits ``memory_budget``; on the CPU blocks are
    further capped at ~``_CPU_BLOCK_SCORES`` scores so that the few passes over a block stay in cache
    (measured 3-4x faster than 32 MB blocks on a 4096-wide layer)."""
    if chunk_rows is not None:
        rows = chunk_rows
    else:
        rows = max(1, memory_budget // max(1, k * _BYTES_PER_SCORE))
        if device.type == "cpu":
            rows = min(rows, max(1, _CPU_BLOCK_SCORES // max(1, k)))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _magnitude_block(w: torch.Tensor, start: int) -> torch.Tensor:
    """``|w|`` in fp32 (a new tensor), after checking the block is finite (one reduction when it is)."""
    mag = w.abs().float()
    if mag.data_ptr() == w.data_ptr():
        mag = mag.clone()
    if not bool(torch.isfinite(mag.sum())):
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0]) + start
            raise ValueError(_err("weight", f"contains non-finite values (first in row {row})"))
    return mag


class _Output:
    """Destination of a mask: a bool [N, K] tensor, or its packed int32 [N, ceil(K/32)] words."""

    def __init__(self, n: int, k: int, device: torch.device, packed: bool):
        self.packed = packed
        if packed:
            self.data = torch.empty(n, packed_words(k), dtype=torch.int32, device=device)
        else:
            self.data = torch.empty(n, k, dtype=torch.bool, device=device)

    def write(self, start: int, stop: int, block: torch.Tensor) -> None:
        if self.packed:
            from persona_kernels.ops.packing import pack_mask

            self.data[start:stop] = pack_mask(block)
        else:
            self.data[start:stop] = block


# --------------------------------------------------------------------------------------------------
# row-wise selection


def _select_op():
    """The C++ row-selection op, or None when the extension is not built."""
    from persona_kernels import _extension

    return _extension.ops().select_mask_cpu if _extension.has_cpu_kernels() else None


def _native(t: torch.Tensor) -> bool:
    """Whether the C++ selection handles ``t`` (a CPU fp32/bf16/fp16 score or weight tensor)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and _select_op() is not None


def _native_select(
    values: torch.Tensor,
    count: int | torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    largest: bool = True,
    prefer_low_index: bool = True,
    packed: bool = False,
) -> torch.Tensor:
    """C++ selection of the ``count`` largest (smallest) entries of every row of ``values`` (or of
    ``|values| * scale`` when ``scale`` is given), ties by index; bool [R, K] or packed int32."""
    r = values.shape[0]
    counts = count.to(torch.int64) if isinstance(count, torch.Tensor) else torch.full((r,), int(count), dtype=torch.int64)
    if scale is None and values.dtype != torch.float32:
        values = values.float()
    return _select_op()(values.detach(), scale, counts, largest, prefer_low_index, packed)


def _use_numpy(scores: torch.Tensor) -> bool:
    return scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) and not scores.requires_grad


def _kth_largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count``-th largest value of every row, as [R, 1] (1 <= count <= K).

    CPU: ``numpy.partition`` (introselect, SIMD-accelerated in NumPy >= 2), several times faster than
    ``torch.topk`` there. Other devices: ``torch.topk`` from whichever end is shorter.
    """
    r, k = scores.shape
    if _use_numpy(scores):
        kth = k - count
        part = np.partition(scores.numpy(), kth, axis=1)
        return torch.from_numpy(np.ascontiguousarray(part[:, kth : kth + 1]))
    if count <= k - count + 1:
        return torch.topk(scores, count, dim=1, largest=True, sorted=False).values.amin(dim=1, keepdim=True)
    return torch.topk(scores, k - count + 1, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)


def _kth_largest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``counts[i]``-th largest value of row i as [R, 1] (rows with count 0 get their maximum)."""
    r, k = scores.shape
    idx = (counts - 1).clamp(min=0).unsqueeze(1)
    if _use_numpy(scores):
        ascending = np.sort(scores.numpy(), axis=1)
        pos = (k - 1 - idx).numpy()
        return torch.from_numpy(np.take_along_axis(ascending, pos, axis=1))
    kmax = int(counts.max())
    top = torch.topk(scores, max(kmax, 1), dim=1, largest=True, sorted=True).values
    return top.gather(1, idx)


def select_largest(scores: torch.Tensor, count: int | torch.Tensor, prefer_low_index: bool = True) -> torch.Tensor:
    """Bool mask of the ``count`` largest entries of each row of ``scores`` [R, K].

    ``count`` is an int or an int64 tensor [R] (one count per row). Ties at the threshold are broken by
    index: the lowest indices are taken first when ``prefer_low_index`` else the highest. Scores must
    not be NaN (``-inf`` is allowed and ranks last). Vectorised: one selection of the per-row threshold
    (count-th largest value), a comparison, and a cumulative count over the (rare) rows whose threshold
    value is tied.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(_err("scores", f"expected a floating-point [R, K] tensor, got {getattr(scores, 'shape', scores)!r}"))
    r, k = scores.shape
    if _native(scores) and scores.dtype == torch.float32:
        return _native_select(scores, count, prefer_low_index=prefer_low_index)
    empty = None
    if isinstance(count, int):
        if count <= 0 or r == 0:
            return torch.zeros(r, k, dtype=torch.bool, device=scores.device)
        if count >= k:
            return torch.ones(r, k, dtype=torch.bool, device=scores.device)
        thresh = _kth_largest(scores, count)
        n_selected = count
    else:
        counts = count.to(device=scores.device, dtype=torch.int64).clamp(0, k)
        if r == 0 or int(counts.max()) == 0:
            return torch.zeros(r, k, dtype=torch.bool, device=scores.device)
        thresh = _kth_largest_per_row(scores, counts)
        empty = counts == 0
        n_selected = counts
    return _finish_selection(scores, thresh, n_selected, prefer_low_index, largest=True, empty=empty)


def _finish_selection(
    scores: torch.Tensor,
    thresh: torch.Tensor,
    n_selected: int | torch.Tensor,
    prefer_low_index: bool,
    largest: bool,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entries beyond the per-row threshold ``thresh`` [R, 1] (>= when ``largest`` else <=), with the
    entries equal to it trimmed by index so that each row selects exactly ``n_selected``."""
    r = scores.shape[0]
    selected = scores >= thresh if largest else scores <= thresh
    if empty is not None:
        selected &= ~empty.unsqueeze(1)
    excess = selected.view(torch.uint8).sum(dim=1, dtype=torch.int64) - n_selected  # > 0 only on tied thresholds
    tied_rows = (excess != 0).nonzero().squeeze(1)
    if tied_rows.numel() == 0:
        return selected
    if bool((excess < 0).any()):  # only a NaN threshold selects too few
        raise ValueError("persona_kernels.scoring: argument 'scores': contains NaN (overflow of |W| * A?)")
    if isinstance(n_selected, int):
        n_selected = torch.full((r,), n_selected, dtype=torch.int64, device=scores.device)
    sub = scores.index_select(0, tied_rows)
    t = thresh.index_select(0, tied_rows)
    eq = sub == t
    beyond = sub > t if largest else sub < t
    need = n_selected.index_select(0, tied_rows) - beyond.sum(dim=1)  # how many tied entries to take
    rank = eq.cumsum(dim=1) if prefer_low_index else eq.flip(1).cumsum(dim=1).flip(1)
    selected[tied_rows] = beyond | (eq & (rank <= need.unsqueeze(1)))
    return selected


def _select_both_ends(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(smallest, largest)``: bool masks of the ``count`` smallest / largest entries of every row, for
    ``2 * count <= K``; ties: the smallest take the highest indices first, the largest the lowest first
    (the head and the tail of one order "value ascending, index descending", hence disjoint). One
    partition finds both thresholds."""
    r, k = scores.shape
    if count <= 0 or r == 0:
        none = torch.zeros(r, k, dtype=torch.bool, device=scores.device)
        return none, none.clone()
    if _native(scores) and scores.dtype == torch.float32:
        return (_native_select(scores, count, largest=False, prefer_low_index=False),
                _native_select(scores, count, largest=True, prefer_low_index=True))
    if _use_numpy(scores):
        # two single-kth partitions (NumPy's SIMD path takes one kth only): the second one only over the
        # upper part left by the first, where the count-th largest is at index K - 2*count
        part = np.partition(scores.numpy(), count - 1, axis=1)
        lo = torch.from_numpy(np.ascontiguousarray(part[:, count - 1 : count]))
        upper, kth = part[:, count:], k - 2 * count
        top = upper.min(axis=1, keepdims=True) if kth == 0 else np.partition(upper, kth, axis=1)[:, kth : kth + 1]
        hi = torch.from_numpy(np.ascontiguousarray(top))
    else:
        lo = torch.topk(scores, count, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
        hi = torch.topk(scores, count, dim=1, largest=True, sorted=False).values.amin(dim=1, keepdim=True)
    smallest = _finish_selection(scores, lo, count, prefer_low_index=False, largest=False)
    largest = _finish_selection(scores, hi, count, prefer_low_index=True, largest=True)
    return smallest, largest


# --------------------------------------------------------------------------------------------------
# Wanda


def wanda_scores(weight: torch.Tensor, stats: Any, activation: str = "abs_mean") -> torch.Tensor:
    """Dense fp32 Wanda scores ``S_ij = |W_ij| * A_j`` [N, K] (for analysis; the masks never need them whole)."""
    weight = _check_weight(weight)
    a = _stat_vector(stats, _activation_name(activation), "stats", weight.shape[1])
    return weight.detach().abs().float() * a.to(weight.device, torch.float32)


def wanda(
    weight: torch.Tensor,
    stats: Any,
    sparsity: float,
    activation: str = "abs_mean",
    *,
    packed: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Wanda keep-mask of one persona: ``S_ij = |W_ij| * A_j``, keep the ``k`` largest S of every row.

    ``A_j`` is ``stats.abs_mean`` (E|x_j|, ``activation="abs_mean"``, the paper's choice) or
    ``stats.l2_norm`` (``activation="l2"``, original Wanda). ``sparsity`` is in [0, 1); each row keeps
    ``k = K - floor(sparsity*K)`` weights (k may be 0 as sparsity -> 1). Ties: the lower index is kept.
    Returns bool ``[N, K]`` on weight's device, or packed int32 ``[N, ceil(K/32)]`` with ``packed=True``.
    ``stats`` may also be a bare ``[K]`` tensor used as A.
    """
    weight = _check_weight(weight)
    rho = _check_sparsity(sparsity, 1.0, inclusive=False)
    _check_budget(memory_budget, chunk_rows)
    n, k_in = weight.shape
    a = _stat_vector(stats, _activation_name(activation), "stats", k_in).to(weight.device, torch.float32)
    keep = k_in - num_pruned(rho, k_in)
    if _native(weight):
        return _native_select(weight, keep, scale=a, packed=packed)
    out = _Output(n, k_in, weight.device, packed)
    w_all = weight.detach()
    for start, stop in _row_blocks(n, k_in, memory_budget, chunk_rows, weight.device):
        w = w_all[start:stop]
        scores = _magnitude_block(w, start).mul_(a)
        out.write(start, stop, select_largest(scores, keep, prefer_low_index=True))
    return out.data


# --------------------------------------------------------------------------------------------------
# Contrastive-Wanda


def contrastive_wanda_factors(
    stats_pos: Any,
    stats_neg: Any,
    in_features: int,
    *,
    phi: str = "softplus",
    tau: float = 1.0,
    statistic: str = "token",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel factors ``(phi(z/tau), phi(-z/tau))`` of Contrastive-Wanda as float64 CPU [K] vectors."""
    if phi not in _PHIS:
        raise ValueError(_err("phi", f"expected one of {', '.join(map(repr, _PHIS))}; got {phi!r}"))
    if statistic not in _STATISTICS:
        raise ValueError(_err("statistic", f"expected one of {', '.join(map(repr, _STATISTICS))}; got {statistic!r}"))
    try:
        tau = float(tau)
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(_err("tau", f"expected floats for tau and eps, got {tau!r}, {eps!r}")) from None
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(_err("tau", f"expected a positive finite temperature, got {tau!r}"))
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(_err("eps", f"expected a finite value >= 0, got {eps!r}"))
    mean_attr, var_attr = _STATISTICS[statistic]
    mu_p = _stat_vector(stats_pos, mean_attr, "stats_pos", in_features)
    mu_n = _stat_vector(stats_neg, mean_attr, "stats_neg", in_features)
    var_p = _stat_vector(stats_pos, var_attr, "stats_pos", in_features).clamp(min=0.0)
    var_n = _stat_vector(stats_neg, var_attr, "stats_neg", in_features).clamp(min=0.0)
    z = (mu_p - mu_n) / (torch.sqrt(var_p + var_n) + eps)
    if eps == 0.0:
        z = torch.nan_to_num(z, nan=0.0)  # 0/0 on channels with no spread and no difference
    fn = _PHIS[phi]
    return fn(z / tau), fn(-z / tau)


def contrastive_wanda(
    weight: torch.Tensor,
    stats_pos: Any,
    stats_neg: Any,
    sparsity: float,
    phi: str = "softplus",
    tau: float = 1.0,
    statistic: str = "token",
    eps: float = 1e-6,
    *,
    packed: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive-Wanda keep-masks ``(keep_pos, keep_neg)`` of an opposing persona pair (p+, p-).

    ``z_j = (mu+_j - mu-_j) / (sqrt(var+_j + var-_j) + eps)`` where mu/var are the mean and variance of
    ``|x_j|`` over calibration tokens (``statistic="token"``: ``abs_mean``/``abs_var``) or of the
    per-sequence L2 norms (``statistic="sequence"``: ``seq_l2_mean``/``seq_l2_var``). Scores
    ``S+_ij = |W_ij| * phi(z_j)`` and ``S-_ij = |W_ij| * phi(-z_j)`` with ``phi(z) = softplus(z/tau)``
    (default) or ``relu(z/tau)``; each side keeps the ``k = K - floor(sparsity*K)`` largest of its row,
    ties -> lower index kept (with ``relu`` many scores are exactly 0, so this rule matters).
    ``sparsity`` in [0, 1).
    """
    weight = _check_weight(weight)
    rho = _check_sparsity(sparsity, 1.0, inclusive=False)
    _check_budget(memory_budget, chunk_rows)
    n, k_in = weight.shape
    f_pos, f_neg = contrastive_wanda_factors(
        stats_pos, stats_neg, k_in, phi=phi, tau=tau, statistic=statistic, eps=eps
    )
    f_pos, f_neg = f_pos.to(weight.device, torch.float32), f_neg.to(weight.device, torch.float32)
    keep = k_in - num_pruned(rho, k_in)
    if _native(weight):
        return (_native_select(weight, keep, scale=f_pos, packed=packed),
                _native_select(weight, keep, scale=f_neg, packed=packed))
    out_pos = _Output(n, k_in, weight.device, packed)
    out_neg = _Output(n, k_in, weight.device, packed)
    w_all = weight.detach()
    for start, stop in _row_blocks(n, k_in, memory_budget, chunk_rows, weight.device):
        w = w_all[start:stop]
        mag = _magnitude_block(w, start)
        out_pos.write(start, stop, select_largest(mag * f_pos, keep, prefer_low_index=True))
        out_neg.write(start, stop, select_largest(mag.mul_(f_neg), keep, prefer_low_index=True))
    return out_pos.data, out_neg.data


# --------------------------------------------------------------------------------------------------
# Contrastive-Sparse


def _contrastive_sparse_block(
    mag: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor, variant: str, eps: float
) -> torch.Tensor:
    """D (or the relative D) of a block of rows, fp32; rows whose total score is 0 normalise to 0."""
    s_pos = mag * a_pos
    s_neg = mag.mul_(a_neg)
    sum_pos = s_pos.sum(dim=1, keepdim=True)
    sum_neg = s_neg.sum(dim=1, keepdim=True)
    s_pos.div_(torch.where(sum_pos > 0, sum_pos, torch.ones_like(sum_pos)))
    s_neg.div_(torch.where(sum_neg > 0, sum_neg, torch.ones_like(sum_neg)))
    if variant == "difference":
        return s_pos.sub_(s_neg)
    total = s_pos + s_neg
    return s_pos.sub_(s_neg).div_(total.add_(eps))


def contrastive_sparse_scores(
    weight: torch.Tensor,
    stats_pos: Any,
    stats_neg: Any,
    activation: str = "abs_mean",
    variant: str = "difference",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Dense fp32 ``D = S~+ - S~-`` (or its relative variant) [N, K], see :func:`contrastive_sparse`."""
    weight = _check_weight(weight)
    _check_variant(variant)
    name = _activation_name(activation)
    k_in = weight.shape[1]
    a_pos = _stat_vector(stats_pos, name, "stats_pos", k_in).to(weight.device, torch.float32)
    a_neg = _stat_vector(stats_neg, name, "stats_neg", k_in).to(weight.device, torch.float32)
    return _contrastive_sparse_block(weight.detach().abs().float(), a_pos, a_neg, variant, float(eps))


def _check_variant(variant: Any) -> None:
    if variant not in ("difference", "relative"):
        raise ValueError(_err("variant", f"expected 'difference' or 'relative', got {variant!r}"))


def contrastive_sparse(
    weight: torch.Tensor,
    stats_pos: Any,
    stats_neg: Any,
    sparsity: float,
    activation: str = "abs_mean",
    variant: str = "difference",
    restrict_to: torch.Tensor | None = None,
    *,
    eps: float = 1e-12,
    packed: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive-Sparse keep-masks ``(keep_pos, keep_neg)`` of an opposing persona pair (p+, p-).

    ``S±_ij = |W_ij| * A±_j`` (A = ``abs_mean``, or ``l2_norm`` with ``activation="l2"``), row-normalised
    ``S~±_ij = S±_ij / sum_k S±_ik`` (a row whose sum is 0 normalises to 0) and ``D_ij = S~+_ij - S~-_ij``.
    ``variant="relative"`` ranks by ``D / (S~+ + S~- + eps)`` instead of D. With ``p = floor(sparsity*K)``,
    the mask of p+ prunes the p entries of each row with the most negative D (weights that matter more
    to p-), the mask of p- the p entries with the most positive D. ``sparsity`` must be in [0, 0.5].

    Tie rule: both sides share ONE total order of a row, "D ascending, then index descending"; p+ prunes
    its first p entries and p- its last p. So on ties p+ keeps the lower index and p- the higher one,
    and the two pruned sets are disjoint whenever 2p <= K. At sparsity 0.5 with even K the pruned sets
    (and so the kept sets) partition the row; with odd K, p = (K-1)/2 and exactly one entry per row
    (the middle of the order) is kept by both masks. Every row of each mask keeps exactly K - p.

    ``restrict_to``: optional bool ``[N, K]`` "prunable" mask (e.g. ``~wanda(weight, stats, 0.3)``, the
    weights a plain Wanda mask at a small sparsity would prune anyway). Only True entries may be
    pruned, and ``sparsity`` then applies to each row's prunable set: with ``n_i`` prunable entries in
    row i, each side prunes ``floor(sparsity * n_i)`` of them by the same rule (still disjoint, and at
    0.5 the prunable set is split between the two personas).
    """
    weight = _check_weight(weight)
    rho = _check_sparsity(sparsity, 0.5, inclusive=True)
    _check_variant(variant)
    _check_budget(memory_budget, chunk_rows)
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(_err("eps", f"expected a float, got {type(eps).__name__}")) from None
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(_err("eps", f"expected a finite value >= 0, got {eps!r}"))
    n, k_in = weight.shape
    if restrict_to is not None:
        if not isinstance(restrict_to, torch.Tensor) or restrict_to.dtype != torch.bool:
            raise TypeError(_err("restrict_to", "expected a bool tensor [N, K] (True = may be pruned) or None"))
        if tuple(restrict_to.shape) != (n, k_in):
            raise ValueError(
                _err("restrict_to", f"expected shape {(n, k_in)} (the weight's), got {tuple(restrict_to.shape)}")
            )
    name = _activation_name(activation)
    a_pos = _stat_vector(stats_pos, name, "stats_pos", k_in).to(weight.device, torch.float32)
    a_neg = _stat_vector(stats_neg, name, "stats_neg", k_in).to(weight.device, torch.float32)
    p = num_pruned(rho, k_in)
    out_pos = _Output(n, k_in, weight.device, packed)
    out_neg = _Output(n, k_in, weight.device, packed)
    w_all = weight.detach()
    for start, stop in _row_blocks(n, k_in, memory_budget, chunk_rows, weight.device):
        w = w_all[start:stop]
        d = _contrastive_sparse_block(_magnitude_block(w, start), a_pos, a_neg, variant, eps)
        if restrict_to is None:
            # head and tail of the order (D ascending, index descending)
            pruned_pos, pruned_neg = _select_both_ends(d, p)
        else:
            eligible = restrict_to[start:stop].to(d.device)
            n_elig = eligible.sum(dim=1)
            count = torch.floor(n_elig.double() * rho + 1e-9 * k_in).to(torch.int64)
            neg_d = torch.where(eligible, d.neg(), float("-inf"))
            d = d.masked_fill_(~eligible, float("-inf"))
            pruned_pos = select_largest(neg_d, count, prefer_low_index=False)
            pruned_neg = select_largest(d, count, prefer_low_index=True)
        out_pos.write(start, stop, ~pruned_pos)
        out_neg.write(start, stop, ~pruned_neg)
    return out_pos.data, out_neg.data


# --------------------------------------------------------------------------------------------------
# composition


def compose(packed_masks: Sequence[torch.Tensor], op: str = "and") -> torch.Tensor:
    """Bitwise AND (intersection of kept sets) or OR (union) of packed int32 masks of one module.

    E.g. an MBTI type as the AND of its four dimension masks. Works on the int32 words directly;
    padding bits stay 0. Returns a new tensor.
    """
    if op not in ("and", "or"):
        raise ValueError(_err("op", f"expected 'and' or 'or', got {op!r}"))
    if isinstance(packed_masks, torch.Tensor) or not isinstance(packed_masks, Sequence) or len(packed_masks) == 0:
        raise ValueError(_err("packed_masks", "expected a non-empty sequence of packed int32 tensors"))
    first = packed_masks[0]
    for i, m in enumerate(packed_masks):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int32:
            raise TypeError(_err("packed_masks", f"item {i}: expected an int32 tensor (pack_mask output)"))
        if m.shape != first.shape:
            raise ValueError(
                _err("packed_masks", f"item {i} has shape {tuple(m.shape)}, item 0 has {tuple(first.shape)}")
            )
        if m.device != first.device:
            raise ValueError(_err("packed_masks", f"item {i} is on {m.device}, item 0 on {first.device}"))
    result = first.clone()
    for m in packed_masks[1:]:
        if op == "and":
            result.bitwise_and_(m)
        else:
            result.bitwise_or_(m)
    return result
