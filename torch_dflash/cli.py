"""The `torch-dflash` command line. Exit codes: 0 done, 1 user error (one line), 2 internal error."""

import argparse
import os
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
    export = commands.add_parser("export", help="export the draft and verify steps, rewritten and lowered, to a directory")
    export.add_argument("--target", help="target checkpoint directory (HF format)")
    export.add_argument("--draft", help="DFlash draft checkpoint directory (z-lab format)")
    export.add_argument("--random-config", action="store_true", help="use the demo's random pair instead")
    export.add_argument("--out", required=True, help="output directory (new, empty or a previous export)")
    export.add_argument("--device", default="cpu", help="lowering target: cpu (default), cuda, rocm or ascend")
    export.add_argument("--gpu-arch", help="comma-separated archs to compile the Triton kernels for: "
                                           "sm_80,sm_90,gfx942,gfx950 (default: the local GPU's, if any)")
    export.add_argument("--batch-max", type=int, default=1, help="largest batch the programs take (KV cache rows)")
    export.add_argument("--max-seq-len", type=int, default=2048, help="KV cache positions (prompt + new tokens + 1)")
    export.add_argument("--mlir", choices=("linalg", "stablehlo", "tosa"), help="also write <graph>.<dialect>.mlir")
    inspect = commands.add_parser("inspect", help="what the passes and the lowering did to an export or a .pt2")
    inspect.add_argument("path", help="an export directory or a .pt2 file")
    inspect.add_argument("--pass", dest="pass_name", metavar="NAME", help="print this pass's graph before and after")
    inspect.add_argument("--diff", action="store_true", help="a unified diff of the graph per pass")
    inspect.add_argument("--why", action="store_true", help="every candidate not rewritten, with the reason")
    inspect.add_argument("--html", metavar="FILE", help="write one self-contained HTML page of the report")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    generate = commands.add_parser("generate", help="speculative decoding of one prompt; tokens and acceptance")
    generate.add_argument("--target", help="target checkpoint directory (HF format)")
    generate.add_argument("--draft", help="DFlash draft checkpoint directory (z-lab format)")
    generate.add_argument("--random-config", action="store_true", help="use the demo's random pair instead")
    generate.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")
    generate.add_argument("--device", default="cpu", help="cpu (default), cuda, rocm (ignored with --artifact)")
    generate.add_argument("--artifact", metavar="OUT", help="run the draft and verify programs of this export")
    bench = commands.add_parser("bench", help="time kernels and steps on the GPU beside eager, inductor and the floor")
    bench.add_argument("--suite", choices=("kernels", "steps", "e2e", "all"), default="all")
    bench.add_argument("--out", default="bench-out", help="directory for bench.json and bench.md")
    bench.add_argument("--reps", type=int, help="timed repetitions per variant, median reported "
                                                "(default: 100 for kernels, 50 for steps and e2e)")
    bench.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, each variant once (CI)")
    bench.add_argument("--only", default="", help="comma-separated case modules, e.g. kernels_attention,steps")
    bench.add_argument("--budget", type=float, default=0, metavar="SECONDS",
                       help="start no further case after this many seconds (what did not run is listed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        from torch_dflash import demo

        if args.command == "demo":
            demo.run(console, device=args.device, seed=args.seed, prompt_len=args.prompt_len, quiet=args.quiet)
        elif args.command == "export":
            from torch_dflash import export_cmd

            export_cmd.run(console, args)
        elif args.command == "inspect":
            from torch_dflash import inspect_cmd

            inspect_cmd.run(console, args.path, pass_name=args.pass_name, diff=args.diff, why=args.why,
                            html=args.html, as_json=args.json)
        elif args.command == "generate":
            from torch_dflash import generate_cmd

            generate_cmd.run(console, args)
        elif args.command == "bench":
            from torch_dflash.benchmarks import run as bench

            log = (lambda *a: None) if args.quiet else console.log
            print(bench.main(args.suite, args.out, args.smoke, args.reps, log=log,
                             only=tuple(filter(None, args.only.split(","))), budget_s=args.budget))
        return 0
    except BrokenPipeError:  # the reader went away (`… | head`): exit 1 silently, as rich does for its own output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
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
