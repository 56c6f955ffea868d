"""The default operating point (mask method, sparsity, soft gate) and where its evidence lives.

The defaults of :func:`persona_kernels.calibrate`, the CLI and the demo come from here. They were chosen on
the SmolLM2-135M-Instruct frontier (``persona-kernels eval --sweep``; docs/results/smollm2/README.md): among
the settings run with a label-shuffled control on all four persona pairs (power, wealth, hallucination,
E/I) and within 2 % capability-proxy loss on each, the one with the largest mean paired effect size of the
switch net of its control. On fresh items that setting's switch is not distinguishable from its control
(nor is any pair's own best setting): on a 135M model no mask setting was shown to switch a persona. The
point is the least damaging of the candidates, not a proven persona switch; rerun the sweep on your model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatingPoint:
    """A mask setting: scoring method and its keyword arguments, sparsity rho and soft gate gamma."""

    method: str
    sparsity: float
    gamma: float
    method_kwargs: dict = field(default_factory=dict)
    evidence: str = ""
    finding: str = ""


#: the package default (see the module docstring)
DEFAULT = OperatingPoint(
    method="contrastive_wanda",
    sparsity=0.02,
    gamma=0.0,
    method_kwargs={"phi": "softplus", "tau": 1.0, "statistic": "token"},
    evidence="docs/results/smollm2/README.md; runs in docs/results/smollm2/frontier and, for this setting on "
             "fresh items, docs/results/smollm2/frontier_common",
    finding="On 48 fresh items per pair its switch net of the shuffled-label control was -0.000 (power), +0.003 "
            "(wealth), +0.000 (E/I), all intervals around 0, and +0.006 [+0.001, +0.011] log-odds on hallucination "
            "(tiny, and one in four intervals excluding 0 is what chance gives about one time in five), at no "
            "measurable capability cost. Read its mask rows as a control experiment: on this 135M model the "
            "masks do not switch the persona; the prompts do for E/I.",
)


def default_method_kwargs(method: str) -> dict:
    """Keyword arguments of ``method`` at the default operating point ({} for another method)."""
    return dict(DEFAULT.method_kwargs) if method == DEFAULT.method else {}
