"""End-to-end cases: the spec-decode loop of THIS runtime at Qwen3-8B shapes, beside z-lab's loop and the floors.

Models: a Qwen3-8B-shape target (36 layers) and a Qwen3-8B-DFlash-b16-shape draft (5 layers), random bf16
weights built by benchmarks/steps.py; a 1024-token random prompt; block 16. Every runtime number runs through
`DFlashEngine` (CUDA-graphed per batch bucket on CUDA), in three variants of its `compile_step`:
  dflash           the default steps: captured, pass pipeline, lowered for the models' device;
  dflash+inductor  compile_step="inductor": those rewritten steps under torch.compile(backend="inductor");
  inductor         the peer: the same captured steps without our passes and lowering, under
                   torch.compile(backend="inductor") alone (`plain_compile_step`) — what Inductor makes of them.
Both torch.compile variants compile lazily, in the CUDA graph's warm-up before capture. The peers' engines
resume the dflash engine's state after its first turn (their caches are copies of its caches).

turn     `DFlashEngine.iterate` — draft step, verify step, acceptance, commit (cache rollback by position),
         next context: one loop turn of `generate`. Each timed call runs TURNS consecutive turns of a `fork()` of
         the state after the first turn (so every call redoes the same turns: engine.py, rollback is by position)
         and the time is per turn: the loop's steady state, where each turn's draft step was queued ahead by the
         turn before (draft_ahead; the call's first turn drafts itself, its last queues nothing).
         Peer "zlab": as many turns of z-lab's `dflash_generate` loop (`zlab_turn`, its lines at temperature 0)
         on the same weights (transformers' Qwen3ForCausalLM and z-lab's DFlashDraftModel holding our tensors),
         resumed the same way with z-lab's `_crop_to`.
draft, verify   the engine's two step functions on that turn's inputs (graph replays, input copies included),
         timed with the host ahead (harness._cuda_time_ms): the GPU's time for the step, as in the loop, where a
         step is queued while the one before runs; the notes give each variant's synchronous call time too, whose
         extra ≈ 30-100 µs (H100, session 18) are the host launching the call into an idle GPU.
draft to hidden states   the draft step without the lm_head (capture_draft(logits=False), each variant's
         compile_step, CUDA graph): what the draft goal's weight floor covers.
ar       the target's one-token step through the same path (capture_verify at block 1, the variant's
         compile_step, CUDA graph), timed with the host ahead as the draft and verify steps.
Floors: weight bytes + KV bytes over the copy bandwidth, as steps.py; the draft step also reads the target's
lm_head (its logits), so a turn reads it twice.

Random weights accept ~nothing. The turn's work does not depend on acceptance (blocks and contexts are padded
to [n, b]); only the host bookkeeping does. The notes give the acceptance length the timed turn had, the
engine's own per-phase times (GenerateStats) and the projected speedup τ·T_ar / T_turn at the published
τ = 6.5 — a projection, not a measurement. z-lab's draft reads only the previous turn's committed tokens as
context (here 1, at τ 6.5 about 6.5), so its turn is slightly cheaper at low acceptance.
"""

import functools
import time
from dataclasses import dataclass, replace

import torch

from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify
from torch_dflash.compiler.step_compiler import (device_target, inductor_compile_step, pipeline_compile_step,
                                                 plain_compile_step)
from torch_dflash.models import DecoderConfig, DecoderLM, DFlashDraft, DFlashDraftConfig
from torch_dflash.runtime import DFlashEngine, GenerateStats
from torch_dflash.runtime.checks import PIPELINE
from torch_dflash.runtime.device import CUDAGraphStep, PhaseClock, graph_pool, is_cuda

from . import harness
from .case import Case
from .steps import DRAFT_B16, QWEN3_8B, TINY, TINY_DRAFT, _build, kv_bytes, no_grad, weight_bytes
from .steps_backend import _on_meta_with_weights

TAU = 6.5          # published mean acceptance of Qwen3-8B-DFlash-b16 (GSM8K / HumanEval, design.md §6)
STATS_TURNS = 10   # turns the check runs to read the engine's own per-phase times (2 when small)
TURNS = 8          # consecutive turns per timed call of the turn case (2 when small)
PROJECTION_REPS = 20  # timed calls of the AR step and the turn for the projection (2 when small)
FUSED = "dflash+inductor"  # our steps, then Inductor: DFlashEngine(compile_step="inductor")
PEER = "inductor"          # the captured steps under Inductor alone: the peer the harness's ratio is taken to
VARIANTS = ("dflash", FUSED, PEER)


