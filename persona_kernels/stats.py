"""Running per-input-channel statistics of activations (:class:`ActivationStats`).

Batches are reduced by a kernel to :class:`~persona_kernels.ops.welford.WelfordPartials` (count, mean,
sum of squared deviations, the same for ``|x|``, per-sequence Σx²) and merged into float64 running state
with Chan's parallel formula: on CPU in eager mode one in-place C++ pass (``welford_merge_cpu_``), elsewhere
a handful of tensor ops on the statistics' device (no ``.item()``, no host synchronisation, so recording does
not stall a GPU pipeline). Counts are int64 and therefore exact (also past 2**24 or 2**53 tokens).

Imports go one way: this module uses :mod:`persona_kernels.ops.welford` (kernels, ``WelfordPartials``);
that module never imports this one (it calls :meth:`ActivationStats.merge_batch` on the object it is given).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional, Union

import torch

from persona_kernels.ops.welford import WelfordPartials, welford_update
from persona_kernels.utils.errors import fail

_F64 = torch.float64
_I64 = torch.int64

# state_dict keys. Internally the three Welford summaries (x, |x|, per-sequence L2 norm) are rows 0, 1, 2 of
# stacked [3, K] tensors so that one Chan merge (a dozen tensor ops) updates all of them.
_KEYS = ("count", "mean", "m2", "abs_mean", "abs_m2", "seq_count", "seq_l2_mean", "seq_l2_m2", "nonfinite")
_ROW = {"count": 0, "mean": 0, "m2": 0, "abs_mean": 1, "abs_m2": 1, "seq_count": 2, "seq_l2_mean": 2,
        "seq_l2_m2": 2}
_COUNT_KEYS = ("count", "seq_count", "nonfinite")


def _chan(
    n_a: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor,
    n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of two (count, mean, M2) summaries, elementwise; counts int64, moments float64."""
    n = n_a + n_b
    w_b = n_b.to(_F64) / n.to(_F64).clamp_min(1.0)
    delta = mean_b - mean_a
    mean = torch.addcmul(mean_a, delta, w_b)
    m2 = m2_a + m2_b + delta * delta * (n_a.to(_F64) * w_b)
    has_b = n_b > 0  # keeps the state untouched (and free of 0 * inf) where b is empty
    return n, torch.where(has_b, mean, mean_a), torch.where(has_b, m2, m2_a)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrt of a non-negative tensor. (On CPU, torch.sqrt of even a tiny tensor wakes the whole thread pool
    here, costing milliseconds on a busy host; rsqrt does not.)"""
    root = torch.where(torch.isinf(t), t, t * torch.rsqrt(t))  # inf * rsqrt(inf) would be NaN
    return torch.where(t > 0, root, torch.zeros((), dtype=t.dtype, device=t.device))


@functools.lru_cache(maxsize=None)
def _has_merge_op() -> bool:
    from persona_kernels import _extension

    return _extension.has_cpu_kernels() and hasattr(torch.ops.persona_kernels_C, "welford_merge_cpu_")


def _seq_info(token_mask: Optional[torch.Tensor], rows: int, seq_len: int):
    """(bool [S] sequences holding at least one valid token or None = all, number of valid rows)."""
    if token_mask is None:
        return None, rows
    valid_rows = token_mask.sum(dtype=torch.int64)
    if seq_len == 0:
        return None, valid_rows
    return token_mask.reshape(-1, seq_len).any(dim=1), valid_rows


@functools.lru_cache(maxsize=None)
def _fused_op_built() -> bool:
    return hasattr(torch.ops.persona_kernels_C, "linear_stats_merge_cpu_")


def _has_fused_op() -> bool:
    """The C++ linear + in-place merge op is usable (it needs the merge op too)."""
    return _has_merge_op() and _fused_op_built()


def _row_view(state: str, row: int) -> property:
    """A stored statistic: row ``row`` of the state tensor ``state``, a [K] view that follows later updates."""
    return property(lambda self: getattr(self, state)[row], doc=f"{state[1:]}[{row}] of the running state (a view)")


def _row_variance(row: int) -> property:
    """The population variance of summary ``row``: M2 / count (0 where the count is 0), a new [K] tensor."""
    return property(lambda self: self._m2[row] / self._n[row].clamp_min(1).to(_F64),
                    doc=f"population variance of summary {row} (computed when read)")


class ActivationStats:
    """Per-channel running statistics of a layer's input ``x[..., K]``.

    Properties (``[K]`` tensors on :attr:`device`, float64 unless noted): ``count`` (int64, finite values
    seen), ``mean``, ``var`` (population), ``abs_mean``, ``abs_var``, ``sq_mean`` (E[x²]), ``l2_norm``
    (sqrt Σx²), ``seq_count`` (int64, sequences seen), ``seq_l2_mean`` / ``seq_l2_var`` (mean and
    population variance over sequences of the sequence's per-channel L2 norm), ``nonfinite`` (int64 scalar:
    values excluded as inf/NaN). Channels without data report 0.

    Aliasing (the same rule on every device and path): the running state is only ever written in place.
    ``update``, ``update_from_partials``, ``merge`` and ``load_state_dict`` (C++ merge on CPU, tensor ops
    elsewhere) all overwrite the same state tensors, so the stored properties ``count``, ``mean``,
    ``abs_mean``, ``seq_count``, ``seq_l2_mean`` and ``nonfinite`` are views that follow later updates, while
    the derived ones (``var``, ``abs_var``, ``sq_mean``, ``l2_norm``, ``seq_l2_var``) are new tensors computed
    when read. Treat all of them as read-only and ``.clone()`` what must stay fixed. Only :meth:`to` (a move
    to another device) replaces the state tensors.

    Args:
        num_channels: K, the number of input channels (``in_features``).
        device: where the running state lives; batches must be on this device.
    """

    def __init__(self, num_channels: int, device: Optional[Union[torch.device, str]] = None) -> None:
        if isinstance(num_channels, bool) or not isinstance(num_channels, int):
            fail("ActivationStats", "num_channels", f"expected a positive int, got {type(num_channels).__name__}", TypeError)
        if num_channels < 1:
            fail("ActivationStats", "num_channels", f"expected a positive int, got {num_channels}")
        device = torch.device("cpu" if device is None else device)
        self._k = num_channels
        self._n = torch.zeros(3, num_channels, dtype=_I64, device=device)
        self._mean = torch.zeros(3, num_channels, dtype=_F64, device=device)
        self._m2 = torch.zeros(3, num_channels, dtype=_F64, device=device)
        self._nonfinite = torch.zeros((), dtype=_I64, device=device)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def num_channels(self) -> int:
        return self._k

    @property
    def device(self) -> torch.device:
        return self._n.device

    # the three Welford summaries (rows of the state, see _ROW): stored views, derived variances
    count = _row_view("_n", 0)
    mean = _row_view("_mean", 0)
    var = _row_variance(0)
    abs_mean = _row_view("_mean", 1)
    abs_var = _row_variance(1)
    seq_count = _row_view("_n", 2)
    seq_l2_mean = _row_view("_mean", 2)
    seq_l2_var = _row_variance(2)

    @property
    def sq_mean(self) -> torch.Tensor:
        return self.var + self.mean * self.mean

    @property
    def l2_norm(self) -> torch.Tensor:
        return _sqrt(self._m2[0] + self._n[0].to(_F64) * self._mean[0] * self._mean[0])

    @property
    def nonfinite(self) -> torch.Tensor:
        return self._nonfinite

    def __repr__(self) -> str:
        return f"ActivationStats(num_channels={self._k}, device={self.device})"

    # ------------------------------------------------------------------------------------------ updates
    def update(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, *, backend: str = "auto") -> None:
        """Merge the batch ``x[..., K]`` (see :func:`persona_kernels.ops.welford.welford_update`)."""
        welford_update(self, x, token_mask, backend=backend)

    def merge_batch(self, partials: Sequence[torch.Tensor], row_mask: Optional[torch.Tensor], seq_len: int,
                    rows: int, *, native: bool = True) -> None:
        """Merge a kernel's partials of a batch of ``rows`` rows (``row_mask`` bool [rows] or None; sequences
        of ``seq_len`` rows, 0 = none), in place: the C++ pass when ``native`` (eager mode) and the state and
        partials are on the CPU, else tensor ops (:meth:`update_from_partials`). Same results either way."""
        if native and self._merge_partials_cpu(partials, row_mask, seq_len, rows):
            return
        seq, valid = _seq_info(row_mask, rows, seq_len)
        self.update_from_partials(WelfordPartials(*partials), seq=seq, rows=valid)

    def update_from_partials(
        self,
        partials: Sequence[torch.Tensor],
        seq: Optional[torch.Tensor] = None,
        *,
        rows: Union[int, torch.Tensor, None] = None,
    ) -> None:
        """Merge one batch's ``WelfordPartials`` (count, mean, m2, abs_mean, abs_m2, seq_sumsq).

        Args:
            partials: the 6 tensors of the ``welford_partials`` contract (any device; moved here).
            seq: optional bool ``[S]`` (S = ``seq_sumsq.shape[0]``): sequences holding at least one valid token;
                only those enter the per-sequence L2 statistics. None: all S sequences count.
            rows: number of rows that passed the row mask (int or int64 scalar tensor). When given,
                ``rows * K - sum(count)`` values are added to :attr:`nonfinite`; None leaves it unchanged.
        """
        if not isinstance(partials, (tuple, list)) or len(partials) != 6:
            fail("ActivationStats", "partials", "expected a WelfordPartials tuple of 6 tensors "
                 "(count, mean, m2, abs_mean, abs_m2, seq_sumsq)", TypeError)
        names = ("count", "mean", "m2", "abs_mean", "abs_m2", "seq_sumsq")
        for name, t in zip(names, partials):
            if not isinstance(t, torch.Tensor):
                fail("ActivationStats", "partials", f"{name}: expected a tensor, got {type(t).__name__}", TypeError)
        k, dev = self._k, self.device
        for name, t in zip(names[:5], partials[:5]):
            if tuple(t.shape) != (k,):
                fail("ActivationStats", "partials", f"{name}: expected shape [{k}], got {tuple(t.shape)}")
        seq_sumsq = partials[5]
        if seq_sumsq.dim() != 2 or seq_sumsq.shape[1] != k:
            fail("ActivationStats", "partials", f"seq_sumsq: expected shape [S, {k}], got {tuple(seq_sumsq.shape)}")
        if partials[0].dtype.is_floating_point or partials[0].dtype == torch.bool:
            fail("ActivationStats", "partials", f"count: expected an integer tensor, got {partials[0].dtype}", TypeError)
        nseq = seq_sumsq.shape[0]
        if seq is not None and nseq > 0 and (
            not isinstance(seq, torch.Tensor) or seq.dtype != torch.bool or tuple(seq.shape) != (nseq,)
        ):
            fail("ActivationStats", "seq", f"expected a bool tensor of shape [{nseq}] or None, got "
                 f"{tuple(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__}")
        count, mean, m2, amean, am2, seq_sumsq = (
            t if t.device == dev else t.to(dev, non_blocking=True) for t in partials)
        count = count.to(_I64)
        if nseq == 0:
            n_s, mean_s, m2_s = torch.zeros_like(count), torch.zeros_like(self._mean[2]), torch.zeros_like(self._m2[2])
        else:
            l2 = _sqrt(seq_sumsq.to(_F64))
            if seq is None:
                mean_s = l2.mean(0)  # (torch.var_mean is much slower on short columns)
                dev_s = l2 - mean_s
                m2_s = (dev_s * dev_s).sum(0)
                n_s = torch.full_like(count, nseq)
            else:
                w = seq.to(dev, non_blocking=True)
                n_s = w.sum(dtype=_I64).expand(k)
                w = w.to(_F64).unsqueeze(1)
                mean_s = (l2 * w).sum(0) / n_s.clamp_min(1).to(_F64)
                dev_s = (l2 - mean_s) * w
                m2_s = (dev_s * dev_s).sum(0)
        n_b = torch.stack((count, count, n_s))
        mean_b = torch.stack((mean, amean, mean_s)).to(_F64)
        m2_b = torch.stack((m2, am2, m2_s)).to(_F64)
        self._assign(*_chan(self._n, self._mean, self._m2, n_b, mean_b, m2_b))
        if rows is not None:
            if isinstance(rows, torch.Tensor):
                rows = rows.to(dev, non_blocking=True).to(_I64)
            self._nonfinite.add_(rows * k - count.sum())

    def _assign(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Write new state into the existing tensors (the aliasing rule: state is only written in place)."""
        self._n.copy_(n)
        self._mean.copy_(mean)
        self._m2.copy_(m2)

    def _merge_partials_cpu(self, partials: Sequence[torch.Tensor], row_mask: Optional[torch.Tensor], seq_len: int,
                            rows: int) -> bool:
        """Merge a kernel's partials in place with the C++ op (one pass instead of ~30 tensor ops).

        Only for CPU state and CPU partials from the kernels (contiguous, float32/float64 moments); returns
        False (nothing done) when that does not apply, and the caller falls back to :meth:`update_from_partials`.
        """
        if self._n.device.type != "cpu" or not _has_merge_op():
            return False
        count, mean, m2, amean, am2, seq_sumsq = partials
        if count.dtype != _I64 or any(t.device.type != "cpu" or not t.is_contiguous() for t in partials):
            return False
        if mean.dtype not in (torch.float32, _F64) or any(t.dtype != mean.dtype for t in (m2, amean, am2, seq_sumsq)):
            return False
        if row_mask is not None and (row_mask.device.type != "cpu" or not row_mask.is_contiguous()):
            return False
        torch.ops.persona_kernels_C.welford_merge_cpu_(self._n, self._mean, self._m2, self._nonfinite, count, mean, m2,
                                                       amean, am2, seq_sumsq, row_mask, int(seq_len), int(rows))
        return True

    def _linear_merge_cpu_op(self) -> Optional[Callable[..., torch.Tensor]]:
        """The C++ op ``linear_stats_merge_cpu_(x2, weight, bias, row_mask, seq_len, n, mean, m2, nonfinite)``,
        i.e. ``F.linear(x2, weight, bias)`` with the batch's statistics merged into the state passed as
        ``self._n, self._mean, self._m2, self._nonfinite`` in place, in ONE C++ call (the statistics pass, each
        channel run merged into the state as the pass finishes it, then the GEMM); None when this state is not on
        the CPU or the op is missing.

        Returned as the extension's direct binding of the op's C++ function (no dispatcher boxing, no Python
        frame), so for eager calls without an autograd graph only; validated CPU inputs (the function checks
        shapes, dtypes and devices itself). Callers read the state attributes at each call, so they follow
        :meth:`to`."""
        if self._n.device.type != "cpu" or not _has_fused_op():
            return None
        from persona_kernels import _extension

        direct = getattr(_extension.load(), "linear_stats_merge_cpu_", None)
        return direct if direct is not None else torch.ops.persona_kernels_C.linear_stats_merge_cpu_.default

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """Merge ``other`` (any device) into this one, in place; exact counts. Returns self."""
        if not isinstance(other, ActivationStats):
            fail("ActivationStats", "other", f"expected an ActivationStats, got {type(other).__name__}", TypeError)
        if other.num_channels != self._k:
            fail("ActivationStats", "other", f"num_channels {other.num_channels} does not match {self._k}")
        dev = self.device
        self._assign(*_chan(
            self._n, self._mean, self._m2,
            other._n.to(dev, non_blocking=True), other._mean.to(dev, non_blocking=True),
            other._m2.to(dev, non_blocking=True),
        ))
        self._nonfinite.add_(other._nonfinite.to(dev, non_blocking=True))
        return self

    @classmethod
    def merge_all(cls, stats: Iterable["ActivationStats"]) -> "ActivationStats":
        """A new ActivationStats merging ``stats`` in order (on the first one's device)."""
        items = list(stats)
        if not items:
            fail("ActivationStats", "stats", "expected at least one ActivationStats")
        if not isinstance(items[0], ActivationStats):
            fail("ActivationStats", "stats", f"expected ActivationStats items, got {type(items[0]).__name__}", TypeError)
        out = items[0].clone()
        for other in items[1:]:
            out.merge(other)
        return out

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (safetensors-compatible): count, mean, m2, abs_mean, abs_m2, seq_count, seq_l2_mean,
        seq_l2_m2 (``[K]``) and nonfinite (0-d)."""
        out = {}
        for key in _KEYS:
            if key == "nonfinite":
                out[key] = self._nonfinite.clone()
            else:
                src = self._n if key in _COUNT_KEYS else (self._mean if "mean" in key else self._m2)
                out[key] = src[_ROW[key]].clone()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the running state by ``state`` (from :meth:`state_dict`), moved to :attr:`device`."""
        if not isinstance(state, Mapping):
            fail("ActivationStats", "state", f"expected a mapping of tensors, got {type(state).__name__}", TypeError)
        missing = [key for key in _KEYS if key not in state]
        unexpected = [key for key in state if key not in _KEYS]
        if missing or unexpected:
            fail("ActivationStats", "state", f"keys do not match ActivationStats.state_dict(): missing {missing}, unexpected {unexpected}",
                 KeyError)
        new = {}
        for key in _KEYS:
            t = state[key]
            if not isinstance(t, torch.Tensor):
                fail("ActivationStats", "state", f"{key!r}: expected a tensor, got {type(t).__name__}", TypeError)
            want = () if key == "nonfinite" else (self._k,)
            if key == "nonfinite" and t.numel() == 1:
                t = t.reshape(())
            if tuple(t.shape) != want:
                fail("ActivationStats", "state", f"{key!r}: expected shape {list(want)}, got {list(t.shape)}")
            integer = key in _COUNT_KEYS
            if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
                fail("ActivationStats", "state", f"{key!r}: expected an integer tensor, got {t.dtype}", TypeError)
            if not integer and not t.dtype.is_floating_point:
                fail("ActivationStats", "state", f"{key!r}: expected a floating-point tensor, got {t.dtype}", TypeError)
            new[key] = t.detach().to(device=self.device, dtype=_I64 if integer else _F64)
        n = torch.stack((new["count"], new["count"], new["seq_count"]))
        if bool((n < 0).any() | (new["nonfinite"] < 0)):
            fail("ActivationStats", "state", "counts must be non-negative")
        self._assign(n, torch.stack((new["mean"], new["abs_mean"], new["seq_l2_mean"])),
                     torch.stack((new["m2"], new["abs_m2"], new["seq_l2_m2"])))
        self._nonfinite.copy_(new["nonfinite"])

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], device: Optional[Union[torch.device, str]] = None
    ) -> "ActivationStats":
        """Build from a :meth:`state_dict` (num_channels from its ``count``), on ``device`` (default cpu)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("count"), torch.Tensor):
            fail("ActivationStats", "state", "expected a mapping with a 'count' tensor (from ActivationStats.state_dict())", TypeError)
        out = cls(int(state["count"].numel()), device=device)
        out.load_state_dict(state)
        return out

    def to(self, device: Union[torch.device, str]) -> "ActivationStats":
        """Move the running state to ``device`` in place (like ``nn.Module.to``); returns self."""
        device = torch.device(device)
        self._n, self._mean, self._m2 = self._n.to(device), self._mean.to(device), self._m2.to(device)
        self._nonfinite = self._nonfinite.to(device)
        return self

    def clone(self) -> "ActivationStats":
        """An independent copy on the same device."""
        out = type(self).__new__(type(self))
        out._k = self._k
        out._n, out._mean, out._m2 = self._n.clone(), self._mean.clone(), self._m2.clone()
        out._nonfinite = self._nonfinite.clone()
        return out
