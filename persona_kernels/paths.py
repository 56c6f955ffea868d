"""Where the reference data lives (``../shared`` beside the project, or $PERSONA_KERNELS_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PERSONA_KERNELS_SHARED"


def shared_dir(required: bool = False) -> Path | None:
    """The shared data folder: $PERSONA_KERNELS_SHARED, else ``../shared`` from the repo or the cwd."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if required and not path.is_dir():
            raise FileNotFoundError(f"${ENV_VAR} points to {path}, which is not a folder")
        return path
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"):
        if (candidate / "README.md").is_file() or (candidate / "data").is_dir():
            return candidate
    if required:
        raise FileNotFoundError(f"shared data folder not found; set ${ENV_VAR} to the folder holding data/ and models/")
    return None


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder (raises FileNotFoundError naming the variable when absent)."""
    base = shared_dir(required=True)
    path = base.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (shared folder: {base}; override with ${ENV_VAR})")
    return path
