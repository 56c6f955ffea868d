"""Command line: ``persona-kernels {demo, calibrate, analyze, generate, chat, eval, bench}``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from persona_kernels.operating_point import DEFAULT as OPERATING_POINT

EXAMPLES = """examples:
  persona-kernels demo                                   # the main job on SmolLM2-135M-Instruct
  persona-kernels demo --quick                           # fewer texts, same pipeline
  persona-kernels calibrate --out bank.safetensors       # default persona pairs -> mask bank
  persona-kernels calibrate --personas my_personas/ --pairs formal:casual --method contrastive_wanda \\
      --sparsity 0.1 --out formal.safetensors --model /path/to/hf-model
  persona-kernels analyze bank.safetensors --out analysis/
  persona-kernels generate --bank bank.safetensors --persona introvert --prompt "Plans for tonight?"
  persona-kernels chat --bank bank.safetensors           # /persona NAME, /gamma X, /base, /quit
  persona-kernels eval --help
  persona-kernels bench --quick
"""


class CLIError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder or name (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a machine shared with other jobs 1 can be much faster)")


def _load(args):
    import torch

    from persona_kernels.models import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    model.eval()
    return model, tok


def _parse_pairs(values: list[str] | None) -> list[tuple[str, str]] | None:
    if not values:
        return None
    pairs = []
    for v in values:
        parts = v.split(":")
        if len(parts) != 2 or not all(parts):
            raise CLIError(f"--pairs: expected POSITIVE:NEGATIVE, got {v!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _method_kwargs(args) -> dict:
    kw = {}
    if args.method == "contrastive_wanda":
        kw = {"phi": args.phi, "tau": args.tau, "statistic": args.statistic}
    elif args.method in ("wanda", "contrastive_sparse") and args.activation:
        kw = {"activation": args.activation}
    return kw


def cmd_demo(args) -> int:
    from persona_kernels.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model=args.model, out_dir=args.out, method=args.method, sparsity=args.sparsity, gamma=args.gamma,
        seed=args.seed, dtype=args.dtype, control=not args.no_control, batch_size=args.batch_size,
        method_kwargs=_method_kwargs(args),
        **({"calibration_texts": 24, "heldout_pairs": 8, "ab_questions": 6, "neutral_texts": 6} if args.quick else {}),
    )
    report = run_demo(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text(encoding="utf-8"))
    print(f"report: {Path(cfg.out_dir) / 'report.md'} (data: {Path(cfg.out_dir) / 'report.json'})  bank: {report['bank']['path']}")
    return 0


def cmd_calibrate(args) -> int:
    from persona_kernels import personas
    from persona_kernels.pipeline import calibrate

    if not 0 <= args.sparsity < 1:
        raise CLIError(f"--sparsity: expected a value in [0, 1), got {args.sparsity}")
    texts = personas.load_personas(args.personas) if args.personas else personas.default_personas()
    pairs = _parse_pairs(args.pairs) or (personas.default_pairs() if not args.personas else None)
    from persona_kernels.methods import parse_method

    contrastive = parse_method(args.method).contrastive
    if contrastive and not pairs:
        raise CLIError("--pairs POS:NEG is required for contrastive methods with --personas")
    if pairs:
        missing = sorted({p for pair in pairs for p in pair} - set(texts))
        if missing:
            raise CLIError(f"--pairs: unknown persona(s) {missing}; available: {sorted(texts)}")
        if contrastive:
            texts = {p: texts[p] for pair in pairs for p in pair}
    rank, started = _init_distributed(args)
    try:
        model, tok = _load(args)
        bank = calibrate(
            model, tok, texts, method=args.method, sparsity=args.sparsity, pairs=pairs, batch_size=args.batch_size,
            max_length=args.max_length, tokens=args.tokens, method_kwargs=_method_kwargs(args), default_gamma=args.gamma,
            distributed="auto", progress=rank == 0,
        )
        if rank == 0:  # every rank holds the same bank; one writes it
            bank.save(args.out)
            print(f"wrote {args.out}: {bank}")
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _init_distributed(args) -> tuple[int, bool]:
    """Under ``torchrun`` (WORLD_SIZE > 1 and RANK set): join the process group (nccl when --device is CUDA and
    CUDA is available, else gloo) and move ``--device cuda`` to this rank's GPU (LOCAL_RANK). Returns
    ``(rank, whether this call started the group)``."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return 0, False
    if dist.is_initialized():
        return dist.get_rank(), False
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        if str(args.device) == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(args.device))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), True


def cmd_analyze(args) -> int:
    from persona_kernels.analysis import compare
    from persona_kernels.bank import MaskBank

    bank = MaskBank.load(args.bank)
    if args.a and args.b:
        pairs = [(args.a, args.b)]
    else:
        pairs = [tuple(p) for p in bank.metadata.get("pairs", [])]
        if not pairs:
            names = bank.personas
            pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for a, b in pairs:
        cmp = compare(bank, a, b)
        stem = out / f"{a}_vs_{b}".replace(":", "_").replace("/", "_")
        cmp.plot(str(stem))
        Path(f"{stem}.json").write_text(cmp.to_json(), encoding="utf-8")
        print(f"## {a} vs {b}\n")
        print(cmp.to_markdown())
    return 0


def _patched(args):
    from persona_kernels import patching
    from persona_kernels.bank import MaskBank

    model, tok = _load(args)
    bank = MaskBank.load(args.bank)
    try:
        patching.patch_model(model, bank)
    except RuntimeError as e:  # bank made for another model, nothing to patch
        raise CLIError(f"--bank {args.bank}: {e}") from e
    return model, tok, bank


