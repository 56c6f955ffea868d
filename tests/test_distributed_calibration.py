"""Data-parallel calibration: 2 gloo ranks under torchrun give the single-process bank and statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import persona_kernels
from persona_kernels import cli, personas, pipeline
from persona_kernels.bank import MaskBank

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from persona_kernels import cli, personas, pipeline
    from persona_kernels.models import load_model

    model_dir, persona_dir, out_dir = sys.argv[1:4]
    # 1) the command line under torchrun: it joins the process group itself (gloo), rank 0 writes the bank
    rc = cli.main(["calibrate", "--model", model_dir, "--personas", persona_dir, "--pairs", "introvert:extravert",
                   "--batch-size", "4", "--max-length", "48", "--out", out_dir + "/bank_dist.safetensors"])
    assert rc == 0 and not dist.is_initialized()
    # 2) the library: persona_stats(distributed="auto") in a process group of our own (a file store: the
    #    torchrun store cannot host a second default group after the first was destroyed)
    dist.init_process_group("gloo", init_method="file://" + out_dir + "/pg_store", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    model, tok = load_model(model_dir)
    texts = personas.load_personas(persona_dir)
    stats, seen = pipeline.persona_stats(model, tok, texts, batch_size=3, max_length=48, chat_template=False,
                                         progress=False, distributed="auto")
    if dist.get_rank() == 0:
        flat = {f"{p}|{m}|{k}": v.contiguous() for p, st in stats.items() for m, s in st.items()
                for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
        save_file(flat, out_dir + "/stats_dist.safetensors")
        with open(out_dir + "/seen.json", "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()
    """
)


def _persona_dir(tmp_path):
    """Two small personas with an odd number of texts (unequal shards)."""
    folder = tmp_path / "personas"
    folder.mkdir()
    bundled = os.path.join(os.path.dirname(os.path.abspath(personas.__file__)), "data", "personas")
    for name, n in (("introvert", 11), ("extravert", 9)):
        with open(os.path.join(bundled, f"{name}.jsonl"), encoding="utf-8") as f:
            lines = [line for line in f if line.strip()][:n]
        (folder / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder


def test_two_rank_calibration_equals_single_process(shared, tmp_path):
    model_dir = str(shared / "models" / "stories260K")
    persona_dir = _persona_dir(tmp_path)
    (tmp_path / "worker.py").write_text(WORKER, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    env.pop("WORLD_SIZE", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(persona_kernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), model_dir, str(persona_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # single process, same data
    rc = cli.main(["calibrate", "--model", model_dir, "--personas", str(persona_dir), "--pairs", "introvert:extravert",
                   "--batch-size", "4", "--max-length", "48", "--out", str(tmp_path / "bank_single.safetensors")])
    assert rc == 0
    single = MaskBank.load(tmp_path / "bank_single.safetensors")
    dist_bank = MaskBank.load(tmp_path / "bank_dist.safetensors")
    assert single.personas == dist_bank.personas and single.module_names == dist_bank.module_names
    for p in single.personas:
        for m in single.module_names:
            assert torch.equal(single.get(p, m), dist_bank.get(p, m)), f"mask {p}/{m} differs"
    assert dist_bank.metadata["tokens_seen"] == single.metadata["tokens_seen"]

    from persona_kernels.models import load_model
    from safetensors.torch import load_file

    model, tok = load_model(model_dir)
    texts = personas.load_personas(persona_dir)
    stats, seen = pipeline.persona_stats(model, tok, texts, batch_size=3, max_length=48, chat_template=False, progress=False)
    assert json.loads((tmp_path / "seen.json").read_text()) == seen
    got = load_file(str(tmp_path / "stats_dist.safetensors"))
    compared = 0
    for p, st in stats.items():
        for m, s in st.items():
            for k, v in s.state_dict().items():
                if not isinstance(v, torch.Tensor):
                    continue
                d = got[f"{p}|{m}|{k}"]
                if v.dtype in (torch.int64, torch.int32, torch.bool):
                    assert torch.equal(d, v), f"{p}/{m}/{k}"
                else:
                    torch.testing.assert_close(d, v, rtol=1e-5, atol=1e-6, msg=f"{p}/{m}/{k}")
                compared += 1
    assert compared > 0
    # the shards really were partial: one rank's statistics alone would differ
    some = next(iter(stats["introvert"].values()))
    assert int(some.count.max()) > 0


def test_persona_stats_rejects_bad_distributed_argument(shared):
    from persona_kernels.models import load_model

    model, tok = load_model(str(shared / "models" / "stories260K"))
    with pytest.raises(ValueError, match="argument 'distributed'"):
        pipeline.persona_stats(model, tok, {"a": ["hello"]}, distributed="yes")
