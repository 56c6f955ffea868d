"""Command line: ``persona-kernels {demo, calibrate, analyze, generate, chat, export, eval, bench}``.

Every error is one line on stderr (``persona-kernels <cmd>: error: ...``) with exit code 2; ``--debug`` adds
the traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import sys
import traceback
from pathlib import Path

from persona_kernels.operating_point import DEFAULT as OPERATING_POINT
from persona_kernels.utils.cli_args import ArgumentParser, HelpFormatter
from persona_kernels.utils.devices import model_device

EXAMPLES = """examples (one per subcommand):
  persona-kernels demo --quick                           # the main job with fewer texts (24 per persona)
  persona-kernels calibrate --out personas/              # default persona pairs -> adapter folder (save_pretrained)
  persona-kernels calibrate --personas my_personas/ --pairs formal:casual --sparsity 0.1 \\
      --model /path/to/hf-model --out formal.safetensors # your own persona texts -> one bank file
  persona-kernels analyze personas/ --out analysis/      # how the personas' masks differ (tables + figures)
  persona-kernels generate --bank personas/ --persona introvert --prompt "Plans for tonight?"
  persona-kernels chat --bank personas/                  # /persona NAME, /gamma X, /base, /reset, /quit
  persona-kernels export --bank personas/ --persona introvert --out introvert-model/   # plain HF checkpoint
  persona-kernels eval --quick                           # evaluation harness (see: persona-kernels eval --help)
  persona-kernels bench --quick                          # benchmark suite (see: persona-kernels bench --help)