def _pair(device, dtype, small):
    """(target, draft, target config fields, draft config fields + the target shape it reads) — steps.py's shapes."""
    target_cfg, draft_extra = (TINY, TINY_DRAFT) if small else (QWEN3_8B, DRAFT_B16)
    cfg = {**{k: v for k, v in target_cfg.items() if k != "vocab_size"}, **draft_extra,
           "num_target_layers": target_cfg["num_hidden_layers"]}
    target = _build(DecoderLM, DecoderConfig(**target_cfg), device, dtype, seed=2)
    draft_fields = {k: v for k, v in cfg.items() if k in DFlashDraftConfig.__dataclass_fields__}
    return target, _build(DFlashDraft, DFlashDraftConfig(**draft_fields), device, dtype, seed=1), target_cfg, cfg


def _relative(got, want):
    want = want.float()
    return ((got.float() - want).norm() / want.norm()).item()


# ---- z-lab's loop -------------------------------------------------------------------------------------------

@dataclass
class ZlabState:
    """What `dflash_generate` carries from one turn to the next."""

    start: int
    output_ids: torch.Tensor
    position_ids: torch.Tensor
    target_hidden: torch.Tensor
    target_cache: object
    draft_cache: object


def zlab_models(target, draft, target_cfg, cfg, device):
    """transformers' Qwen3ForCausalLM and z-lab's DFlashDraftModel holding our models' weight tensors."""
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = _on_meta_with_weights(lambda: Qwen3ForCausalLM(Qwen3Config(**target_cfg, tie_word_embeddings=False)),
                               target.state_dict(), device)
    config = Qwen3Config(**{k: cfg[k] for k in QWEN3_8B if k in cfg}, num_target_layers=cfg["num_target_layers"],
                         dflash_config={k: cfg[k] for k in ("block_size", "mask_token_id", "target_layer_ids")})
    config.num_hidden_layers = cfg["num_hidden_layers"]
    return hf, _on_meta_with_weights(lambda: DFlashDraftModel(config), draft.state_dict(), device)


@torch.inference_mode()
def zlab_prefill(zlab, hf, prompt, max_new_tokens) -> ZlabState:
    """`dflash_generate`'s prefill at temperature 0: the target over the prompt [1, n], the first token, the
    context features."""
    from dflash.model import _crop_to, _make_cache, extract_context_feature, sample

    n = prompt.shape[1]
    output_ids = torch.full((1, n + max_new_tokens + 1), zlab.mask_token_id, dtype=torch.long, device=prompt.device)
    position_ids = torch.arange(output_ids.shape[1], device=prompt.device)[None]
    target_cache, draft_cache = _make_cache(hf.config), _make_cache(zlab.config)
    out = hf(prompt, position_ids=position_ids[:, :n], past_key_values=target_cache, use_cache=True,
             logits_to_keep=1, output_hidden_states=True)
    output_ids[:, :n] = prompt
    output_ids[:, n:n + 1] = sample(out.logits)
    _crop_to(target_cache, n)
    features = extract_context_feature(out.hidden_states, zlab.target_layer_ids)
    return ZlabState(n, output_ids, position_ids, features, target_cache, draft_cache)


@torch.inference_mode()
def zlab_turn(zlab, hf, s: ZlabState) -> int:
    """One turn of `dflash_generate`'s loop at temperature 0 with a full block (its lines and helpers): draft,
    verify, accept, commit, crop both caches, next context. Advances s; returns the tokens committed."""
    from dflash.model import _crop_to, _draft_value, _output_head, _raw_input_embeddings, extract_context_feature

    b, start = zlab.block_size, s.start
    block_ids = s.output_ids[:, start:start + b].clone()
    noise = _raw_input_embeddings(hf, block_ids, float(_draft_value(zlab.config, "input_embedding_scale", 1.0)))
    draft_hidden = zlab(target_hidden=s.target_hidden, noise_embedding=noise,
                        position_ids=s.position_ids[:, start - s.target_hidden.shape[1]:start + b],
                        past_key_values=s.draft_cache, use_cache=True)[:, 1 - b:, :]
    _crop_to(s.draft_cache, start)
    block_ids[:, 1:] = torch.argmax(zlab.compute_logits(draft_hidden, _output_head(hf)), dim=-1)
    out = hf(block_ids, position_ids=s.position_ids[:, start:start + b], past_key_values=s.target_cache,
             use_cache=True, output_hidden_states=True)
    posterior = torch.argmax(out.logits, dim=-1)
    accepted = (block_ids[:, 1:] == posterior[:, :-1]).cumprod(dim=1).sum(dim=1)[0].item()
    s.output_ids[:, start:start + accepted + 1] = block_ids[:, :accepted + 1]
    s.output_ids[:, start + accepted + 1] = posterior[:, accepted][0]
    s.start = start + accepted + 1
    _crop_to(s.target_cache, s.start)
    s.target_hidden = extract_context_feature(out.hidden_states, zlab.target_layer_ids)[:, :accepted + 1, :]
    return accepted + 1


