"""Section "switching": persona switch latency and memory per persona.

Latency of switching between two personas on SmolLM2-135M (every Linear but the LM head masked, random
masks keeping half of the weights):
  - ``set_persona``: our patched model (``persona_kernels.patching``): points each module at another packed mask;
  - ``reload_safetensors``: load that persona's masked weights from a safetensors file and copy them in;
  - ``inplace_multiply``: restore the original weights from a kept copy, then multiply the new mask in place.
Memory per persona (exact byte counts, no timing): our bank (1 bit/weight: file size and in-memory bytes),
a pickled bool mask per layer (``torch.save`` of bool tensors; only its size is measured, never loaded), and
a masked bf16 copy of the weights.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

from persona_kernels.bench.common import Case, Config, linear_modules, load_default_model, run_cases, static_row

TITLE = "Persona switching latency and memory per persona"
PERSONAS = ("persona_a", "persona_b")


def random_bool_masks(model: nn.Module, seed: int, keep: float = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """persona -> module -> random bool keep-mask (CPU) for every Linear but the LM head."""
    gen = torch.Generator().manual_seed(seed)
    mods = linear_modules(model)
    return {p: {n: torch.rand(m.out_features, m.in_features, generator=gen) < keep for n, m in mods.items()}
            for p in PERSONAS}


def random_bank(model: nn.Module, seed: int, bool_masks: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
    """A MaskBank with the personas of :func:`random_bool_masks` (packed, 1 bit per weight)."""
    from persona_kernels.bank import MaskBank

    bool_masks = bool_masks or random_bool_masks(model, seed)
    bank = MaskBank(metadata={"method": "random", "sparsity": 0.5})
    for p, masks in bool_masks.items():
        bank.add(p, masks)
    return bank


def _file_size(path: Path) -> int:
    return os.stat(path).st_size


def memory_row(model: nn.Module, bank, bool_masks, tmp: Path) -> dict[str, Any]:
    """Bytes per persona of each storage format (persona_a)."""
    from persona_kernels.bank import MaskBank

    p = PERSONAS[0]
    single = MaskBank(metadata={"method": "random"})
    single.add(p, bank.masks(p), shapes=bank.shapes)
    bank_path = single.save(tmp / "bank.safetensors")
    pickle_path = tmp / "masks.pt"
    torch.save(dict(bool_masks[p]), pickle_path)  # written to measure its size; never loaded
    weights = sum(m.weight.numel() for m in linear_modules(model).values())
    values = {
        "bank_file": _file_size(bank_path),
        "bank_memory": sum(t.numel() * t.element_size() for t in bank.masks(p).values()),
        "pickled_bool_masks": _file_size(pickle_path),
        "masked_bf16_copy": weights * 2,
    }
    ratios = [("bank_file/pickled_bool_masks", "bank_file", "pickled_bool_masks", True),
              ("bank_file/masked_bf16_copy", "bank_file", "masked_bf16_copy", True),
              ("bank_memory/masked_bf16_copy", "bank_memory", "masked_bf16_copy", True)]
    metrics = {f"{k}_bits_per_weight": 8.0 * v / weights for k, v in values.items()}
    metrics["masked_weights"] = weights
    return static_row("memory per persona", {"model": "SmolLM2-135M-Instruct", "weights": weights}, values, ratios, metrics)


@contextlib.contextmanager
def switch_methods(cfg: Config, model: nn.Module, bool_masks=None, bank=None) -> Iterator[dict[str, Callable[[], None]]]:
    """Patch ``model`` with a random two-persona bank and yield ``{method: switch to the next persona}``.

    On exit the weights are restored and the model unpatched (memory is measured by :func:`memory_row`).
    """
    from safetensors.torch import load_file, save_file

    from persona_kernels.patching import patch_model, set_persona, unpatch_model

    mods = linear_modules(model)
    bool_masks = bool_masks or random_bool_masks(model, cfg.seed)
    bank = bank or random_bank(model, cfg.seed, bool_masks)
    params = {n: m.weight for n, m in mods.items()}
    originals = {n: w.detach().clone() for n, w in params.items()}
    with tempfile.TemporaryDirectory(prefix="pk-bench-") as tmpdir:
        files = {}
        for p in PERSONAS:  # each persona's masked weights, as a switch-by-reload would keep them
            files[p] = Path(tmpdir) / f"{p}.safetensors"
            save_file({n: (originals[n] * bool_masks[p][n].to(originals[n].device)).cpu().contiguous()
                       for n in params}, str(files[p]))
        dev_masks = {p: {n: m.to(cfg.device) for n, m in bm.items()} for p, bm in bool_masks.items()}
        cycle = {k: itertools.cycle(PERSONAS) for k in ("set", "reload", "inplace")}

        @torch.no_grad()
        def reload():
            loaded = load_file(str(files[next(cycle["reload"])]), device=str(cfg.device))
            for n, w in params.items():
                w.copy_(loaded[n])

        @torch.no_grad()
        def inplace():
            p = next(cycle["inplace"])
            for n, w in params.items():
                w.copy_(originals[n])
                w.mul_(dev_masks[p][n])

        patch_model(model, bank)
        try:
            yield {"set_persona": lambda: set_persona(model, next(cycle["set"])),
                   "reload_safetensors": reload, "inplace_multiply": inplace}
        finally:
            set_persona(model, None)
            with torch.no_grad():
                for n, w in params.items():
                    w.copy_(originals[n])
            unpatch_model(model)


def run(cfg: Config, model_and_tokenizer=None) -> dict[str, Any]:
    model, _ = model_and_tokenizer or load_default_model(cfg)
    bool_masks = random_bool_masks(model, cfg.seed)
    bank = random_bank(model, cfg.seed, bool_masks)
    with tempfile.TemporaryDirectory(prefix="pk-bench-") as tmpdir:
        mem = memory_row(model, bank, bool_masks, Path(tmpdir))
    with switch_methods(cfg, model, bool_masks, bank) as fns:
        case = Case(key="SmolLM2-135M|switch", params={"model": "SmolLM2-135M-Instruct", "modules": len(bank.module_names)},
                    setup=lambda: fns, min_time=0.05, repeats=3 if cfg.quick or cfg.tiny else cfg.repeats,
                    ratios=[("set_persona/reload_safetensors", "set_persona", "reload_safetensors", True),
                            ("set_persona/inplace_multiply", "set_persona", "inplace_multiply", True)])
        rows, skipped = run_cases([case], cfg, "switching")
    return {"title": TITLE, "rows": rows + [mem], "skipped": skipped,
            "notes": ["latency rows: seconds per switch (median over repeats, several switches per sample)",
                      "memory row: bytes per persona; ratios are ours / other (lower is smaller)"]}