add --debug to any command to see the full traceback of an error.
"""

QUICK = {"calibration_texts": 24, "heldout_pairs": 8, "ab_questions": 6, "neutral_texts": 6}


class CLIError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local HF model folder, .gguf file or hub name 'org/model' (default: the bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; on a machine shared with other jobs 1 can be "
                        "much faster)")


def _device(args) -> str:
    """``--device`` checked against this machine; None -> cuda when available, else cpu."""
    import torch

    text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return text


def _load(args):
    import torch

    from persona_kernels.models import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    args.device = _device(args)
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

    device = _device(args)
    cfg = DemoConfig(
        model=args.model, out_dir=args.out, method=args.method, sparsity=args.sparsity, gamma=args.gamma,
        seed=args.seed, dtype=args.dtype, control=not args.no_control, batch_size=args.batch_size,
        method_kwargs=_method_kwargs(args), device=device, **(QUICK if args.quick else {}),
    )
    report = run_demo(cfg)
    out = Path(cfg.out_dir)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"report: {out / 'report.md'} (readable), {out / 'report.json'} (all numbers); bank: {report['bank']['path']}")
    return 0


def _save_bank(bank, out: str) -> str:
    """``*.safetensors``: one bank file; anything else: an adapter folder (``MaskBank.save_pretrained``)."""
    if out.endswith(".safetensors"):
        return str(bank.save(out))
    return str(bank.save_pretrained(out))


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
            raise CLIError(f"--pairs: unknown persona(s) {_short(missing)}; available: {_short(sorted(texts))}")
        if contrastive:
            texts = {p: texts[p] for pair in pairs for p in pair}
    out = Path(args.out)
    if out.suffix == ".safetensors" and out.is_dir():
        raise CLIError(f"--out {args.out}: is a folder; give a file name, or a folder name without .safetensors")
    if out.suffix != ".safetensors" and out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out}: a file of that name exists; an adapter folder goes there")
    rank, started = _init_distributed(args)
    try:
        model, tok = _load(args)
        bank = calibrate(
            model, tok, texts, method=args.method, sparsity=args.sparsity, pairs=pairs, batch_size=args.batch_size,
            max_length=args.max_length, tokens=args.tokens, method_kwargs=_method_kwargs(args), default_gamma=args.gamma,
            distributed="auto", progress=rank == 0,
        )
        if rank == 0:  # every rank holds the same bank; one writes it
            _record_base_model(bank, model, args.model)
            print(f"wrote {_save_bank(bank, args.out)}: {bank}")
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _record_base_model(bank, model, name) -> None:
    """Note the base model (name or folder, revision) in the bank metadata for its adapter config."""
    from persona_kernels.models import DEFAULT_MODEL

    config = getattr(model, "config", None)
    bank.metadata.setdefault("base_model", str(name) if name else DEFAULT_MODEL)
    revision = getattr(config, "_commit_hash", None)
    if revision:
        bank.metadata.setdefault("base_model_revision", str(revision))


def _short(value, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


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


def _load_bank(path: str):
    from persona_kernels.bank import MaskBank

    return MaskBank.from_pretrained(path)


def _safe_stem(a: str, b: str) -> str:
    """A file name for the ``a`` vs ``b`` comparison: no path separators, at most ~120 characters."""
    stem = re.sub(r"[^\w.+-]+", "_", f"{a}_vs_{b}")
    if len(stem) > 120:
        stem = stem[:100] + "_" + hashlib.sha256(f"{a}\0{b}".encode("utf-8")).hexdigest()[:12]
    return stem


def cmd_analyze(args) -> int:
    from persona_kernels.analysis import compare

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out}: is a file; expected a folder for the tables and figures")
    if bool(args.a) != bool(args.b):
        raise CLIError("--a and --b go together (two personas to compare)")
    bank = _load_bank(args.bank)
    if args.a and args.b:
        for name in (args.a, args.b):
            if name not in bank.personas:
                raise CLIError(f"unknown persona {_short(name)}; the bank has {_short(bank.personas)}")
        pairs = [(args.a, args.b)]
    else:
        if len(bank.personas) < 2:
            raise CLIError(f"{args.bank} holds {len(bank.personas)} persona(s) {_short(bank.personas)}; "
                           "analyze compares two personas")
        pairs = [tuple(p) for p in bank.metadata.get("pairs", [])]
        if not pairs:
            names = bank.personas
            pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    out.mkdir(parents=True, exist_ok=True)
    for a, b in pairs:
        cmp = compare(bank, a, b)
        stem = out / _safe_stem(a, b)
        cmp.plot(str(stem))
        from persona_kernels.utils.atomic import atomic_write

        atomic_write(f"{stem}.json", cmp.to_json())
        print(f"## {a} vs {b}\n")
        print(cmp.to_markdown())
    print(f"wrote {len(pairs)} comparison(s) to {out}/ (one .json and figures per pair)")
    return 0


def _patched(args):
    from persona_kernels import patching

    bank = _load_bank(args.bank)
    if args.persona is not None and args.persona not in bank.personas:  # before the (slow) model load
        raise CLIError(f"--persona: unknown persona {_short(args.persona)}; the bank has {_short(bank.personas)}")
    model, tok = _load(args)
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
    device = model_device(model)
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
    try:
        patching.set_persona(model, current, gamma=gamma)
    except (KeyError, ValueError) as e:
        raise CLIError(str(e)) from e
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
            name = line.split(maxsplit=1)[1].strip() if " " in line else None
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
                value = _unit_float(line.split()[1])
                patching.set_persona(model, current, gamma=value)
            except (IndexError, ValueError, TypeError, argparse.ArgumentTypeError) as e:
                print(f"error: /gamma needs a number in [0, 1] ({e or 'none given'}); gamma stays {gamma}")
            else:
                gamma = value  # only an accepted value is kept
            continue
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = _chat_generate(model, tok, history, args.max_new_tokens, args.sample)
        history.append({"role": "assistant", "content": reply})
        print(f"[{current or 'base'}] model> {reply}")
    return 0


def cmd_export(args) -> int:
    from persona_kernels.export import export_persona

    bank = _load_bank(args.bank)
    if args.persona not in bank.personas:
        raise CLIError(f"--persona: unknown persona {_short(args.persona)}; the bank has {_short(bank.personas)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out}: is a file; expected a folder for the checkpoint")
    model, tok = _load(args)
    path = export_persona(model, bank, args.persona, args.out, gamma=args.gamma, tokenizer=tok, bank_source=args.bank)
    print(f"wrote {path}: a plain Hugging Face checkpoint of persona {args.persona!r} "
          "(load it with AutoModelForCausalLM.from_pretrained, or serve it with vLLM / TGI / llama.cpp)")
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise CLIError(f"{module} is not available in this installation ({e})") from e
    return int(mod.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    debug = ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    parser = ArgumentParser(
        prog="persona-kernels", description="Persona subnetworks: calibrate, switch and evaluate persona masks.",
        epilog=EXAMPLES, formatter_class=HelpFormatter, parents=[debug],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter, parents=[debug])
        p.set_defaults(func=fn)
        return p

    def method_args(p):
        op = OPERATING_POINT
        from persona_kernels import methods

        p.add_argument("--method", default=op.method, type=methods.cli_type,
                       help=f"{methods.HELP} (default: {op.method}, the operating point of docs/results/smollm2; "
                            "--tau/--phi/--statistic/--activation apply to a bare base name)")
        p.add_argument("--sparsity", type=float, default=op.sparsity,
                       help="rho: fraction of each weight row a persona prunes, in [0, 1) (contrastive_sparse: "
                            "at most 0.5)")
        p.add_argument("--gamma", type=_unit_float, default=op.gamma,
                       help="soft gate: pruned weights are multiplied by gamma, in [0, 1] (0 = hard mask)")
        p.add_argument("--tau", type=float, default=op.method_kwargs.get("tau", 1.0),
                       help="contrastive_wanda: temperature of the contrast weighting phi(z / tau)")
        p.add_argument("--phi", default=op.method_kwargs.get("phi", "softplus"), choices=["softplus", "relu"],
                       help="contrastive_wanda: weighting function of the standardised mean difference z")
        p.add_argument("--statistic", default=op.method_kwargs.get("statistic", "token"),
                       choices=["token", "sequence"],
                       help="contrastive_wanda: z from per-token or per-sequence activation means")
        p.add_argument("--activation", default=None, choices=["abs_mean", "l2"],
                       help="wanda / contrastive_sparse: activation norm A_j in the score |W_ij| * A_j "
                            "(default: the method's own, abs_mean)")
        p.add_argument("--batch-size", type=_positive_int, default=16, help="texts per calibration forward")

    from persona_kernels.demo import DemoConfig

    full = DemoConfig()
    p = add("demo", "the main job: calibrate the default pairs, measure the switch against a shuffled-label "
            "control, write a report", cmd_demo)
    _add_model_args(p)
    method_args(p)
    p.add_argument("--out", default="runs/demo", help="output folder (report.md, report.json, bank.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-out split and the control")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer texts: {QUICK['calibration_texts']} calibration texts per persona, "
                        f"{QUICK['heldout_pairs']} held-out pairs, {QUICK['ab_questions']} A/B questions and "
                        f"{QUICK['neutral_texts']} neutral texts (instead of {full.calibration_texts} / "
                        f"{full.heldout_pairs} / {full.ab_questions} / {full.neutral_texts})")
    p.add_argument("--no-control", action="store_true", help="skip the shuffled-label control")

    p = add("calibrate", "persona texts -> mask bank (adapter folder or one .safetensors file)", cmd_calibrate)
    _add_model_args(p)
    method_args(p)
    p.add_argument("--personas", default=None,
                   help="folder of NAME.jsonl / NAME.txt persona files (default: the bundled personas)")
    p.add_argument("--pairs", nargs="*", default=None,
                   help="POSITIVE:NEGATIVE persona pairs for the contrastive methods (default: the bundled pairs "
                        "power_seeking:power_averse extravert:introvert; required with --personas)")
    p.add_argument("--tokens", default="auto", choices=["auto", "all", "response"],
                   help="tokens that enter the statistics: response tokens only, all, or auto (response tokens "
                        "for prompt/response items, all for statements)")
    p.add_argument("--max-length", type=_positive_int, default=256,
                   help="tokens kept per text (longer texts lose their beginning)")
    p.add_argument("--out", required=True,
                   help="adapter folder (persona_config.json + masks), or a FILE.safetensors for one bank file")

    p = add("analyze", "mask analysis of a bank: how two personas' masks differ (tables + figures)", cmd_analyze)
    p.add_argument("bank", help="bank file or adapter folder")
    p.add_argument("--a", default=None, help="first persona (default: every pair of the bank)")
    p.add_argument("--b", default=None, help="second persona (default: every pair of the bank)")
    p.add_argument("--out", default="runs/analysis", help="output folder")

    for name, fn, text in (("generate", cmd_generate, "generate text with a persona"),
                           ("chat", cmd_chat, "interactive chat; switch persona between turns")):
        p = add(name, text, fn)
        _add_model_args(p)
        p.add_argument("--bank", required=True, help="bank file or adapter folder")
        p.add_argument("--persona", default=None, help="persona name (default: the base model)")
        p.add_argument("--gamma", type=_unit_float, default=None,
                       help="soft gate in [0, 1] (default: the bank's default_gamma)")
        p.add_argument("--max-new-tokens", type=_positive_int, default=80, help="tokens generated per reply")
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--system", default=None, help="system prompt (default: none)")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the user message")

    p = add("export", "write one persona as a plain Hugging Face checkpoint (gates baked into the weights) for "
            "vLLM, TGI, llama.cpp or transformers", cmd_export)
    _add_model_args(p)
    p.add_argument("--bank", required=True, help="bank file or adapter folder")
    p.add_argument("--persona", required=True, help="persona to bake in")
    p.add_argument("--gamma", type=_unit_float, default=None,
                   help="soft gate in [0, 1] (default: the bank's default_gamma)")
    p.add_argument("--out", required=True, help="output folder of the checkpoint")

    p = sub.add_parser("eval", help="evaluation harness (options: persona-kernels eval --help)", add_help=False)
    p.set_defaults(func=lambda a: _delegate("persona_kernels.evaluation.runner", a.rest))
    p = sub.add_parser("bench", help="benchmark suite (options: persona-kernels bench --help)", add_help=False)
    p.set_defaults(func=lambda a: _delegate("persona_kernels.bench", a.rest))
    return parser


_USER_ERRORS = (CLIError, OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, ImportError)


def _one_line(exc: BaseException, limit: int = 600) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    if not isinstance(exc, _USER_ERRORS):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        parser = build_parser()
        if command in ("eval", "bench"):
            rest = argv[argv.index(command) + 1:]
            args = argparse.Namespace(command=command, rest=[a for a in rest if a != "--debug"])
            args.func = parser._subparsers._group_actions[0].choices[command].get_default("func")  # type: ignore[union-attr]
        else:
            args = parser.parse_args(argv)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"persona-kernels {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error: one line, exit code 2
        if debug:
            traceback.print_exc()
        hint = "" if debug or isinstance(e, _USER_ERRORS) else " (run with --debug for the traceback)"
        print(f"persona-kernels {command}: error: {_one_line(e)}{hint}".replace("persona-kernels :", "persona-kernels:"),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
