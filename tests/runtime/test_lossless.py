"""Greedy DFLASH is lossless: token-identical to the target's own greedy decoding (our static-cache AR loop,
transformers' generate) and to z-lab's reference loop, acceptance lengths included (fp32, CPU)."""

import pytest
import torch
from runtime_testing import ar_greedy, one_thread, prompts_of, tiny_pair

import torch_dflash as td

CASES = {  # seed, block size, prompt lengths, max_new_tokens, stop tokens
    "b2_single": (0, 2, [1], 20, None),
    "b3_ragged": (1, 3, [64, 5], [12, 30], None),
    "b8_four_stops": (2, 8, [7, 1, 33, 20], 24, [46, 39, 54]),  # one stops at its first token
    "b16_three": (3, 16, [16, 17, 2], 40, None),
    "b5_limits_stops": (4, 5, [50, 3, 9, 12], [5, 40, 1, 17], [42, 56]),
}


single_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.mark.parametrize("case", CASES)
def test_greedy_equals_the_targets_own_greedy_decoding(case):
    seed, block, lengths, max_new, stops = CASES[case]
    target, draft = tiny_pair(seed, block_size=16, coin=10.0)
    prompts = prompts_of(lengths, target.config.vocab_size, seed)
    out = td.generate(target, draft, prompts, max_new_tokens=max_new, block_size=block, stop_token_ids=stops)
    news = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
    for i, (prompt, n) in enumerate(zip(prompts, news)):
        expected = ar_greedy(target, prompt, n, stops or ())
        assert out.sequences[i].tolist() == expected, f"sequence {i}"
        assert sum(out.acceptance_lengths[i]) == len(expected) - len(prompt) - 1  # every new token but the first
    seen = out.stats.acceptance_lengths
    assert len(seen) == sum(len(a) for a in out.acceptance_lengths) and 1 <= min(seen) and max(seen) <= block


def test_greedy_matches_transformers_generate(tiny_qwen3_dir, tiny_draft_dir):
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    target, draft = td.load_target(tiny_qwen3_dir), td.load_draft(tiny_draft_dir)
    prompts = prompts_of([9, 30], 128, seed=5)
    out = td.generate(target, draft, prompts, max_new_tokens=[25, 18])
    for prompt, n, got in zip(prompts, [25, 18], out.sequences):
        with torch.no_grad():
            ref = hf.generate(prompt[None], max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got.tolist() == ref[0].tolist()


@pytest.fixture(scope="module")
def zlab_pair(tiny_qwen3_dir, tiny_draft_dir, tmp_path_factory):
    """transformers target + z-lab draft with the coin construction (tests/runtime/runtime_testing.tiny_pair),
    saved and loaded into ours: the same weights on both sides, and acceptance lengths that vary."""
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    zlab = DFlashDraftModel.from_pretrained(tiny_draft_dir).eval()
    with torch.no_grad():
        hf.model.norm.weight[0] = zlab.norm.weight[0] = 10.0
        hf.lm_head.weight[:, 0] = 0.0
        hf.lm_head.weight[:2, 0] = torch.tensor([1.0, -1.0])
    root = tmp_path_factory.mktemp("coin")
    hf.save_pretrained(root / "target")
    zlab.save_pretrained(root / "draft")
    return hf, zlab, td.load_target(root / "target"), td.load_draft(root / "draft")


@pytest.mark.parametrize("block, max_new, stops", [(4, 37, None), (3, 13, None), (2, 9, None), (4, 30, [74])])
def test_batch_one_matches_zlab_tokens_and_acceptance(zlab_pair, block, max_new, stops, monkeypatch):
    import time

    from dflash import model as zlab_model

    monkeypatch.setattr(zlab_model, "_cuda_time", time.perf_counter)  # its stats synchronise CUDA
    hf, zlab, target, draft = zlab_pair
    prompt = prompts_of([11], 128, seed=block)[0]
    ref = zlab_model.dflash_generate(zlab, hf, prompt[None], max_new, stops, block_size=block, return_stats=True)
    out = td.generate(target, draft, prompt, max_new_tokens=max_new, block_size=block, stop_token_ids=stops)
    assert out.sequences[0].tolist() == ref.output_ids[0].tolist()
    assert out.acceptance_lengths[0] == ref.acceptance_lengths
    assert max(ref.acceptance_lengths) > 1, "the coin construction should accept some drafts"


def test_greedy_over_an_mhc_target(tiny_mhc_dir):
    """The loop is model-agnostic: an mHC target (features are flattened streams) with a draft built for it."""
    from torch_dflash.models import DFlashDraft, DFlashDraftConfig

    target = td.load_target(tiny_mhc_dir)
    cfg = target.config
    draft = DFlashDraft(DFlashDraftConfig(hidden_size=cfg.hidden_size, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          target_layer_ids=(1,), mask_token_id=127, block_size=4))
    draft.fc = torch.nn.Linear(cfg.hidden_size * cfg.hc_mult, cfg.hidden_size, bias=False)
    prompt = prompts_of([6], 128, seed=7)[0]
    out = td.generate(target, draft.eval(), prompt, max_new_tokens=12)
    assert out.sequences[0].tolist() == ar_greedy(target, prompt, 12)
