"""The `fastbone` command: `fastbone verify`, `fastbone list` and `fastbone profile`."""
from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from importlib import metadata

import torch

from ._backend import BACKENDS


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def device_arg(value: str) -> str:
    """--device: cpu, cuda or cuda:N (cpu:N is the CPU too); anything else is a usage error (exit 2)."""
    if not _DEVICE.fullmatch(value.strip()):
        raise argparse.ArgumentTypeError(f"invalid device {value!r}; accepted: cpu, cuda, cuda:N (N a device index)")
    return value.strip()


def _versions() -> str:
    from . import __version__

    parts = [f"fastbone {__version__}", f"torch {torch.__version__}"]
    for dist in ("triton", "torchvision"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return parts[0] + " (" + ", ".join(parts[1:]) + ")"


def select_models(patterns: list[str], every: bool) -> tuple[list[str], list[str]]:
    """(models to verify, patterns that match none): names or fnmatch patterns, in the order given
    (each model once); none given: `--all` -> every model, else the default set (`verify=True`)."""
    from .registry import list_models, verify_defaults

    known = list_models()
    if every:
        return known, []
    if not patterns:
        return verify_defaults(), []
    chosen, unmatched = [], []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = fnmatch.filter(known, pattern)
        else:
            matches = [pattern] if pattern in known else []
        if not matches:
            unmatched.append(pattern)
        chosen += [m for m in matches if m not in chosen]
    return chosen, unmatched


def cmd_verify(args) -> int:
    from tqdm import tqdm

    from .registry import list_models
    from .verify import verify_model

    if args.all and args.models:
        print("fastbone verify: give model names / patterns or --all, not both", file=sys.stderr)
        return 2
    names, unmatched = select_models(args.models, args.all)
    if unmatched:
        print(f"fastbone verify: no model matches {', '.join(map(repr, unmatched))}; known: "
              f"{', '.join(list_models())}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("fastbone verify: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
            return 2
        if device.index is not None and device.index >= torch.cuda.device_count():
            print(f"fastbone verify: --device {args.device} asked for, but torch sees "
                  f"{torch.cuda.device_count()} CUDA device(s)", file=sys.stderr)
            return 2
    size = args.size or (64 if device.type == "cpu" else 224)
    print(f"fastbone verify: {len(names)} model(s), backend={args.backend}, device={args.device}, "
          f"dtype={args.dtype}, input {args.batch}x3x{size}x{size}; reference in float64 on the CPU")
    results = []
    for name in tqdm(names, desc="verify", unit="model", file=sys.stderr, disable=args.quiet):
        results.append(verify_model(name, backend=args.backend, device=args.device, size=size,
                                    batch=args.batch, dtype=args.dtype, seed=args.seed))
    rows = [[r.model, r.backend, r.dtype, f"{r.max_abs_err:.3g}", f"{r.rel_err:.3g}", f"{r.tolerance:.1e}",
             "pass" if r.passed else "FAIL", f"{r.seconds:.2f}s"] for r in results]
    print(_table(["model", "backend", "dtype", "max abs err", "rel err", "tolerance", "result", "time"], rows))
    for r in results:
        if r.error:
            print(f"{r.model}: {r.error}", file=sys.stderr)
    failed = [r.model for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_list(args) -> int:
    from .flops import count_macs, count_parameters
    from .registry import list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        with torch.device("meta"):
            model = info.builder()
        rows.append([name, f"{count_parameters(model) / 1e6:.2f}M",
                     f"{count_macs(model, info.default_input_size) / 1e9:.2f}G",
                     str(info.default_input_size), info.reference])
    print(_table(["model", "params", "MACs", "input", "reference"], rows))
    return 0


def cmd_profile(args) -> int:
    from .profile import profile_model
    from .registry import list_models

    if args.model not in list_models():
        print(f"fastbone profile: unknown model {args.model!r}; known: {', '.join(list_models())}", file=sys.stderr)
        return 2
    profile = profile_model(args.model, batch=args.batch, size=args.size, dtype=args.dtype, gpu=args.gpu)
    print(profile.report())
    if args.json:
        profile.write_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        profile.plot(args.plot)
        print(f"wrote {args.plot}")
    return 1 if profile.unknown_macs else 0


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbone", description=__doc__)
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print fastbone's version (and torch's, triton's, torchvision's) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check models against their references")
    v.add_argument("models", nargs="*", metavar="MODEL",
                   help="model names or fnmatch patterns such as 'resnet*' (default: a set covering every family "
                        "and kernel path; --all for every model)")
    v.add_argument("--all", action="store_true", help="verify every model")
    v.add_argument("--backend", choices=[b for b in BACKENDS if b != "auto"], default="triton")
    v.add_argument("--device", type=device_arg, default=_default_device(),
                   help="cpu, cuda or cuda:N (default: cuda if present)")
    v.add_argument("--size", type=int, default=None, help="input height and width (default 64 on CPU, 224 on CUDA)")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)
    ls = sub.add_parser("list", help="every model with its size, work and reference")
    ls.set_defaults(func=cmd_list)
    from .gpus import DEFAULT_GPU, GPUS
    pr = sub.add_parser("profile", help="launches, minimum HBM bytes and roofline time per layer, fastbone vs eager "
                                        "(no GPU needed)")
    pr.add_argument("model", metavar="MODEL", help="a registered model name (fastbone list)")
    pr.add_argument("--batch", type=_positive_int, default=64, help="batch size (default 64)")
    pr.add_argument("--size", type=_positive_int, default=None,
                    help="input height and width, at least 32 (default: the model's, 224)")
    pr.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    pr.add_argument("--gpu", choices=list(GPUS), default=DEFAULT_GPU,
                    help=f"the GPU whose peaks the roofline uses (default {DEFAULT_GPU}; table: fastbone/gpus.py)")
    pr.add_argument("--json", metavar="PATH", help="write the profile as JSON")
    pr.add_argument("--plot", metavar="PATH", help="write a PNG: roofline of every launch, per-layer bytes and time")
    pr.set_defaults(func=cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "profile" and args.size is not None and args.size < 32:
        build_parser().error("--size must be at least 32 (the backbones downsample by 32)")
    if args.command == "verify":
        if args.size is not None and args.size < 32:
            build_parser().error("--size must be at least 32 (the backbones downsample by 32)")
        if args.batch < 1:
            build_parser().error("--batch must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