def _chat_generate(model, tok, history: list[dict], max_new_tokens: int, sample: bool) -> str:
    import torch

    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in history) + "\n"
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        out = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                             do_sample=sample, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def cmd_generate(args) -> int:
    from persona_kernels import patching

    model, tok, bank = _patched(args)
    history = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    try:
        patching.set_persona(model, args.persona, gamma=args.gamma)
    except (KeyError, ValueError) as e:
        raise CLIError(str(e)) from e
    print(_chat_generate(model, tok, history, args.max_new_tokens, args.sample))
    return 0


def cmd_chat(args) -> int:
    from persona_kernels import patching

    model, tok, bank = _patched(args)
    current, gamma = args.persona, args.gamma
    patching.set_persona(model, current, gamma=gamma)
    history: list[dict] = []
    print(f"personas: {', '.join(bank.personas)}; commands: /persona NAME, /base, /gamma X, /reset, /quit")
    while True:
        try:
            line = input(f"[{current or 'base'}] you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/persona"):
            name = line.split(maxsplit=1)[1] if " " in line else None
            try:
                patching.set_persona(model, name, gamma=gamma)
                current = name
            except (KeyError, ValueError) as e:
                print(f"error: {e}")
            continue
        if line == "/base":
            patching.set_persona(model, None)
            current = None
            continue
        if line.startswith("/gamma"):
            try:
                gamma = float(line.split()[1])
                patching.set_persona(model, current, gamma=gamma)
            except (IndexError, ValueError) as e:
                print(f"error: /gamma needs a number in [0, 1] ({e})")
            continue
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = _chat_generate(model, tok, history, args.max_new_tokens, args.sample)
        history.append({"role": "assistant", "content": reply})
        print(f"[{current or 'base'}] model> {reply}")
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise CLIError(f"{module} is not available in this installation ({e})") from e
    return int(mod.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-kernels", description="Persona subnetworks: calibrate, switch and evaluate persona masks.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def method_args(p):
        op = OPERATING_POINT
        from persona_kernels import methods

        p.add_argument("--method", default=op.method, type=methods.cli_type,
                       help=f"{methods.HELP} (default {op.method}, the operating point of docs/results/smollm2; "
                            "--tau/--phi/--statistic/--activation apply to a bare base name)")
        p.add_argument("--sparsity", type=float, default=op.sparsity,
                       help=f"fraction of each row pruned per persona (default {op.sparsity})")
        p.add_argument("--gamma", type=float, default=op.gamma, help=f"soft gate for pruned weights, in [0, 1] (default {op.gamma})")
        p.add_argument("--tau", type=float, default=op.method_kwargs.get("tau", 1.0),
                       help=f"contrastive_wanda: softplus temperature (default {op.method_kwargs.get('tau', 1.0)})")
        p.add_argument("--phi", default="softplus", choices=["softplus", "relu"])
        p.add_argument("--statistic", default="token", choices=["token", "sequence"])
        p.add_argument("--activation", default=None, choices=["abs_mean", "l2"])
        p.add_argument("--batch-size", type=int, default=16)

    p = sub.add_parser("demo", help="the main job: calibrate default pairs, measure the switch, write a report")
    _add_model_args(p)
    method_args(p)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer calibration/evaluation texts")
    p.add_argument("--no-control", action="store_true", help="skip the shuffled-label control")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="persona texts -> mask bank file")
    _add_model_args(p)
    method_args(p)
    p.add_argument("--personas", default=None, help="folder of NAME.jsonl/NAME.txt files (default: bundled personas)")
    p.add_argument("--pairs", nargs="*", help="POSITIVE:NEGATIVE persona pairs for contrastive methods")
    p.add_argument("--tokens", default="auto", choices=["auto", "all", "response"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", required=True, help="output .safetensors bank")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("analyze", help="mask analysis of a bank (tables + figures)")
    p.add_argument("bank")
    p.add_argument("--a", default=None)
    p.add_argument("--b", default=None)
    p.add_argument("--out", default="runs/analysis")
    p.set_defaults(func=cmd_analyze)

    for name, fn, text in (("generate", cmd_generate, "generate text with a persona"), ("chat", cmd_chat, "interactive chat, switch persona between turns")):
        p = sub.add_parser(name, help=text)
        _add_model_args(p)
        p.add_argument("--bank", required=True)
        p.add_argument("--persona", default=None, help="persona name (default: base model)")
        p.add_argument("--gamma", type=float, default=None)
        p.add_argument("--max-new-tokens", type=int, default=80)
        p.add_argument("--sample", action="store_true")
        p.add_argument("--system", default=None, help="system prompt")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.set_defaults(func=fn)

    p = sub.add_parser("eval", help="evaluation harness (see `persona-kernels eval --help`)", add_help=False)
    p.set_defaults(func=lambda a: _delegate("persona_kernels.evaluation.runner", a.rest))
    p = sub.add_parser("bench", help="benchmark suite (see `persona-kernels bench --help`)", add_help=False)
    p.set_defaults(func=lambda a: _delegate("persona_kernels.bench", a.rest))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("eval", "bench"):
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
        args.func = parser._subparsers._group_actions[0].choices[argv[0]].get_default("func")  # type: ignore[union-attr]
    else:
        args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"persona-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError, UnicodeDecodeError) as e:
        print(f"persona-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
