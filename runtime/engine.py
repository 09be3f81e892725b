"""The DFLASH speculative-decoding loop over static KV caches (design §6), for a batch of ragged prompts.

Rows and slots. A step runs on cache rows 0..B-1 (the models write rows arange(B)). Row r holds one active
sequence; when sequences finish, live rows from the tail are copied into the finished rows' places (only the
slots below their length) so the active rows stay 0..n-1 and a step costs n rows. With CUDA graphs, n is padded
up to a bucket (1, 2, 4, …, max_batch): pad rows sit in rows >= n, which belong to no live sequence. The last
cache position, `scratch` = max_seq_len - 1, is never visible to a real query (every real position is below
it), so every padding entry — pad rows, unused context entries, block entries past a length limit — is written
there: padding never touches a real slot.

Positions. Each row keeps `start`, the position of its last committed token (its K/V is not yet in the target
cache). A step drafts and verifies the block [last, MASK…] at start..start+b-1, commits `produced` tokens
(accepted drafts + bonus, cut by the limit and at a stop token) and moves start by produced: rows advance by
different amounts (ragged commit). Rollback is by position: slots past a row's start are masked until rewritten.
So `Decode.fork()` of a state redoes exactly the turns that state would do next: benchmarks/e2e.py times one turn
that way.
"""

import copy
from dataclasses import dataclass, fields, replace
from math import ceil
from typing import NamedTuple

import torch

from torch_dflash.errors import InputError

from .block import block_layout, to_logical
from .checks import (PIPELINE, check_block_size, check_capacity, check_engine, check_pair, check_sampling,
                     check_stop_tokens, new_token_counts, read_prompts)
from .device import PhaseClock, copy_to_host
from .executors import Steps, build_steps, with_cuda_graphs
from .sampling import accept_greedy, accept_rejection, choose, sampling_probs
from .stats import GenerateStats


class GenerateOutput(NamedTuple):
    sequences: list           # per prompt: prompt + new tokens, a 1-D CPU LongTensor
    acceptance_lengths: list  # per prompt: tokens committed by each of its steps
    stats: GenerateStats


