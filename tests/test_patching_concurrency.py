"""Persona selection under torch.compile (no recompiles on a switch) and under concurrent threads."""

from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.nn as nn

from persona_kernels.bank import MaskBank
from persona_kernels.patching import (
    DEFAULT_TARGET_PATTERN,
    get_gamma,
    get_persona,
    merge_persona,
    patch_model,
    persona,
    persona_batch,
    set_persona,
    unmerge_persona,
)

transformers = pytest.importorskip("transformers")
PATTERN = re.compile(DEFAULT_TARGET_PATTERN)
PERSONAS = [f"p{i}" for i in range(12)]


@pytest.fixture(scope="module")
def stories(shared):
    path = shared / "models" / "stories260K"
    if not path.is_dir():
        pytest.skip("stories260K not in the shared folder")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    gen = torch.Generator().manual_seed(0)
    bank = MaskBank()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and PATTERN.search(n)}
    for p in PERSONAS:
        bank.add(p, {n: torch.rand(m.out_features, m.in_features, generator=gen) < 0.5 for n, m in targets.items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        unpatched = model(input_ids=ids).logits
    patch_model(model, bank, check_fingerprint=False)
    return model, ids, unpatched


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_switches_personas_without_recompiling(stories, backend):
    model, ids, unpatched = stories
    compiles = []

    def counting(gm, example_inputs):  # every Dynamo graph goes through here once per compilation
        compiles.append(gm)
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    schedule = [(None, None)] + [(p, g) for p in PERSONAS for g in (0.0, 0.4)] + [(None, None)]
    if backend == "inductor":
        schedule = schedule[:1] + schedule[1:25:11] + schedule[-1:]  # inductor compiles slowly on CPU: fewer steps
    outputs = set()
    try:
        for name, gamma in schedule:
            set_persona(model, name, gamma)
            eager, got = _logits(model, ids), _logits(compiled, ids)
            if backend == "aot_eager":
                assert torch.equal(got, eager), (name, gamma)
            else:
                torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            if name is None:
                assert torch.equal(eager, unpatched)  # the base model is the unpatched model, bit for bit
            outputs.add(round(float(got.double().sum()), 3))
        # thread-local blocks are seen by the compiled graph too, still without recompiling
        with persona(model, "p3", 0.4):
            torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
        if backend == "aot_eager":  # threads sharing the compiled model each get their own persona
            _threads_agree(model, compiled, ids)
    finally:
        set_persona(model, None)
    assert len(compiles) == 1, f"{len(compiles)} compilations for {len(schedule)} switches"
    assert len(outputs) >= len(schedule) - 2  # the personas really differ (base appears twice)


def _threads_agree(model, compiled, ids, threads=4, steps=25):
    # Dynamo guards the intra-op thread count, which a new thread does not inherit: give each the main thread's
    main_threads = torch.get_num_threads()
    choices = [None, "p2", "p7"]
    want = {}
    for name in choices:
        with persona(model, name, 0.4):
            want[name] = _logits(model, ids)
    bad, errors = [], []

    def worker(t):
        try:
            torch.set_num_threads(main_threads)
            for i in range(steps):
                name = choices[(t + i) % len(choices)]
                with persona(model, name, 0.4):
                    if not torch.equal(_logits(compiled, ids), want[name]):
                        bad.append((t, i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors[0]
    assert not bad, f"{len(bad)} compiled forwards computed another thread's persona"


def test_persona_linear_op_opcheck_and_gradients(stories):
    model, _, _ = stories
    module = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, module.in_features, requires_grad=True)
    args = lambda: (x, module.weight, module.bias, module.persona_masks, module.persona_slots,  # noqa: E731
                    module._state.key, "auto")
    from persona_kernels.ops.gated_linear import gated_linear

    for name, gamma in ((None, None), ("p4", 0.3)):
        with persona(model, name, gamma):
            torch.library.opcheck(torch.ops.persona_kernels.persona_linear, args())
            y = torch.ops.persona_kernels.persona_linear(*args())[0]
            gx, gw = torch.autograd.grad(y.square().sum(), (x, module.weight))
            mask = module.mask(name) if name else torch.full_like(module.mask("p4"), -1)
            want = gated_linear(x, module.weight, mask, module.bias, 0.0 if name is None else gamma, backend="torch")
            if name is None:
                want = torch.nn.functional.linear(x, module.weight, module.bias)
            wx, ww = torch.autograd.grad(want.square().sum(), (x, module.weight))
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gx, wx, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(gw, ww, atol=1e-4, rtol=1e-4)


def test_threads_each_compute_their_own_persona(stories):
    model, ids, _ = stories
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons: the same intra-op split in every thread
    set_persona(model, "p0", 0.2)  # the model-wide default, seen by threads without a block
    choices = [None, "p1", "p5", "p11"]
    want = {}
    for name in choices:
        with persona(model, name, 0.0):
            want[name] = _logits(model, ids)
    want["default"] = _logits(model, ids)
    assert len({float(w.sum()) for w in want.values()}) == len(want)
    wrong, errors = [], []
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(200):
                name = choices[(t + i) % len(choices)]
                if i % 10 == 9:  # no block: the model-wide default
                    ok = torch.equal(_logits(model, ids), want["default"])
                else:
                    with persona(model, name, 0.0):
                        assert (get_persona(model), get_gamma(model)) == (name, 0.0)
                        got = _logits(model, ids)
                    ok = torch.equal(got, want[name])
                if not ok:
                    wrong.append((t, i, name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        torch.set_num_threads(torch_threads)
    assert not errors, errors[0]
    assert not wrong, f"{len(wrong)} of 800 forwards computed another persona, e.g. {wrong[:3]}"
    assert (get_persona(model), get_gamma(model)) == ("p0", 0.2)  # the default is untouched
    set_persona(model, None)


def test_persona_batch_in_two_threads(stories):
    model, ids, _ = stories
    rows = {0: ["p1", None], 1: [None, "p2"]}
    want = {}
    for t, r in rows.items():
        with persona_batch(model, r):
            want[t] = _logits(model, ids)
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(t):
        try:
            barrier.wait()
            for _ in range(20):
                with persona_batch(model, rows[t]):
                    got = _logits(model, ids)
                results.setdefault(t, []).append(torch.equal(got, want[t]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in rows]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert all(all(v) for v in results.values()) and len(results) == 2
    with persona_batch(model, ["p1", None]):
        with pytest.raises(RuntimeError, match="this thread is already inside a persona_batch block"):
            with persona_batch(model, ["p1", None]):
                pass


def test_set_persona_inside_a_block_changes_only_the_block(stories):
    model, ids, _ = stories
    set_persona(model, "p1")
    with persona(model, "p2"):
        set_persona(model, "p3", 0.5)
        assert (get_persona(model), get_gamma(model)) == ("p3", 0.5)
        seen = []
        th = threading.Thread(target=lambda: seen.append(get_persona(model)))
        th.start()
        th.join()
        assert seen == ["p1"]  # another thread sees the default
    assert get_persona(model) == "p1"
    set_persona(model, None)


def _forward_in_a_block_after(model, ids, name, change) -> list[str]:
    """Open ``persona(model, name)`` in another thread, run ``change()`` here, then forward there: its errors."""
    entered, changed, errors = threading.Event(), threading.Event(), []

    def worker():
        with persona(model, name):
            entered.set()
            changed.wait()
            try:
                _logits(model, ids)
            except RuntimeError as exc:
                errors.append(str(exc))

    th = threading.Thread(target=worker)
    th.start()
    entered.wait()
    try:
        change()
    finally:
        changed.set()
        th.join()
    return errors


def test_block_in_another_thread_conflicting_with_a_merge_raises(stories):
    model, ids, _ = stories
    try:
        errors = _forward_in_a_block_after(model, ids, "p4", lambda: merge_persona(model, "p1"))
    finally:
        unmerge_persona(model)
        set_persona(model, None)
    assert errors and "is merged into the weights" in errors[0]  # never silently the merged persona


def test_compiled_backward_follows_the_persona_of_its_forward(stories):
    model, ids, _ = stories
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    weight = model.model.layers[1].mlp.down_proj.weight

    def grad_of(m):
        weight.grad = None
        m(input_ids=ids).logits.float().square().mean().backward()
        return weight.grad.clone()

    try:
        for name, gamma in (("p1", 0.0), ("p6", 0.4), (None, None)):
            set_persona(model, name, gamma)
            torch.testing.assert_close(grad_of(compiled), grad_of(model), atol=1e-6, rtol=1e-5)
    finally:
        set_persona(model, None)
        weight.grad = None


def test_removing_a_persona_another_thread_selects_is_an_error_there():
    from persona_kernels.patching import remove_persona

    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and PATTERN.search(n)}
    bank = MaskBank.from_bool_masks({p: {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in targets.items()}
                                     for p in ("a", "b")})
    patch_model(model, bank)
    ids = torch.randint(0, 40, (1, 5), generator=gen)
    errors = _forward_in_a_block_after(model, ids, "b", lambda: remove_persona(model, "b"))
    assert errors and "was removed" in errors[0]  # not silently the dense model
