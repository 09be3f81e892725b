"""What a `generate` call reports besides its tokens."""

from dataclasses import dataclass, field

import torch


@dataclass
class GenerateStats:
    """Acceptance and time of one generate call (times in seconds; on CUDA read off the GPU's timeline with events,
    so timing the phases costs the loop no synchronisation: runtime/device.PhaseClock).

    acceptance_lengths: tokens committed by each (sequence, step) pair, sequence by sequence — accepted drafts + the
    bonus, cut by the length limit and at a stop token (z-lab's `acceptance_lengths`); the first token, sampled
    from the prefill, is not a step. histogram[k]: how many of those committed k tokens (k = 0 … block_size).
    mean_acceptance: τ, the mean of acceptance_lengths. steps: batched draft+verify iterations.
    """

    block_size: int
    acceptance_lengths: list = field(default_factory=list)
    steps: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    overhead_s: float = 0.0

    @property
    def histogram(self):
        counts = torch.bincount(torch.tensor(self.acceptance_lengths, dtype=torch.long), minlength=self.block_size + 1)
        return counts.tolist()

    @property
    def mean_acceptance(self):
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def total_s(self):
        return self.prefill_s + self.draft_s + self.verify_s + self.overhead_s

    @property
    def tokens_per_s(self):
        """New tokens (the first one included) per second of the whole call, prefill included."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0
