"""Bad input raises one clear DFlashError sentence before any compute: the caches are left as they were."""

import pytest
import torch
from runtime_testing import one_thread, tiny_pair

import torch_dflash as td
from torch_dflash.errors import ConfigError, InputError
from torch_dflash.runtime import Steps

single_thread = pytest.fixture(autouse=True)(one_thread)

PROMPT = [3, 1, 4, 1, 5]


def caches(*models):
    return [b for m in models for name, b in m.named_buffers() if name.endswith(("k_cache", "v_cache"))]


def assert_one_sentence(error):
    text = str(error.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text


@pytest.fixture(scope="module")
def engine():
    target, draft = tiny_pair(0, block_size=4)
    engine = td.DFlashEngine(target, draft, max_batch=2, max_seq_len=40, executor="eager")  # errors come first
    engine.generate([PROMPT, PROMPT[:2]], max_new_tokens=6)  # caches now hold real K/V
    return engine


ENGINE_CASES = {  # generate(**kwargs) -> error, words of the message
    "empty prompt": (dict(input_ids=[PROMPT, []]), InputError, "Prompt 1 is empty"),
    "no prompt": (dict(input_ids=[]), InputError, "non-empty"),
    "float prompt": (dict(input_ids=torch.rand(5)), InputError, "integer token ids"),
    "3-D ids": (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), InputError, "1-D or 2-D"),
    "token beyond vocab": (dict(input_ids=[1, 64]), InputError, "outside the vocabulary"),
    "negative token": (dict(input_ids=[1, -1]), InputError, "outside the vocabulary"),
    "too many prompts": (dict(input_ids=[PROMPT] * 3), InputError, "exceed the engine's max_batch of 2"),
    "beyond the cache": (dict(input_ids=PROMPT, max_new_tokens=35), InputError, "the cache holds 39"),
    "zero new tokens": (dict(input_ids=PROMPT, max_new_tokens=0), InputError, "max_new_tokens"),
    "new tokens per prompt": (dict(input_ids=[PROMPT, PROMPT], max_new_tokens=[3]), InputError, "one per prompt"),
    "negative temperature": (dict(input_ids=PROMPT, temperature=-0.5), InputError, "temperature"),
    "nan temperature": (dict(input_ids=PROMPT, temperature=float("nan")), InputError, "temperature"),
    "top_p zero": (dict(input_ids=PROMPT, top_p=0.0), InputError, "top_p"),
    "top_p above one": (dict(input_ids=PROMPT, top_p=1.5), InputError, "top_p"),
    "negative top_k": (dict(input_ids=PROMPT, top_k=-1), InputError, "top_k"),
    "stop beyond vocab": (dict(input_ids=PROMPT, stop_token_ids=[64]), InputError, "stop_token_ids"),
}


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_engine_refuses_bad_calls_before_touching_the_caches(engine, case):
    kwargs, error, words = ENGINE_CASES[case]
    before = [c.clone() for c in engine.steps.caches]
    with pytest.raises(error, match=words) as info:
        engine.generate(**{"max_new_tokens": 4, **kwargs})
    assert_one_sentence(info)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.steps.caches))


def mismatch(name):
    target, draft = tiny_pair(0, block_size=4)
    if name == "hidden size":
        draft = tiny_pair(0, hidden=48, block_size=4)[1]
    elif name == "layer beyond the target":
        draft.target_layer_ids = [1, 4]
    elif name == "fc width":
        draft.target_layer_ids = [1]
    elif name == "mask token beyond vocab":
        draft.mask_token_id = 64
    elif name == "dtype":
        draft = draft.double()
    return target, draft


PAIR_CASES = {  # generate(...) on a mismatched pair or with bad engine settings -> error, words
    "hidden size": (ConfigError, "hidden_size 48 differs from the target's 32"),
    "layer beyond the target": (ConfigError, r"target_layer_ids \[1, 4\] are not all layers of the 4-layer"),
    "fc width": (ConfigError, "fc reads 64 features but the target's layers"),
    "mask token beyond vocab": (ConfigError, "mask_token_id 64 is outside the target's vocabulary of 64"),
    "dtype": (ConfigError, "dtype"),
}
SETTING_CASES = {
    "block larger than the draft's": (dict(block_size=5), InputError, "from 2 to 4"),
    "block of one": (dict(block_size=1), InputError, "from 2 to 4"),
    "window below the block": (dict(draft_window_size=3), InputError, "draft_window_size"),
    "unknown executor": (dict(executor="jit"), InputError, "executor must be one of"),
    "graphs without CUDA": (dict(cuda_graphs=True), InputError, "cuda_graphs=True needs"),
}


def assert_refused_untouched(target, draft, error, words, call=None, **kwargs):
    target.setup_cache(1, 8)
    draft.setup_cache(1, 8)
    before = caches(target, draft)
    for c in before:
        c.fill_(7.0)
    with pytest.raises(error, match=words) as info:
        if call is None:
            td.generate(target, draft, PROMPT, max_new_tokens=4, **kwargs)
        else:
            call(target, draft, **kwargs)
    assert_one_sentence(info)
    after = caches(target, draft)
    assert len(after) == len(before) and all(a is b and bool((a == 7).all()) for a, b in zip(after, before))


@pytest.mark.parametrize("case", PAIR_CASES)
def test_mismatched_pairs_are_refused(case):
    assert_refused_untouched(*mismatch(case), *PAIR_CASES[case])


@pytest.mark.parametrize("case", SETTING_CASES)
def test_bad_settings_are_refused(case):
    kwargs, error, words = SETTING_CASES[case]
    assert_refused_untouched(*tiny_pair(0, block_size=4), error, words, **kwargs)


ENGINE_SETTING_CASES = {
    "no rows": (dict(max_batch=0), "max_batch must be a positive integer"),
    "cache shorter than two blocks": (dict(max_seq_len=8), "at least 2 \\* block_size \\+ 1 = 9"),
    "hook on eager modules": (dict(executor="eager", compile_step=lambda gm, kind: gm), "compile_step applies"),
    "inductor on eager modules": (dict(executor="eager", compile_step="inductor"), "compile_step applies"),
    "unknown compile_step": (dict(compile_step="fast"), "compile_step must be 'pipeline', 'inductor', None or a"),
    "steps and an executor": (dict(steps=Steps(print, print, []), executor="eager"), "steps= are run as given"),
}


@pytest.mark.parametrize("case", ENGINE_SETTING_CASES)
def test_bad_engine_settings_are_refused(case):
    kwargs, words = ENGINE_SETTING_CASES[case]
    assert_refused_untouched(*tiny_pair(0, block_size=4), InputError, words, call=td.DFlashEngine,
                             **{"max_seq_len": 32, **kwargs})