def _zlab_variant(zlab, hf, prompt, max_new_tokens):
    """(`turn(count)`: the second turn and `count` - 1 more, returning the second's committed tokens; its check
    against `dflash_generate` itself)."""
    from dflash.model import _crop_to, dflash_generate

    state = zlab_prefill(zlab, hf, prompt, max_new_tokens)
    first = zlab_turn(zlab, hf, state)
    snapshot, draft_length = replace(state), state.draft_cache.get_seq_length()

    def turn(count=1):
        _crop_to(snapshot.target_cache, snapshot.start)
        _crop_to(snapshot.draft_cache, draft_length)
        state = replace(snapshot)
        return [zlab_turn(zlab, hf, state) for _ in range(count)][0]

    def check():
        """Our transcription of z-lab's loop commits what dflash_generate commits (same code, same device)."""
        replay = zlab_prefill(zlab, hf, prompt, max_new_tokens)
        lengths = [zlab_turn(zlab, hf, replay) for _ in range(2)]
        ref = dflash_generate(zlab, hf, prompt, max_new_tokens, None, return_stats=is_cuda(prompt.device))
        ref_ids = ref.output_ids if is_cuda(prompt.device) else ref
        assert torch.equal(replay.output_ids[:, :replay.start + 1], ref_ids[:, :replay.start + 1]), \
            "zlab_turn commits other tokens than dflash_generate"
        note = f"z-lab turns committed {first} then {turn()} tokens (first two: {lengths})"
        if is_cuda(prompt.device):
            per_turn = ref.time_per_output_token * ref.num_output_tokens / len(ref.acceptance_lengths) * 1e3
            note += f"; dflash_generate's own decode time: {per_turn:.2f} ms/turn over {len(ref.acceptance_lengths)}"
        return note
    return turn, check


# ---- the runtime ----------------------------------------------------------------------------------------------

def _compile_steps(device) -> dict:
    """variant -> a maker of its compile_step hook. On CPU (smoke) both torch.compile variants run as aot_eager:
    Inductor's C++ code generation is the slow part there, and no CPU time means anything."""
    target, backend = device_target(device), ("inductor" if is_cuda(device) else "aot_eager")
    return {"dflash": lambda: pipeline_compile_step(target),
            FUSED: lambda: inductor_compile_step(target, backend=backend),
            PEER: lambda: plain_compile_step(backend)}


class Stopwatch:
    """Seconds of set-up and first calls: perf_counter laps, each reading on CUDA first waiting for the queued work."""

    def __init__(self, device):
        self.cuda = is_cuda(device)
        self.last = self.now()

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self):
        """Seconds since the previous lap (or the stopwatch's creation)."""
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


def _engine_after_one_turn(target, draft, prompt, b, compile_step=PIPELINE):
    """The engine with its default steps (or through `compile_step`), the prompt prefilled and one turn run:
    (engine, state, tokens committed)."""
    engine = DFlashEngine(target, draft, max_batch=1, max_seq_len=prompt.shape[1] + 3 * b + 1,
                          compile_step=compile_step)
    decode = engine.begin(prompt[0], max_new_tokens=3 * b)
    first = engine.iterate(decode)[0]
    return engine, decode, first


@torch.no_grad()
def _resuming_engine(engine, compile_step):
    """An engine on `engine`'s pair through `compile_step`, its caches a copy of `engine`'s, so it resumes any
    state of `engine` (a `Decode` holds no cache). Its steps hold their own caches (the pair's are set up again),
    so the engines do not interfere; a lazy compile_step compiles each step on its first call."""
    peer = DFlashEngine(engine.target, engine.draft, max_batch=engine.max_batch, max_seq_len=engine.max_seq_len,
                        compile_step=compile_step)
    for mine, theirs in zip(peer.steps.caches, engine.steps.caches, strict=True):
        mine.copy_(theirs)
    return peer


