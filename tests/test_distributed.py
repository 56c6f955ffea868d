"""Exact merge of statistics across torch.distributed ranks (2 processes on gloo, compared to one process).

The test launches this file as a script twice (rank 0 and 1); each rank calibrates on its half of the
data, merges with ``all_reduce_stats`` and writes the merged statistics (safetensors) for the test
to compare with the single-process statistics of all the data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
PROPS = ("count", "mean", "var", "abs_mean", "abs_var", "sq_mean", "l2_norm", "nonfinite",
         "seq_count", "seq_l2_mean", "seq_l2_var")
NUM_BATCHES = 6


class _TinyLM(nn.Module):
    """A small transformer-like model (no transformers import: the workers start fast); q/k/v share an input."""

    def __init__(self, vocab: int = 100, d: int = 24, f: int = 43):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, 16), nn.Linear(d, 16), nn.Linear(d, 16)
        self.o = nn.Linear(16, d)
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d, bias=False)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        x = self.norm(h)
        h = h + self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h)


def _tiny_model() -> nn.Module:
    torch.manual_seed(4321)
    return _TinyLM().eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    """Padded batches of varied sizes, the same in every process."""
    g = torch.Generator().manual_seed(99)
    out = []
    for i in range(NUM_BATCHES):
        b, t = 2 + i % 3, 5 + (3 * i) % 7
        ids = torch.randint(1, 100, (b, t), generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _raw_updates(stats_cls, indices) -> dict:
    """A dict with an aliased entry, fed random [B, T, K] data (with token masks and a few infs)."""
    a, b = stats_cls(37), stats_cls(5)
    for i in indices:
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(3, 4 + i % 3, 37, generator=g) * (1 + i) + i
        if i % 2:
            x[0, 1, 2] = float("inf")
        keep = torch.rand(x.shape[:2], generator=g) > 0.3
        a.update(x, keep)
        b.update(torch.randn(7, 5, generator=g) - 3.0)
    return {"a": a, "a_alias": a, "b": b}


def _props(stats) -> dict[str, torch.Tensor]:
    out = {}
    for key in PROPS:
        if hasattr(stats, key):
            out[key] = getattr(stats, key).detach().cpu().clone().contiguous()
    return out


def _flatten(stats_dict) -> dict[str, torch.Tensor]:
    return {f"{name}|{k}": v for name, s in stats_dict.items() for k, v in _props(s).items()}


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from persona_kernels.calibration import collect_stats
    from persona_kernels.distributed import all_reduce_stats
    from persona_kernels.stats import ActivationStats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _tiny_model()
        mine = _batches()[rank::world]
        stats = collect_stats(model, mine, progress=False)
        groups_before = stats.shared_groups
        merged = all_reduce_stats(stats)
        assert merged is stats and stats.shared_groups == groups_before

        raw = all_reduce_stats(_raw_updates(ActivationStats, range(rank, 8, world)))
        assert raw["a"] is raw["a_alias"]

        # mismatched layouts raise on every rank (no hang)
        odd = {"x": ActivationStats(4)} if rank == 0 else {"x": ActivationStats(4), "y": ActivationStats(4)}
        try:
            all_reduce_stats(odd)
            mismatch = "no error"
        except ValueError as exc:
            mismatch = str(exc)

        save_file(_flatten(stats), os.path.join(outdir, f"model_{rank}.safetensors"))
        save_file(_flatten(raw), os.path.join(outdir, f"raw_{rank}.safetensors"))
        with open(os.path.join(outdir, f"info_{rank}.json"), "w") as f:
            json.dump({"groups": groups_before, "mismatch": mismatch}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_merge_equals_single_process(tmp_path):
    from safetensors.torch import load_file

    from persona_kernels.calibration import collect_stats
    from persona_kernels.stats import ActivationStats

    world, port = 2, _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(tmp_path)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"

    # single process over all the data
    stats = collect_stats(_tiny_model(), _batches(), progress=False)
    raw = _raw_updates(ActivationStats, range(8))
    for prefix, expected in (("model", _flatten(stats)), ("raw", _flatten(raw))):
        ranks = [load_file(str(tmp_path / f"{prefix}_{r}.safetensors")) for r in range(world)]
        assert set(ranks[0]) == set(expected)
        for key, want in expected.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{prefix} {key}: ranks differ"
            got = ranks[0][key]
            if not got.is_floating_point():
                assert torch.equal(got, want), f"{prefix} {key}: {got} != {want}"
            else:
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{prefix} {key}: {m}")
    info = [json.loads((tmp_path / f"info_{r}.json").read_text()) for r in range(world)]
    assert info[0]["groups"] == stats.shared_groups
    for r in range(world):
        assert "different statistics layouts" in info[r]["mismatch"], info[r]["mismatch"]


def test_errors_without_process_group():
    from persona_kernels.distributed import all_reduce_stats
    from persona_kernels.stats import ActivationStats

    with pytest.raises(TypeError, match="stats_dict"):
        all_reduce_stats([ActivationStats(3)])
    with pytest.raises(TypeError, match="'w'.*expected ActivationStats"):
        all_reduce_stats({"w": torch.zeros(3)})
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            all_reduce_stats({"w": ActivationStats(3)})


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
