"""The `torch-dflash` command line. Exit codes: 0 done, 1 user error (one line), 2 internal error."""

import argparse
import sys
import traceback

from rich.console import Console

from torch_dflash.errors import DFlashError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-dflash", description=__doc__.split(".")[0])
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--quiet", action="store_true", help="print only results")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded random target + draft pair end to end")
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt-len", type=int, default=12)
    bench = commands.add_parser("bench", help="time kernels and steps on the GPU beside eager, inductor and the floor")
    bench.add_argument("--suite", choices=("kernels", "steps", "all"), default="all")
    bench.add_argument("--out", default="bench-out", help="directory for bench.json and bench.md")
    bench.add_argument("--reps", type=int, default=100, help="timed repetitions per variant (median reported)")
    bench.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, each variant once (CI)")
    bench.add_argument("--only", default="", help="comma-separated case modules, e.g. kernels_attention,steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        from torch_dflash import demo

        if args.command == "demo":
            demo.run(console, device=args.device, seed=args.seed, prompt_len=args.prompt_len, quiet=args.quiet)
        elif args.command == "bench":
            from torch_dflash.benchmarks import run as bench

            log = (lambda *a: None) if args.quiet else console.log
            print(bench.main(args.suite, args.out, args.smoke, args.reps, log=log,
                             only=tuple(filter(None, args.only.split(",")))))
        return 0
    except DFlashError as error:
        if args.debug:
            traceback.print_exc()
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        return 1
    except Exception:  # noqa: BLE001 — an internal error: say so, with the traceback
        traceback.print_exc()
        Console(stderr=True).print("[red]internal error[/red]: please report it with the traceback above")
        return 2


if __name__ == "__main__":
    sys.exit(main())