@dataclass
class Rows:
    """State of the active rows (row r = cache row r), with the next step's block layout (runtime/block.py)
    already queued: it is made where the rows are (after the previous commit, before the turn's one host sync),
    so the host has nothing to launch between that sync and the draft step but the step itself."""

    seq: torch.Tensor          # [n] index of the row's sequence in the call
    start: torch.Tensor        # [n] position of the last committed token
    limit: torch.Tensor        # [n] prompt length + max_new_tokens
    last: torch.Tensor         # [n] the last committed token
    context: torch.Tensor      # [n, b, F] target features of committed tokens the draft has not read yet
    context_pos: torch.Tensor  # [n, b] their positions (scratch for unused entries)
    col: torch.Tensor          # [n, b] the next block's column of each logical offset
    positions: torch.Tensor    # [n, b] its cache positions, column order
    real: torch.Tensor         # [n] its real entries
    block: torch.Tensor        # [n, b] its tokens before drafting: [last, MASK, …]

    def take(self, index):
        return Rows(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    stops: torch.Tensor
    generator: torch.Generator | None

    def choose(self, logits):
        return choose(logits, self.temperature, self.top_p, self.top_k, self.generator)


@dataclass
class Decode:
    """One call's batch between two turns of the loop (`DFlashEngine.begin` → `iterate` … → `finish`)."""

    rows: Rows
    tokens: torch.Tensor   # [n, max_seq_len] every sequence's tokens so far (its prompt first)
    sampling: Sampling
    stats: GenerateStats
    clock: PhaseClock
    seq_host: list         # host copies of rows.seq / rows.start / rows.limit and whether each row has finished
    start_host: list
    limit_host: list
    done_host: list
    acceptance: list       # per sequence: tokens committed by each of its steps
    final_length: list     # per sequence: its length once it has finished
    ahead: torch.Tensor | None = None  # the draft logits of `rows`, queued by the previous turn (draft_ahead)

    def fork(self) -> "Decode":
        """A copy that `iterate` can advance on its own: the same rows at the same positions, its own tokens,
        records and stats. Rollback is by position, so a fork redoes exactly the turns this state would do next
        (while no row of either finishes: finishing moves cache rows). A fork drafts its next turn itself: a draft
        queued ahead lives in the draft step's output buffer, which the next draft call overwrites."""
        return replace(self, tokens=self.tokens.clone(), stats=replace(self.stats), clock=copy.copy(self.clock),
                       acceptance=[list(a) for a in self.acceptance], final_length=list(self.final_length),
                       ahead=None)


class DFlashEngine:
    """Holds a (target, draft) pair with caches [max_batch, n_kv, max_seq_len, hd] set up once, and the two
    step functions (see executors): by default the captured programs after the pass pipeline and the lowering
    for the models' device, CUDA-graphed on CUDA. One engine per model pair at a time: it sets the models'
    caches, `target.feature_layer_ids` and `draft.context_window`."""

    def __init__(self, target, draft, max_batch=1, max_seq_len=2048, block_size=None, *, draft_window_size=None,
                 executor="auto", cuda_graphs=None, draft_ahead=None, compile_step=PIPELINE,
                 steps: Steps | None = None):
        """executor: "auto" = "exported" (captured programs) or "eager" (the model code as written).
        compile_step: "pipeline" (passes + lowering), "inductor" (that, then torch.compile with Inductor), None
        (programs as captured) or a hook (graph_module, kind) -> step. steps: step functions to run instead of capturing (e.g. an export's programs, not CUDA-graphed
        yet: the engine adds its graphs). cuda_graphs: None = on for CUDA models. draft_ahead: queue each turn's
        next draft step before the turn's host sync (`iterate`); None = on with CUDA graphs."""
        self.device = check_pair(target, draft)
        self.block_size = check_block_size(draft, block_size)
        executor, self.cuda_graphs = check_engine(self.device, self.block_size, max_batch, max_seq_len,
                                                  draft_window_size, executor, cuda_graphs, compile_step, steps)
        self.target, self.draft = target, draft
        self.max_batch, self.max_seq_len, self.scratch = max_batch, max_seq_len, max_seq_len - 1
        self.vocab, self.mask_token_id = target.config.vocab_size, draft.mask_token_id
        target.feature_layer_ids = list(draft.target_layer_ids)
        draft.context_window = draft_window_size
        for model in (target, draft):
            model.setup_cache(max_batch, max_seq_len)
        if steps is None:
            steps = build_steps(target, draft, executor=executor, block_size=self.block_size, max_batch=max_batch,
                                compile_step=compile_step)
        self.steps = with_cuda_graphs(steps) if self.cuda_graphs else steps
        self.draft_ahead = self.cuda_graphs if draft_ahead is None else bool(draft_ahead)
        self.buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})

    @property
    def reports(self) -> dict:
        """"draft" / "verify" -> the CompileReport of that step (passes, fusions, rejections, providers) when
        the engine compiled it through the pipeline; {} for eager modules, programs as captured or given steps."""
        return self.steps.reports

    def generate(self, input_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=None,
                 seed=None) -> GenerateOutput:
        """input_ids: one prompt (1-D tensor / list of ints), a [B, L] tensor, or a list of 1-D prompts of any
        lengths. max_new_tokens: one int or one per prompt. Temperature 0 is greedy (lossless: the target's
        own greedy tokens); otherwise rejection sampling from the target's `sampling_probs` (top_p / top_k)."""
        decode = self.begin(input_ids, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed)
        while self.iterate(decode) is not None:
            pass
        return self.finish(decode)

    # --- the loop, one turn at a time ----------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, input_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=None,
              seed=None) -> Decode:
        """`generate`'s checks, then the prefill and each prompt's first token: the state before the first turn."""
        prompts = read_prompts(input_ids, self.vocab)
        limits = check_capacity(prompts, new_token_counts(max_new_tokens, len(prompts)), self.max_batch,
                                self.max_seq_len)
        check_sampling(temperature, top_p, top_k)
        stops = torch.tensor(check_stop_tokens(stop_token_ids, self.vocab), dtype=torch.long, device=self.device)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        sampling = Sampling(float(temperature), top_p, top_k, stops, generator)
        n, dev = len(prompts), self.device
        stats, clock = GenerateStats(self.block_size), PhaseClock(dev)
        tokens = torch.full((n, self.max_seq_len), self.mask_token_id, dtype=torch.long, device=dev)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt.to(dev)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        first_logits, context, context_pos = self._prefill(tokens, lengths)
        first, _ = sampling.choose(first_logits)
        seq = torch.arange(n, device=dev)
        tokens[seq, lengths] = first
        rows = self._rows(seq, lengths, torch.tensor(limits, device=dev), first, context, context_pos)
        done = torch.isin(first, sampling.stops) | (rows.start + 1 >= rows.limit)
        stats.new_tokens = n
        clock.charge(stats, "prefill_s")
        decode = Decode(rows, tokens, sampling, stats, clock, list(range(n)), [len(p) for p in prompts], list(limits),
                        done.tolist(), [[] for _ in range(n)], [0] * n)
        clock.settle()
        return decode

    @torch.no_grad()
    def iterate(self, decode: Decode, ahead: bool | None = None) -> list[int] | None:
        """One turn: finished rows leave the batch, then draft + verify + accept + commit over the live rows.
        Advances `decode`; returns the tokens each live row committed, or None once every sequence finished.
        Draft ahead (`ahead`: None = the engine's draft_ahead; False = not this turn, e.g. a caller's last): when
        no live row can reach its length limit in this turn, the next turn's draft step is queued before the
        turn's host sync, so the GPU drafts while the host reads the commit and gets the next turn going. A row
        that ends at a stop token wastes that draft (the rows move; the next turn drafts again)."""
        for r, d in enumerate(decode.done_host):
            if d:
                decode.final_length[decode.seq_host[r]] = decode.start_host[r] + 1
                decode.ahead = None
        decode.rows, decode.seq_host, decode.start_host, decode.limit_host = self._compact(
            decode.rows, decode.done_host, decode.seq_host, decode.start_host, decode.limit_host)
        decode.done_host = [False] * len(decode.seq_host)
        if not decode.seq_host:
            return None
        far = all(s + self.block_size + 1 < limit for s, limit in zip(decode.start_host, decode.limit_host))
        decode.rows, produced, done = self._step(decode)
        outcome, wait = copy_to_host(torch.stack([produced, done.long(), decode.rows.start]))
        if (self.draft_ahead if ahead is None else ahead) and far:
            decode.clock.charge(decode.stats, "overhead_s")
            rows = decode.rows
            decode.ahead = self._draft(rows.context, rows.context_pos, rows.block, rows.positions)
            decode.clock.charge(decode.stats, "draft_s")
        wait()
        produced, decode.done_host, decode.start_host = outcome.tolist()
        decode.clock.settle(wait=False)
        for r, count in enumerate(produced):
            decode.acceptance[decode.seq_host[r]].append(count)
        decode.stats.steps += 1
        return produced

    def finish(self, decode: Decode) -> GenerateOutput:
        """The call's output once `iterate` has returned None."""
        if decode.seq_host:
            raise InputError("finish() needs a decode whose sequences have all finished (iterate returned None).")
        stats = decode.stats
        decode.clock.charge(stats, "overhead_s")
        decode.clock.settle()
        stats.acceptance_lengths = [a for per_seq in decode.acceptance for a in per_seq]
        stats.new_tokens += sum(stats.acceptance_lengths)
        tokens = decode.tokens.cpu()
        return GenerateOutput([tokens[i, : length] for i, length in enumerate(decode.final_length)],
                              decode.acceptance, stats)

    def _prefill(self, tokens, lengths):
        """The prompts through the verify step in chunks of b (causal with the cached prefix), each chunk's
        features through the draft step as context (its block parked on the scratch slot), except the last
        chunk's, which the first draft step reads. -> (logits at each prompt's last token, context, positions)."""
        b, n = self.block_size, lengths.shape[0]
        offsets = torch.arange(b, device=self.device)
        last = lengths - 1
        parked_ids = torch.full((n, b), self.mask_token_id, dtype=torch.long, device=self.device)
        parked_pos = torch.full_like(parked_ids, self.scratch)
        first_logits = None
        chunks = ceil(int(lengths.max()) / b)
        for k in range(chunks):
            pos = k * b + offsets
            real = pos < lengths[:, None]
            ids = torch.where(real, tokens[:, pos], self.mask_token_id)
            positions = torch.where(real, pos, self.scratch)
            logits, features = self._verify(ids, positions)
            here = logits.gather(1, (last % b)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
            first_logits = here if first_logits is None else torch.where((last // b == k)[:, None], here, first_logits)
            if k < chunks - 1:
                self._draft(features, positions, parked_ids, parked_pos)
        return first_logits, features.clone(), positions

    def _step(self, decode):
        """One draft + verify + accept over the active rows -> (rows after the commit, produced [n], done [n])."""
        rows, sampling, stats, clock = decode.rows, decode.sampling, decode.stats, decode.clock
        col, positions, real = rows.col, rows.positions, rows.real
        clock.charge(stats, "overhead_s")
        draft_logits, decode.ahead = decode.ahead, None
        if draft_logits is None:
            draft_logits = self._draft(rows.context, rows.context_pos, rows.block, positions)
            clock.charge(stats, "draft_s")
        drafts, draft_probs = sampling.choose(draft_logits)
        block = torch.cat([rows.block[:, :1], drafts], dim=1)
        clock.charge(stats, "overhead_s")
        logits, features = self._verify(block, positions)
        clock.charge(stats, "verify_s")
        logits, features, block = to_logical(logits, col), to_logical(features, col), block.gather(1, col)
        gamma = real - 1
        if sampling.temperature == 0:
            accepted, bonus = accept_greedy(block[:, 1:], logits, gamma)
        else:
            target_probs = sampling_probs(logits, sampling.temperature, sampling.top_p, sampling.top_k)
            draft_probs = to_logical(draft_probs, col[:, 1:] - 1)
            accepted, bonus = accept_rejection(block[:, 1:], target_probs, draft_probs, gamma, sampling.generator)
        return self._commit(rows, decode.tokens, block, accepted, bonus, features, sampling.stops)

    def _commit(self, rows, tokens, block, accepted, bonus, features, stops):
        """New tokens at start+1…: the accepted drafts then the bonus, cut at the limit and after a stop token."""
        b = self.block_size
        offsets = torch.arange(b, device=self.device)
        new = torch.cat([block[:, 1:], block[:, :1]], dim=1).scatter(1, accepted[:, None], bonus[:, None])
        produced = torch.minimum(accepted + 1, rows.limit - rows.start - 1)
        hit = torch.isin(new, stops) & (offsets < produced[:, None])
        stopped = hit.any(dim=1)
        produced = torch.where(stopped, hit.long().argmax(dim=1) + 1, produced)
        kept = offsets < produced[:, None]
        tokens[rows.seq[:, None], torch.where(kept, rows.start[:, None] + 1 + offsets, self.scratch)] = new
        start = rows.start + produced
        rows = self._rows(rows.seq, start, rows.limit, new.gather(1, (produced - 1)[:, None])[:, 0], features,
                          torch.where(kept, rows.start[:, None] + offsets, self.scratch))
        return rows, produced, stopped | (start + 1 >= rows.limit)

    def _rows(self, seq, start, limit, last, context, context_pos) -> Rows:
        """Rows with their next block: [last, MASK…] laid out at start.. (block_layout)."""
        col, positions, real = block_layout(start, limit, self.block_size, self.scratch)
        block = torch.full_like(positions, self.mask_token_id)
        block[:, 0] = last
        return Rows(seq, start, limit, last, context, context_pos, col, positions, real, block)

    def _compact(self, rows, done, seq_host, start_host, limit_host):
        """Drop finished rows: live rows from the tail move into the holes (their cache slots below start are
        copied, in every target and draft cache), so the active rows are again 0..m-1."""
        keep = [r for r, d in enumerate(done) if not d]
        if len(keep) == len(done):
            return rows, seq_host, start_host, limit_host
        m = len(keep)
        holes, movers = [r for r in range(m) if done[r]], [r for r in keep if r >= m]
        if holes:
            upto = max(start_host[r] for r in movers)
            src, dst = (torch.tensor(x, device=self.device) for x in (movers, holes))
            for cache in self.steps.caches:
                cache[dst, :, :upto] = cache[src, :, :upto]
        order = list(range(m))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        return rows.take(index), *([host[r] for r in order] for host in (seq_host, start_host, limit_host))

    # --- the two steps, padded to a CUDA-graph bucket --------------------------------------------------------------
    def _bucket(self, n):
        return next(size for size in self.buckets if size >= n) if self.cuda_graphs else n

    def _pad(self, nb, x, fill):
        return x if x.shape[0] == nb else torch.cat([x, x.new_full((nb - x.shape[0], *x.shape[1:]), fill)])

    def _draft(self, context, context_pos, block, positions):
        n, nb = block.shape[0], self._bucket(block.shape[0])
        m, s = self.mask_token_id, self.scratch
        logits = self.steps.draft(self._pad(nb, context, 0), self._pad(nb, context_pos, s), self._pad(nb, block, m),
                                  self._pad(nb, positions, s))
        return logits[:n]

    def _verify(self, block, positions):
        n, nb = block.shape[0], self._bucket(block.shape[0])
        logits, features = self.steps.verify(self._pad(nb, block, self.mask_token_id),
                                             self._pad(nb, positions, self.scratch))
        return logits[:n], features[:n]


def generate(target, draft, input_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=None,
             block_size=None, *, draft_window_size=None, executor="auto", cuda_graphs=None, draft_ahead=None,
             seed=None, compile_step=PIPELINE):
    """One call: an engine sized for it (caches of len(prompts) rows and the longest prompt + max_new_tokens
    + 1 positions, at least 2·block_size + 1, set up on the models), then `DFlashEngine.generate`. Every call
    captures and compiles the two steps again (seconds): hold a DFlashEngine to keep caches, compiled programs
    and CUDA graphs across calls."""
    check_pair(target, draft)
    b = check_block_size(draft, block_size)
    prompts = read_prompts(input_ids, target.config.vocab_size)
    counts = new_token_counts(max_new_tokens, len(prompts))
    check_sampling(temperature, top_p, top_k)
    check_stop_tokens(stop_token_ids, target.config.vocab_size)
    longest = max(len(p) + m for p, m in zip(prompts, counts))
    engine = DFlashEngine(target, draft, max_batch=len(prompts), max_seq_len=max(longest + 1, 2 * b + 1),
                          block_size=b, draft_window_size=draft_window_size, executor=executor,
                          cuda_graphs=cuda_graphs, draft_ahead=draft_ahead, compile_step=compile_step)
    return engine.generate(prompts, counts, temperature, top_p, top_k, stop_token_ids, seed)
