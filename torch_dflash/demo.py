"""The embedded default: a small random Qwen3-style target and a matching DFlash draft."""

import time

import torch
from rich.console import Console
from rich.table import Table

from torch_dflash.compiler.capture import DraftStep, VerifyStep
from torch_dflash.errors import InputError
from torch_dflash.models import DecoderConfig, DecoderLM, DFlashDraft, DFlashDraftConfig, build_target_layer_ids

TARGET = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, model_type="qwen3", qk_norm=True)
DRAFT_LAYERS = 2
BLOCK_SIZE = 8


def build_demo_pair(seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    max_batch: int = 4, max_seq_len: int = 256) -> tuple[DecoderLM, DFlashDraft]:
    """A random (target, draft) pair with caches set up; the draft reads the layers z-lab's default picks."""
    torch.manual_seed(seed)
    layer_ids = tuple(build_target_layer_ids(TARGET["num_hidden_layers"], DRAFT_LAYERS))
    target = DecoderLM(DecoderConfig(**TARGET, feature_layer_ids=layer_ids))
    draft = DFlashDraft(DFlashDraftConfig(
        hidden_size=TARGET["hidden_size"], intermediate_size=TARGET["intermediate_size"],
        num_hidden_layers=DRAFT_LAYERS, num_attention_heads=TARGET["num_attention_heads"],
        num_key_value_heads=TARGET["num_key_value_heads"], head_dim=TARGET["head_dim"],
        target_layer_ids=list(layer_ids), mask_token_id=TARGET["vocab_size"] - 1, block_size=BLOCK_SIZE,
        num_target_layers=TARGET["num_hidden_layers"]))
    for model in (target, draft):
        for p in model.parameters():
            p.data.normal_(0.0, 0.05) if p.dim() > 1 else p.data.uniform_(0.8, 1.2)
        model.to(device=device, dtype=dtype).eval()
        model.setup_cache(max_batch, max_seq_len)
    return target, draft


def resolve_device(name: str) -> torch.device:
    """The torch.device a user named, or InputError when torch cannot use it here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device '{name}'; use cpu or cuda (ROCm GPUs are 'cuda' in torch).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device '{name}' was asked for, but torch sees no CUDA or ROCm GPU on this machine.")
    return device


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1e3


def run(console: Console, *, device: str | torch.device = "cpu", seed: int = 0, prompt_len: int = 12, quiet: bool = False) -> dict:
    """Prefill, one draft step and one verify step of the random pair, eagerly; prints what each did."""
    device = resolve_device(device)
    target, draft = build_demo_pair(seed, device=device)
    b, vocab = draft.block_size, target.config.vocab_size
    prompt = torch.randint(0, vocab - 1, (1, prompt_len), device=device)
    positions = torch.arange(prompt_len, device=device)[None]
    block_positions = prompt_len + torch.arange(b, device=device)[None]
    with torch.inference_mode():
        prefill, t_prefill = _timed(lambda: target(prompt, positions=positions, logits_indices=torch.tensor(
            [prompt_len - 1], device=device), return_features=True))
        block = torch.full((1, b), draft.mask_token_id, device=device)
        block[:, 0] = prefill.logits[:, -1].argmax(-1)
        draft_logits, t_draft = _timed(lambda: DraftStep(target, draft)(prefill.features, positions, block,
                                                                       block_positions))
        block[:, 1:] = draft_logits.argmax(-1)
        (verify_logits, features), t_verify = _timed(lambda: VerifyStep(target)(block, block_positions))
        posterior = verify_logits.argmax(-1)
        accepted = int((block[:, 1:] == posterior[:, :-1]).cumprod(1).sum())
    summary = {"accepted": accepted, "committed": block[0, : accepted + 1].tolist() + [int(posterior[0, accepted])]}
    if not quiet:
        table = Table(title=f"torch-dflash demo — random Qwen3-style target ({target.config.num_hidden_layers} layers) "
                            f"+ DFlash draft ({len(draft.layers)} layers), {device}")
        for col in ("step", "input", "output", "ms"):
            table.add_column(col)
        table.add_row("prefill (target)", f"{prompt_len} prompt tokens",
                      f"first token {int(block[0, 0])}, features {tuple(prefill.features.shape)}", f"{t_prefill:.1f}")
        table.add_row("draft step", f"{prompt_len} context features + block of {b}",
                      f"draft tokens {block[0, 1:].tolist()}", f"{t_draft:.1f}")
        table.add_row("verify step (target)", f"block {tuple(block.shape)} at positions {prompt_len}..",
                      f"target argmax {posterior[0].tolist()}", f"{t_verify:.1f}")
        console.print(table)
        console.print(f"accepted {accepted} of {b - 1} draft tokens (random weights accept ~none); "
                      f"committed {summary['committed']}")
    summary.update(_spec_decode(console, target, draft, prompt[0], device, quiet))
    return summary


def _spec_decode(console: Console, target, draft, prompt, device, quiet: bool) -> dict:
    """The engine's default steps (exported, pass-optimized, lowered draft and verify programs); checks the
    tokens against the eager engine and prints the fusion report and acceptance stats."""
    from torch_dflash.runtime import DFlashEngine, generate

    with console.status("capturing, optimizing and lowering the draft and verify steps …"):
        engine = DFlashEngine(target, draft, max_seq_len=len(prompt) + 25)
        out = engine.generate(prompt, max_new_tokens=24)
    eager = generate(target, draft, prompt, max_new_tokens=24, executor="eager")
    same = torch.equal(out.sequences[0], eager.sequences[0])
    if not quiet:
        table = Table(title="passes and lowering per captured step")
        for col in ("step", "fusions", "providers", "rejections"):
            table.add_column(col)
        for kind, rep in engine.reports.items():
            fusions = ", ".join(f"{k} {v}" for k, v in rep.fusions.items() if not k.startswith(("cleanup", "canon")))
            providers = ", ".join(f"{op}→{'/'.join(sorted(set(p)))}" for op, p in rep.providers.items())
            table.add_row(kind, fusions, f"{rep.target}: {providers}", str(len(rep.rejections)))
        console.print(table)
        stats = out.stats
        console.print(f"spec decode: {stats.new_tokens} new tokens in {stats.steps} steps, mean acceptance τ "
                      f"{stats.mean_acceptance:.2f}, histogram {stats.histogram}; tokens identical to the eager "
                      f"engine: {same}")
    return {"identical_to_eager": same, "mean_acceptance": out.stats.mean_acceptance,
            "fusions": {k: r.fusions for k, r in engine.reports.items()}}