@torch.no_grad()
def _turn_inputs(engine, snapshot):
    """The arguments of the next turn's draft step and verify step (the block the rows have queued)."""
    rows = snapshot.rows
    draft_args = (rows.context, rows.context_pos, rows.block, rows.positions)
    drafted = rows.block.clone()
    drafted[:, 1:] = engine.steps.draft(*draft_args).argmax(-1)
    return draft_args, (drafted, rows.positions)


def _ar_step(target, device, compile_step):
    """The target's one-token step through the runtime's compile path: capture_verify at block 1, `compile_step`,
    a CUDA graph on CUDA."""
    step = compile_step(capture_verify(target, block_size=1, max_batch=1).module(), "ar")
    return CUDAGraphStep(step, graph_pool()) if is_cuda(device) else step


def _draft_hidden_step(engine, device, compile_step):
    """The draft step up to the hidden states (capture_draft with logits=False: no lm_head, no softcap) through
    `compile_step`, a CUDA graph on CUDA — what the draft goal's 0.70 ms weight floor covers."""
    program = capture_draft(engine.target, engine.draft, max_batch=1, block_size=engine.block_size, logits=False)
    step = compile_step(program.module(), "draft")
    return CUDAGraphStep(step, graph_pool()) if is_cuda(device) else step


def random_prompt(target, device, small: bool) -> torch.Tensor:
    """The cases' prompt: [1, 1024] (12 when small) seeded token ids below the target's vocab size."""
    return torch.randint(0, target.config.vocab_size - 1, (1, 12 if small else 1024),
                         generator=torch.Generator(device).manual_seed(0), device=device)


def runtime_steps(target, draft, prompt, block_size, device, kinds=("draft", "verify", "ar"), disabled=()):
    """The runtime's steps as the cases run them, for the tools that time them alone (profile_steps --runtime,
    ab_steps): kind -> a no-argument call of the engine's draft / verify step on the inputs of a real turn after
    `prompt` and one turn, of the target's AR step or the draft step to its hidden states ("draft_hidden": no
    lm_head) through the same compile path (each built only if asked), or of the whole second turn ("turn":
    `iterate` on a fork of the state, queuing no draft ahead: one turn's work); and the context
    length those blocks start at. Built under the launch configs in force now, without the passes named in
    `disabled`."""
    compile_step = pipeline_compile_step(device_target(device), disabled) if disabled else PIPELINE
    engine, snapshot, _ = _engine_after_one_turn(target, draft, prompt, block_size, compile_step)
    draft_args, verify_args = _turn_inputs(engine, snapshot)
    calls = {"draft": lambda: engine.steps.draft(*draft_args), "verify": lambda: engine.steps.verify(*verify_args),
             "turn": lambda: engine.iterate(snapshot.fork(), ahead=False)}
    if "ar" in kinds:
        ar = _ar_step(target, device, pipeline_compile_step(device_target(device), disabled))
        calls["ar"] = lambda: ar(verify_args[0][:, :1], verify_args[1][:, :1])
    if "draft_hidden" in kinds:
        hidden = _draft_hidden_step(engine, device, pipeline_compile_step(device_target(device), disabled))
        calls["draft_hidden"] = lambda: hidden(*draft_args)
    return {kind: calls[kind] for kind in kinds}, int(snapshot.rows.start[0])


