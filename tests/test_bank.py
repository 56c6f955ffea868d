"""MaskBank: round trip, validation of damaged/foreign files, imports, composition, devices."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from persona_kernels import pack_mask
from persona_kernels.bank import FORMAT_VERSION, MaskBank, MaskBankError

SHAPES = {
    "model.layers.0.self_attn.q_proj": (16, 172),
    "model.layers.0.mlp.down_proj": (5, 64),
    "model.layers.1.self_attn.q_proj": (16, 172),
    "lm_head": (3, 33),
}


def random_masks(shapes=SHAPES, p=0.5):
    return {name: torch.rand(*s) < p for name, s in shapes.items()}


def make_bank(personas=("I", "E", "F")):
    masks = {p: random_masks() for p in personas}
    meta = {"method": "contrastive_sparse", "sparsity": 0.5, "method_kwargs": {"activation": "abs_mean"},
            "tokens_seen": {p: 1000 + i for i, p in enumerate(personas)}}
    return MaskBank.from_bool_masks(masks, metadata=meta, default_gamma=0.1), masks


class TinyModel(nn.Module):
    def __init__(self, shapes=SHAPES):
        super().__init__()
        self.linears = nn.ModuleDict()
        self._names = {}
        for name, (n, k) in shapes.items():
            self.linears[name.replace(".", "_")] = nn.Linear(k, n, bias=False)

    def named_modules(self, *args, **kwargs):  # expose the dotted names the bank uses
        for key, module in self.linears.items():
            yield next(n for n in SHAPES if n.replace(".", "_") == key), module


def test_round_trip_bit_exact(tmp_path):
    bank, masks = make_bank()
    path = bank.save(tmp_path / "bank.safetensors")
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temp file left
    loaded = MaskBank.load(path)
    assert loaded.personas == ["I", "E", "F"]
    assert loaded.module_names == list(SHAPES)  # order kept
    assert loaded.shapes == SHAPES
    assert loaded.fingerprint == bank.fingerprint
    assert loaded.metadata == bank.metadata and loaded.default_gamma == pytest.approx(0.1)
    assert loaded.tokens_seen == {"I": 1000, "E": 1001, "F": 1002}
    assert loaded.saved_with["format_version"] == FORMAT_VERSION
    for p in bank.personas:
        for m in SHAPES:
            assert torch.equal(loaded.get(p, m), bank.get(p, m))
            assert torch.equal(loaded.unpacked(p, m), masks[p][m])
    # 1 bit per weight in memory (int32 words) and on disk (plus the small header)
    words = sum(n * ((k + 31) // 32) for n, k in SHAPES.values())
    assert bank.nbytes == 3 * words * 4
    assert os.path.getsize(path) < bank.nbytes + 4096
    # saving again over the file works and is identical in content
    loaded.save(path)
    again = MaskBank.load(path)
    assert all(torch.equal(again.get(p, m), bank.get(p, m)) for p in bank.personas for m in SHAPES)


def test_every_flipped_byte_is_detected(tmp_path):
    bank = MaskBank.from_bool_masks({"a": {"x.q_proj": torch.rand(3, 40) < 0.5}, "b": {"x.q_proj": torch.rand(3, 40) < 0.5}})
    good = tmp_path / "good.safetensors"
    bank.save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for pos in range(len(data)):
        for flip in ((0x01, 0xFF) if pos % 3 == 0 else (0x01,)):
            damaged = bytearray(data)
            damaged[pos] ^= flip
            bad.write_bytes(bytes(damaged))
            with pytest.raises(MaskBankError, match="bad.safetensors"):
                MaskBank.load(bad)


def test_flipped_payload_byte_reports_checksum(tmp_path):
    bank, _ = make_bank()
    path = bank.save(tmp_path / "bank.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(MaskBankError, match=r"bank\.safetensors.*payload checksum"):
        MaskBank.load(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -37])
def test_truncated_file(tmp_path, keep):
    bank, _ = make_bank()
    path = bank.save(tmp_path / "bank.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(MaskBankError, match="bank.safetensors"):
        MaskBank.load(path)


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        MaskBank.load(tmp_path / "nope.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(other))
    with pytest.raises(MaskBankError, match="weights.safetensors.*not a persona_kernels mask bank"):
        MaskBank.load(other)


def _rewrite(path, tensors, header):
    """Write a file with VALID checksums but chosen contents (to reach the later checks)."""
    from persona_kernels.bank import _KEY_HEADER, _KEY_JSON, _KEY_PAYLOAD, _payload_sha256

    text = json.dumps(header, sort_keys=True)
    save_file(tensors, str(path), metadata={
        _KEY_JSON: text, _KEY_PAYLOAD: _payload_sha256(tensors),
        _KEY_HEADER: hashlib.sha256(text.encode()).hexdigest()})


def test_format_version_and_padding_checks(tmp_path):
    bank = MaskBank.from_bool_masks({"a": {"m": torch.rand(4, 40) < 0.5}})
    header = bank._header()
    tensors = {"a/m": bank.get("a", "m").clone()}
    path = tmp_path / "crafted.safetensors"
    _rewrite(path, tensors, {**header, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(MaskBankError, match="crafted.safetensors.*format version"):
        MaskBank.load(path)
    tensors["a/m"][2, 1] |= 1 << 20  # bit 52 > K = 40: padding
    _rewrite(path, tensors, header)
    with pytest.raises(MaskBankError, match="crafted.safetensors.*padding bits"):
        MaskBank.load(path)
    _rewrite(path, {"a/m": torch.zeros(4, 1, dtype=torch.int32)}, header)
    with pytest.raises(MaskBankError, match="crafted.safetensors.*expected int32"):
        MaskBank.load(path)
    _rewrite(path, {"a/m": bank.get("a", "m").clone(), "a/extra": bank.get("a", "m").clone()}, header)
    with pytest.raises(MaskBankError, match="tensor names"):
        MaskBank.load(path)


def test_fingerprint_and_other_model(tmp_path):
    bank, _ = make_bank()
    path = bank.save(tmp_path / "bank.safetensors")
    model = TinyModel()
    assert MaskBank.model_fingerprint(model) == bank.fingerprint
    assert MaskBank.model_fingerprint(SHAPES) == bank.fingerprint
    assert MaskBank.model_fingerprint({**SHAPES, "extra": (2, 2)}, list(SHAPES)) == bank.fingerprint
    assert MaskBank.model_fingerprint({**SHAPES, "extra": (2, 2)}) != bank.fingerprint
    MaskBank.load(path, model=model)
    MaskBank.load(path, expected_fingerprint=bank.fingerprint)
    MaskBank.load(path, model={**SHAPES, "unrelated": (7, 7)})  # extra Linears in the model are fine
    other = dict(SHAPES)
    other["lm_head"] = (3, 34)
    with pytest.raises(MaskBankError, match=r"bank\.safetensors.*another model.*lm_head"):
        MaskBank.load(path, model=other)
    with pytest.raises(MaskBankError, match=r"bank\.safetensors.*another model.*missing"):
        MaskBank.load(path, model={k: v for k, v in SHAPES.items() if k != "lm_head"})
    with pytest.raises(MaskBankError, match=r"bank\.safetensors.*another model"):
        MaskBank.load(path, expected_fingerprint=MaskBank.model_fingerprint(other))
    with pytest.raises(MaskBankError, match="no Linear module 'lm_head'"):
        MaskBank.model_fingerprint(model={"a": (1, 1)}, module_names=["lm_head"])


def test_add_validation_and_packed_input():
    bank = MaskBank()
    m = torch.rand(6, 172) < 0.5
    bank.add("p", {"mod": m}, tokens_seen=12)
    bank.add("q", {"mod": pack_mask(~m)})  # packed: K known from the bank
    assert torch.equal(bank.unpacked("q", "mod"), ~m)
    assert bank.tokens_seen == {"p": 12}
    with pytest.raises(ValueError, match="'shapes'"):
        bank.add("r", {"new": pack_mask(m)})
    bank.add("r", {"new": pack_mask(m)}, shapes={"new": (6, 172)})
    with pytest.raises(ValueError, match="'masks'.*shape"):
        bank.add("s", {"mod": torch.rand(6, 171) < 0.5})
    bad = pack_mask(m)
    bad[0, -1] |= 1 << 30
    with pytest.raises(ValueError, match="padding"):
        bank.add("s", {"mod": bad})
    with pytest.raises(ValueError, match="'persona'"):
        bank.add("a/b", {"mod": m})
    with pytest.raises(TypeError, match="'masks'"):
        bank.add("s", {"mod": m.float()})
    with pytest.raises(KeyError, match="unknown persona 'zzz'"):
        bank.get("zzz", "mod")
    with pytest.raises(KeyError, match="unknown module"):
        bank.get("p", "nope")
    assert bank.get("p", "new") is None  # known module, no mask for this persona
    with pytest.raises(ValueError, match="'default_gamma'"):
        bank.default_gamma = 1.5
    with pytest.raises(ValueError, match="'metadata'"):
        MaskBank({"x": object()}).save("/tmp/never_written.safetensors")
    assert not os.path.exists("/tmp/never_written.safetensors")
    bank.remove("r")
    assert "new" not in bank.module_names and "r" not in bank


def test_failed_save_leaves_existing_file(tmp_path):
    bank, _ = make_bank()
    path = bank.save(tmp_path / "bank.safetensors")
    before = path.read_bytes()
    broken = MaskBank.from_bool_masks({"a": {"m": torch.ones(2, 3, dtype=torch.bool)}}, metadata={"bad": {1, 2}})
    with pytest.raises(ValueError):
        broken.save(path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_add_composite_equals_bool_ops(tmp_path):
    bank, masks = make_bank(("I", "N", "F", "J"))
    bank.add_composite("INFJ", ["I", "N", "F", "J"], op="and")
    bank.add_composite("I|N", ["I", "N"], op="or")
    for m in SHAPES:
        assert torch.equal(bank.unpacked("INFJ", m), masks["I"][m] & masks["N"][m] & masks["F"][m] & masks["J"][m])
        assert torch.equal(bank.unpacked("I|N", m), masks["I"][m] | masks["N"][m])
    assert bank.composites["INFJ"] == {"op": "and", "of": ["I", "N", "F", "J"]}
    loaded = MaskBank.load(bank.save(tmp_path / "b.safetensors"))
    assert loaded.composites == bank.composites
    with pytest.raises(ValueError, match="'op'"):
        bank.add_composite("x", ["I"], op="xor")
    with pytest.raises(KeyError, match="unknown persona"):
        bank.add_composite("x", ["I", "Q"])


def test_devices_and_repr():
    bank, _ = make_bank()
    got = bank.masks("I", device_map={"lm_head": "meta"})
    assert got["lm_head"].device.type == "meta" and got["model.layers.0.mlp.down_proj"].device.type == "cpu"
    got = bank.masks("I", device="meta", device_map={"lm_head": "cpu"})
    assert got["lm_head"].device.type == "cpu" and got["model.layers.0.mlp.down_proj"].device.type == "meta"
    text = repr(bank)
    assert "3 personas" in text and "4 modules" in text and bank.fingerprint in text and "contrastive_sparse" in text
    assert bank.to("cpu") is bank


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda(tmp_path):
    bank, masks = make_bank()
    bank.to("cuda")
    assert bank.get("I", "lm_head").is_cuda
    loaded = MaskBank.load(bank.save(tmp_path / "b.safetensors"), device="cuda")
    assert torch.equal(loaded.unpacked("I", "lm_head").cpu(), masks["I"]["lm_head"])


def test_from_state_dict_file(tmp_path):
    masks = random_masks()
    # flat safetensors {module: bool}, one persona named by argument or file stem
    flat = tmp_path / "introvert.safetensors"
    save_file({f"{k}.weight": v for k, v in masks.items()}, str(flat))
    bank = MaskBank.from_state_dict_file(flat)
    assert bank.personas == ["introvert"] and set(bank.module_names) == set(SHAPES)
    assert all(torch.equal(bank.unpacked("introvert", m), masks[m]) for m in SHAPES)
    assert MaskBank.from_state_dict_file(flat, persona="I").personas == ["I"]
    # "persona/module" keys, uint8 0/1 values
    keyed = tmp_path / "pairs.safetensors"
    save_file({f"{p}/{k}": v.to(torch.uint8) for p in ("I", "E") for k, v in masks.items()}, str(keyed))
    assert sorted(MaskBank.from_state_dict_file(keyed).personas) == ["E", "I"]
    # nested torch file, read with weights_only=True
    nested = tmp_path / "masks.pt"
    torch.save({"I": masks, "E": {k: ~v for k, v in masks.items()}}, nested)
    bank = MaskBank.from_state_dict_file(nested)
    assert torch.equal(bank.unpacked("E", "lm_head"), ~masks["lm_head"])
    # refuses non 0/1 values and pickled objects
    save_file({"m": torch.full((2, 3), 2.0)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="0/1"):
        MaskBank.from_state_dict_file(tmp_path / "bad.safetensors")
    torch.save({"m": masks["lm_head"], "obj": Exotic()}, tmp_path / "pickle.pt")
    with pytest.raises(MaskBankError, match="pickle.pt"):
        MaskBank.from_state_dict_file(tmp_path / "pickle.pt")


class Exotic:
    pass


# -- values read from a file are validated like the setters; file-system behaviour ------------------------
@pytest.mark.parametrize("bad", [5.0, -0.1, float("nan"), "0.3", True])
def test_default_gamma_from_a_file_is_validated(tmp_path, bad):
    bank = MaskBank.from_bool_masks({"a": {"m": torch.rand(4, 40) < 0.5}})
    header = bank._header()
    header["metadata"]["default_gamma"] = bad
    path = tmp_path / "crafted.safetensors"
    _rewrite(path, {"a/m": bank.get("a", "m").clone()}, header)
    with pytest.raises(MaskBankError, match="crafted.safetensors.*default_gamma"):
        MaskBank.load(path)
    with pytest.raises((ValueError, TypeError), match="default_gamma"):
        MaskBank({"default_gamma": bad})


@pytest.mark.parametrize("field, value, match", [
    ("personas", ["a", "a/b"], "persona name"),
    ("personas", "a", "personas: expected list"),
    ("modules", [["m", -4, 40]], "negative shape"),
    ("modules", [["m", 4.5, 40]], "expected int"),
    ("persona_modules", {"zzz": ["m"]}, "unknown persona"),
    ("weight_sample", {"modules": ["m"], "values": [float("inf")]}, "finite"),
])
def test_header_fields_are_validated(tmp_path, field, value, match):
    bank = MaskBank.from_bool_masks({"a": {"m": torch.rand(4, 40) < 0.5}})
    header = {**bank._header(), field: value}
    path = tmp_path / "crafted.safetensors"
    _rewrite(path, {"a/m": bank.get("a", "m").clone()}, header)
    with pytest.raises(MaskBankError, match=f"crafted.safetensors.*{match}"):
        MaskBank.load(path)


def test_add_replaces_an_existing_persona_whole():
    bank = MaskBank()
    m1, m2 = torch.rand(4, 40) < 0.5, torch.rand(3, 8) < 0.5
    bank.add("p", {"one": m1, "two": m2})
    bank.add("p", {"one": ~m1})  # replaced, not merged: "two" is gone
    assert bank.module_names == ["one"] and torch.equal(bank.unpacked("p", "one"), ~m1)


def test_load_a_folder_and_save_errors_name_the_target(tmp_path):
    with pytest.raises(MaskBankError, match="is a folder"):
        MaskBank.load(tmp_path)
    bank, _ = make_bank()
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "bank.safetensors"  # its parent is a file
    with pytest.raises(OSError, match=str(target).replace(".", r"\.")):
        bank.save(target)


def test_saved_bank_has_the_umask_permissions(tmp_path):
    bank, _ = make_bank()
    old = os.umask(0o022)
    try:
        path = bank.save(tmp_path / "bank.safetensors")
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o644


def test_weight_sample_round_trip_and_other_checkpoint(tmp_path):
    torch.manual_seed(5)
    model = nn.ModuleDict({f"l{i}": nn.Linear(40, 24) for i in range(20)})
    bank = MaskBank.from_bool_masks({"a": {f"l{i}": torch.rand(24, 40) < 0.5 for i in range(20)}})
    bank.record_weights(model)
    assert len(bank.weight_sample["modules"]) == 16 and len(bank.weight_sample["values"]) == 16 * 24
    loaded = MaskBank.load(bank.save(tmp_path / "bank.safetensors"))
    assert loaded.weight_sample == bank.weight_sample
    assert loaded.check_weights(model) is None
    for dtype in (torch.float16, torch.bfloat16):  # the same checkpoint in another dtype passes
        assert loaded.check_weights({n: m.weight.to(dtype) for n, m in model.items()}) is None
    other = nn.ModuleDict({f"l{i}": nn.Linear(40, 24) for i in range(20)})  # same architecture, other weights
    assert "sampled weight values differ" in loaded.check_weights(other)
