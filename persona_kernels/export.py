"""Export one persona as a standard Hugging Face checkpoint, its gates baked into the weights.

The folder written by :func:`export_persona` holds ``config.json``, ``model.safetensors`` (every masked weight
replaced by ``W * G`` with ``G = M + gamma (1 - M)``), ``generation_config.json``, the tokenizer files and a model
card (``README.md``) naming the persona, the method and the source bank. It loads with plain
``transformers.AutoModelForCausalLM.from_pretrained`` (no persona_kernels needed), so any engine that serves
Hugging Face checkpoints (vLLM, TGI, llama.cpp after ``convert_hf_to_gguf.py``) serves the persona.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from persona_kernels.utils.errors import check_gamma, fail

__all__ = ["export_persona"]

PathLike = Union[str, os.PathLike]
_FN = "export_persona"


def _model_card(persona: str, gamma: float, bank: Any, bank_source: Optional[str], base: Optional[str]) -> str:
    meta = bank.metadata
    method = meta.get("method_spec") or meta.get("method") or "unknown"
    kwargs = meta.get("method_kwargs") or {}
    options = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    front = ["---", "library_name: transformers", "tags:", "- persona-kernels", "- persona-subnetwork"]
    if base and not os.path.isabs(base):
        front.append(f"base_model: {base}")
    front.append("---")
    return "\n".join(front + [
        "",
        f"# Persona `{persona}`",
        "",
        f"The base model {('`' + base + '`') if base else '(unknown)'} with the persona subnetwork `{persona}` "
        "baked into its weights by [persona_kernels](https://arxiv.org/abs/2602.07164): every masked weight is "
        "`W * G` with `G = M + gamma * (1 - M)`, M the persona's keep-mask.",
        "",
        "| | |",
        "|---|---|",
        f"| persona | `{persona}` |",
        f"| method | `{method}`{f' ({options})' if options else ''} |",
        f"| rho (fraction of each row pruned) | {meta.get('sparsity')} |",
        f"| gamma (gate of pruned weights) | {gamma:g} |",
        f"| source bank | `{bank_source or 'in memory'}` (fingerprint `{bank.fingerprint}`) |",
        f"| masked modules | {sum(1 for _ in bank.masks(persona))} |",
        f"| personas in the bank | {', '.join(bank.personas)} |",
        "",
        "It is a plain Hugging Face checkpoint: load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`,",
        "or serve it like any other model (`vllm serve <folder>`, TGI `--model-id <folder>`, llama.cpp after",
        "`convert_hf_to_gguf.py <folder>`). The masks themselves (1 bit per weight, switchable at run time) stay in",
        "the source bank.",
        "",
    ])


def export_persona(
    model: Any,
    bank: Any,
    persona: str,
    out_dir: PathLike,
    gamma: Optional[float] = None,
    *,
    tokenizer: Any = None,
    bank_source: Optional[PathLike] = None,
) -> Path:
    """Write ``persona`` of ``bank`` baked into ``model``'s weights as a Hugging Face checkpoint in ``out_dir``.

    Args:
        model: the base causal LM (unpatched: it is patched, merged, saved and restored bit-exactly here), or a
            model already patched with this bank (its active persona is restored afterwards).
        bank: a :class:`~persona_kernels.bank.MaskBank`, or the path of an adapter folder / bank file.
        persona: the persona to bake in.
        gamma: soft gate in [0, 1] (None: the bank's ``default_gamma``).
        tokenizer: saved with the checkpoint (None: loaded from ``model.config._name_or_path`` when possible).
        bank_source: named in the model card (default: the path when ``bank`` is one).

    Returns:
        ``out_dir``; written atomically (a temporary sibling folder renamed into place).
    """
    import torch

    from persona_kernels import patching
    from persona_kernels.bank import MaskBank
    from persona_kernels.utils.atomic import atomic_directory

    if isinstance(bank, (str, os.PathLike)):
        bank_source = bank_source or str(bank)
        bank = MaskBank.from_pretrained(bank)
    if not hasattr(model, "save_pretrained"):
        fail(_FN, "model", f"expected a Hugging Face model (with save_pretrained), got {type(model).__name__}", TypeError)
    if not isinstance(bank, MaskBank):
        fail(_FN, "bank", f"expected a MaskBank or the path of an adapter folder / bank file, got {type(bank).__name__}",
             TypeError)
    if persona not in bank.personas:
        fail(_FN, "persona", f"unknown persona {persona!r}; the bank has {bank.personas}", KeyError)
    gamma = bank.default_gamma if gamma is None else check_gamma(_FN, gamma)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        fail(_FN, "out_dir", f"{out} is a file; expected a folder", NotADirectoryError)
    if tokenizer is None:
        tokenizer = _tokenizer_of(model)
    source = str(bank_source) if bank_source is not None else None
    base = _base_name(model, bank)

    was_patched = patching.is_patched(model)
    previous = (patching.get_persona(model), patching.get_gamma(model)) if was_patched else None
    if not was_patched:
        patching.patch_model(model, bank)
    try:
        with torch.no_grad():
            patching.merge_persona(model, persona, gamma=gamma)
        try:
            with atomic_directory(out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                (tmp / "README.md").write_text(_model_card(persona, gamma, bank, source, base), encoding="utf-8")
                info = {"persona": persona, "gamma": gamma, "source_bank": source, "bank_fingerprint": bank.fingerprint,
                        "method": bank.metadata.get("method"), "sparsity": bank.metadata.get("sparsity"),
                        "base_model": base}
                (tmp / "persona_export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        finally:
            patching.unmerge_persona(model)
    finally:
        if was_patched:
            patching.set_persona(model, previous[0], gamma=previous[1] if previous[0] is not None else None)
        else:
            patching.unpatch_model(model)
    return out


def _tokenizer_of(model: Any):
    """The tokenizer saved next to the model's weights, or None (with no error) when there is none."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not Path(source).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _base_name(model: Any, bank: Any) -> Optional[str]:
    if bank is not None and bank.metadata.get("base_model"):
        return str(bank.metadata["base_model"])
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None
