"""``vlmforge check`` and ``vlmforge generate``: the device-side commands (no torch, no transformers).

``register(subparsers)`` adds both to an argparse parser (vlmforge's CLI plugs it in);
``python -m stages.lib.runtime.cli check|generate ...`` runs them standalone. Exit codes: 0 ok;
1 a gate missed, a digest differs, the package is damaged; 2 bad usage or an incompatible device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stages.lib.runtime.compat import BACKENDS
from stages.lib.runtime.errors import RuntimeFailure, UsageError


def _check(args: argparse.Namespace) -> int:
    from stages.lib.runtime.check import check_package

    res = check_package(args.package, args.backend)
    if args.json:
        print(json.dumps(res.as_dict(), indent=1, default=float))
        return res.exit_code
    if res.description:
        print(f"package  {res.description}")
    if res.files is not None:
        print(f"files    {res.files.checked} verified ({res.files.bytes / 1e6:.1f} MB)"
              + (f", {len(res.files.problems)} problem(s)" if res.files.problems else ""))
        for p in res.files.problems:
            print(f"  - {p}")
    if res.compat is not None and res.compat.ok:
        print(f"backend  {res.backend or res.compat.backend}")
        if res.compat.note:
            print(f"         {res.compat.note}")
    for g in res.graphs:
        figs = ", ".join(f"{k} {v:.6g}" for k, v in g.figures.items() if isinstance(v, float))
        print(f"{g.graph:<10} {g.status:<7} {g.precision}: {g.error or figs}")
        for c in g.gates:
            if not c["passed"]:
                print(f"  - {c['name']} = {c['value']:.6g}, needs {c['op']} {c['threshold']:g}")
    stream = sys.stdout if res.exit_code == 0 else sys.stderr
    print(("PASS " if res.exit_code == 0 else "FAIL ") + res.message, file=stream)
    return res.exit_code


def _generate(args: argparse.Namespace) -> int:
    from stages.lib.runtime.backends import open_backend
    from stages.lib.runtime.check import choose
    from stages.lib.runtime.generate import Sampling, run_package
    from stages.lib.runtime.package import opened, verify_files

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    images = [Path(i) for i in args.image]
    for i in images:
        if not i.is_file():
            raise UsageError(f"--image {i}: no such file")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with opened(args.package) as pkg:
        files = verify_files(pkg, digests=not args.no_verify)
        if not files.ok:
            raise RuntimeFailure(f"{pkg.name}: {files.problems[0]} (run `vlmforge check` for the full list)")
        compat = choose(pkg, args.backend).require()
        backend = open_backend(pkg, compat)
        try:
            if compat.note and args.backend is None and not args.json:  # why the default is not the engines
                print(f"[{backend.describe()}: {compat.note}]", file=sys.stderr)
            gen = run_package(pkg, backend, images, args.prompt, system=args.system,
                              max_new_tokens=args.max_new_tokens,
                              sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
                              stop_at_eos=not args.ignore_eos, write=None if args.json else write)
        finally:
            backend.close()
    for note in gen.extra.get("notes", []):
        print(f"[{note}]", file=sys.stderr)
    st = gen.stats
    if args.json:
        print(json.dumps({"tokens": gen.tokens, "text": gen.text, "backend": compat.backend, **st.as_dict()}))
    else:
        print()
        print(f"[{st.new_tokens} tokens, stopped on {st.stopped}; time to first token {st.ttft_s * 1e3:.1f} ms "
              f"({st.prompt_tokens} prompt tokens); {st.tokens_per_s:.1f} tokens/s; {compat.backend}]",
              file=sys.stderr)
    return 0


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except RuntimeFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    return run


def register(subparsers: Any) -> None:
    """Add ``check`` and ``generate`` to an argparse subparsers object (each sets ``func``)."""
    c = subparsers.add_parser("check", help="verify a device package: digests, device compatibility, probe gates")
    c.add_argument("package", help="package.tar or its extracted <name>-<target>/ folder")
    c.add_argument("--backend", choices=BACKENDS, help="default: the best this device has")
    c.add_argument("--json", action="store_true", help="machine-readable result")
    c.set_defaults(func=_guard(_check))
    g = subparsers.add_parser("generate", help="run a device package on an image and a prompt (streams tokens)")
    g.add_argument("package", help="package.tar or its extracted <name>-<target>/ folder")
    g.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="a system message (default: the template's)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 (faster start)")
    g.add_argument("--backend", choices=BACKENDS, help="default: the best this device has")
    g.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, timings), no stream")
    g.set_defaults(func=_guard(_generate))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmforge", description="vlmforge device runtime")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