def _tensors(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _first_calls(calls, device):
    """Each variant called once, in turn, timed (synchronised). A variant's first call builds what it still
    lacks — a peer's engine (capture, pipeline), Inductor's compile, the CUDA graph — so these seconds are the
    case's compile time. A variant whose first call raises is named in the note and dropped from `calls` (the
    case's variants: it is not timed), so that it costs the case none of its other rows.
    -> ({variant: its result}, the note)."""
    results, seconds = {}, []
    for variant, call in list(calls.items()):
        clock = Stopwatch(device)
        try:
            results[variant] = call()
        except Exception as error:  # noqa: BLE001 — reported in the notes and the table has no row of it
            del calls[variant]
            seconds.append(f"{variant} FAILED ({type(error).__name__}: {error})")
            continue
        seconds.append(f"{variant} {clock.lap():.1f} s")
    return results, "first calls (capture, compile, CUDA graph where still to do): " + ", ".join(seconds)


def _step_check(calls, eager, args, tol, device):
    """Each variant's step ({variant: a call of it on args}) agrees with the eager step module on the same inputs
    (relative norm per output); the notes give the distances and the first calls' seconds."""
    @torch.no_grad()
    def check():
        results, first = _first_calls(calls, device)
        want = _tensors(eager(*args))
        notes = []
        for variant, got in results.items():
            distances = [_relative(a, e) for a, e in zip(_tensors(got), want)]
            assert max(distances) <= tol, f"{variant} step differs from eager by {max(distances):.1e} > {tol:.0e}"
            notes.append(f"{variant}: " + ", ".join(f"{d:.1e}" for d in distances))
        return f"relative distance to eager: {'; '.join(notes)}; {first}"
    return check


def engine_turns(engine, snapshot, count):
    """`count` consecutive turns of one fork of `snapshot`, as `generate` runs them (each turn's draft queued by
    the turn before, under draft_ahead), the last queuing no draft; the first turn's committed tokens."""
    decode = snapshot.fork()
    return [engine.iterate(decode, ahead=None if i < count - 1 else False) for i in range(count)][0]


def _stats_note(engine, snapshot, turns):
    """The engine's own per-phase times (GenerateStats: PhaseClock's event laps) over `turns` consecutive turns."""
    stats, clock = GenerateStats(engine.block_size), PhaseClock(engine.device)
    decode = replace(snapshot.fork(), stats=stats, clock=clock)
    for i in range(turns):
        engine.iterate(decode, ahead=None if i < turns - 1 else False)
    clock.charge(stats, "overhead_s")  # acceptance + commit: the loop charges them at the next turn's start
    clock.settle()
    per_turn = ", ".join(f"{name} {getattr(stats, name + '_s') / stats.steps * 1e3:.2f} ms"
                         for name in ("draft", "verify", "overhead"))
    return f"engine stats per turn: {per_turn} (GenerateStats over {stats.steps} turns)"


def _projection(t_ar_us, t_turn_us, reps):
    return (f"projection, not a measurement: τ {TAU} × T_ar {t_ar_us / 1e3:.2f} ms / T_turn {t_turn_us / 1e3:.2f} ms "
            f"= {TAU * t_ar_us / t_turn_us:.2f}× over AR decoding (medians of {reps} in this check)")


def core_cases(device="cuda", small=False):
    """`cases` without the dflash+inductor variant — dflash, the inductor peer and z-lab, every variant issue #8
    names — what `--suite all` runs to fit one device call: the variant's Inductor compiles of the 36-layer target
    and the draft take ≈ 210 s on the H100. `--suite e2e` runs `cases`."""
    return cases(device, small, variants=("dflash", PEER))


def cases(device="cuda", small=False, variants=VARIANTS):
    """The five cases in turn (a generator), cheap and most wanted first, the AR step last. Before the first:
    the shared part (models, prompt, the dflash engine after its first turn). Everything else — the peers'
    engines and steps, the AR programs, z-lab's loop — is built on its first call, inside the check of the first
    case that runs it: each case's compile lands in its own check (its notes give the first calls' seconds),
    and a case the budget skips compiles nothing."""
    clock = Stopwatch(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol_draft, tol_target = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 1e-1)
    target, draft, target_cfg, cfg = _pair(device, dtype, small)
    b = cfg["block_size"]
    prompt = random_prompt(target, device, small)
    engine, snapshot, first = _engine_after_one_turn(target, draft, prompt, b)
    draft_args, verify_args = _turn_inputs(engine, snapshot)
    ar_args = (verify_args[0][:, :1], verify_args[1][:, :1])
    # z-lab's models before any torch.compile: transformers registers pytree nodes as they run, and their count is
    # a dynamo guard (the compiled steps would recompile on their next call, outside a CUDA graph)
    hf, zlab = zlab_models(target, draft, target_cfg, cfg, device)
    zlab_turn_fn, zlab_check = _zlab_variant(zlab, hf, prompt, 3 * b)
    setup = (f"shared set-up {clock.lap():.1f} s (models; the dflash engine: capture, pipeline, lowering, prefill, "
             "first turn; z-lab's prefill and first turn)")

    hooks = _compile_steps(device)
    engine_of = functools.cache(lambda v: engine if v == "dflash" else _resuming_engine(engine, hooks[v]()))
    ar_of = functools.cache(lambda v: _ar_step(target, device, hooks[v]()))
    hidden_of = functools.cache(lambda v: _draft_hidden_step(engine, device, hooks[v]()))

    def step_calls(kind, args):
        return {v: no_grad(lambda v=v: getattr(engine_of(v).steps, kind)(*args)) for v in variants}

    per_call = 2 if small else TURNS
    turns = {v: (lambda v=v: engine_turns(engine_of(v), snapshot, per_call)[0]) for v in variants}
    turns["zlab"] = lambda: zlab_turn_fn(per_call)
    ar_calls = {v: no_grad(lambda v=v: ar_of(v)(*ar_args)) for v in variants}

    def turn_check():
        committed, first_calls = _first_calls(turns, device)
        notes = [f"timed turn committed {committed['dflash']} token(s) (the first turn {first}; random weights; "
                 + ", ".join(f"{v} {c}" for v, c in committed.items() if v != "dflash") + ")", first_calls,
                 _stats_note(engine, snapshot, 2 if small else STATS_TURNS), zlab_check()]
        reps = 2 if small else PROJECTION_REPS
        t_ar, _ = harness.time_variant(ar_calls["dflash"], device, reps, False, host_ahead=True)
        t_turn, _ = harness.time_variant(turns["dflash"], device, reps, False, per_call=per_call)
        return "; ".join([*notes, _projection(t_ar, t_turn, reps)])

    ctx = int(snapshot.rows.start[0])
    floor_draft = weight_bytes(draft) + weight_bytes(target.lm_head) + kv_bytes(cfg, ctx + b, dtype)
    floor_verify = weight_bytes(target) + kv_bytes(target_cfg, ctx + b, dtype)
    floor_ar = weight_bytes(target) + kv_bytes(target_cfg, ctx + 1, dtype)
    graphs = " + CUDA graph" if is_cuda(device) else ""
    where = (f"DFlashEngine, {device_target(device)}{graphs}; dflash: default steps, "
             + (f"{FUSED}: compile_step 'inductor', " if FUSED in variants else "")
             + f"{PEER}: captured steps under torch.compile alone"
             + ("" if is_cuda(device) else " (torch.compile variants as aot_eager on CPU)"))
    eager_draft, eager_verify = DraftStep(target, draft), VerifyStep(target)
    calls = step_calls("draft", draft_args)
    yield Case("e2e", f"runtime draft step (ctx {ctx}, {b}+{b} tokens)", calls,
               _step_check(calls, eager_draft, draft_args, tol_draft, device), floor_bytes=floor_draft,
               host_ahead=True,
               notes=f"{setup}; {where}; floor: draft weights {weight_bytes(draft) / 1e9:.2f} GB + the target's "
                     f"lm_head {weight_bytes(target.lm_head) / 1e9:.2f} GB (the draft's logits) + KV")
    calls = {v: no_grad(lambda v=v: hidden_of(v)(*draft_args)) for v in variants}
    yield Case("e2e", f"runtime draft step to hidden states (ctx {ctx}, {b}+{b} tokens)", calls,
               _step_check(calls, DraftStep(target, draft, logits=False), draft_args, tol_draft, device),
               floor_bytes=floor_draft - weight_bytes(target.lm_head), host_ahead=True,
               notes=f"{where}; capture_draft(logits=False): the draft step without the lm_head, what the draft "
                     f"goal's weight floor covers; floor: draft weights + KV")
    calls = step_calls("verify", verify_args)
    yield Case("e2e", f"runtime verify step ({b} tokens, ctx {ctx})", calls,
               _step_check(calls, eager_verify, verify_args, tol_target, device), floor_bytes=floor_verify,
               host_ahead=True, notes=where)
    yield Case("e2e", f"spec-decode turn (ctx {ctx}, block {b})", turns, turn_check,
               floor_bytes=floor_draft + floor_verify, per_call=per_call,
               notes=f"{where}; per turn of {per_call} consecutive turns per timed call; floor = draft + verify floors")
    yield Case("e2e", f"runtime AR step (1 token, ctx {ctx})", ar_calls,
               _step_check(ar_calls, eager_verify, ar_args, tol_target, device), floor_bytes=floor_ar,
               host_ahead=True,
               notes=f"capture_verify(block 1), then each variant's compile_step, {device_target(device)}{graphs}")
