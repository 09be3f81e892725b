"""`torch-dflash generate`: speculative decoding of one prompt, eagerly (td.generate) or through an export's
programs (--artifact OUT); prints the tokens and the acceptance statistics."""

import json

from rich.console import Console
from rich.table import Table

from torch_dflash.errors import InputError
from torch_dflash.export_cmd import load_pair, torch_device


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated token ids like 1,2,3; got '{text}'.") from None
    if not ids:
        raise InputError("--prompt-ids is empty; give at least one token id.")
    return ids


def _stats_table(out) -> Table:
    stats = out.stats
    table = Table(title="acceptance")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [("steps (draft + verify)", stats.steps), ("new tokens", stats.new_tokens),
            ("mean acceptance τ", f"{stats.mean_acceptance:.2f}"),
            ("acceptance lengths", " ".join(map(str, out.acceptance_lengths[0]))),
            ("histogram (k = 0…b)", " ".join(map(str, stats.histogram))),
            ("prefill / draft / verify ms", f"{stats.prefill_s * 1e3:.1f} / {stats.draft_s * 1e3:.1f} / "
                                            f"{stats.verify_s * 1e3:.1f}"),
            ("tokens/s", f"{stats.tokens_per_s:.1f}")]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def run(console: Console, args) -> None:
    from torch_dflash import generate

    prompt = parse_ids(args.prompt_ids)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.artifact:
        from torch_dflash.artifact import load_artifact

        artifact = load_artifact(args.artifact)
        device = torch_device(artifact.manifest["target"])
        target, draft = load_pair(args.target, args.draft, args.random_config, device)
        out, source = artifact.generate(target, draft, prompt, **options), f"the programs of {artifact.path}"
    else:
        target, draft = load_pair(args.target, args.draft, args.random_config, torch_device(args.device))
        out, source = generate(target, draft, prompt, **options), "td.generate's compiled steps"
    tokens = out.sequences[0].tolist()
    if args.quiet:
        print(json.dumps(tokens))
        return
    console.print(f"prompt {prompt}", highlight=False, soft_wrap=True)
    console.print(f"new tokens {tokens[len(prompt):]}", highlight=False, soft_wrap=True)
    console.print(f"steps run by {source}", highlight=False, soft_wrap=True)
    console.print(_stats_table(out))
