"""Batched greedy generation: left padding must not change any sequence, eos must stop it."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crv.generation import generate_from_ids, generate_greedy, stop_ids
from crv.models.tiny import build_tokenizer

PROMPTS = [
    "Q: Evaluate 1+2\n",
    "Q: Evaluate ((3*4)-5)+(6*(7+8))\n",
    "Q: Evaluate not (True and False) or True\n",
    "Q: Evaluate 9\n",
    "Q: Evaluate -(4*(2+3))\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: varied, decisive argmaxes
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        model.lm_head.weight[tokenizer.unk_token_id] = 0.0  # logit 0: never the argmax here
    return model.eval()


def _ids(results):
    return [r.completion_ids for r in results]


def test_batched_equals_unbatched(model, tokenizer):
    single = generate_greedy(model, tokenizer, PROMPTS, 12, batch_size=1)
    batched = generate_greedy(model, tokenizer, PROMPTS, 12, batch_size=3)
    assert _ids(single) == _ids(batched)
    for prompt, r in zip(PROMPTS, batched, strict=True):
        assert r.prompt == prompt
        assert r.prompt_ids == tokenizer(prompt)["input_ids"]
        assert r.prompt_ids[0] == tokenizer.bos_token_id
        assert r.completion == tokenizer.decode(r.completion_ids, skip_special_tokens=True)


def test_per_prompt_caps(model, tokenizer):
    caps = {p: 3 + i for i, p in enumerate(PROMPTS)}
    results = generate_greedy(model, tokenizer, PROMPTS, caps.__getitem__, batch_size=5)
    full = generate_greedy(model, tokenizer, PROMPTS, 20, batch_size=5)
    for p, r, f in zip(PROMPTS, results, full, strict=True):
        assert r.completion_ids == f.completion_ids[: caps[p]]


def test_stops_at_eos(model, tokenizer, monkeypatch):
    # Make a token the model writes mid-sequence the eos token: every sequence must end
    # just before its first occurrence, batched or not. The model's generation config's
    # own end token would stop it too (tested below), so it is cleared here.
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)
    never = build_tokenizer()
    never.eos_token = "<unk>"  # the model never writes it, see the fixture
    free = generate_greedy(model, never, PROMPTS, 16, batch_size=5)
    assert not any(f.stopped_at_eos for f in free)
    stop_id = free[1].completion_ids[4]
    stopper = build_tokenizer()
    stopper.eos_token = stopper.convert_ids_to_tokens(stop_id)
    assert stopper.eos_token_id == stop_id
    for batch_size in (1, 2, 5):
        results = generate_greedy(model, stopper, PROMPTS, 16, batch_size=batch_size)
        for f, r in zip(free, results, strict=True):
            ids = f.completion_ids
            expected = ids[: ids.index(stop_id)] if stop_id in ids else ids
            assert r.completion_ids == expected
            assert r.stopped_at_eos == (stop_id in ids)
            assert stop_id not in r.completion_ids


def test_stop_patterns_end_a_completion_where_they_first_match(model, tokenizer):
    free = generate_greedy(model, tokenizer, PROMPTS, 16, batch_size=5)
    text = free[1].completion
    assert len(text) > 6
    target = text[3:6]  # stop once this text has been written
    results = generate_greedy(
        model, tokenizer, PROMPTS, 16, batch_size=2, stop_patterns=[re.escape(target)]
    )
    for f, r in zip(free, results, strict=True):
        assert r.completion_ids == f.completion_ids[: len(r.completion_ids)]
        assert r.completion == tokenizer.decode(r.completion_ids, skip_special_tokens=True)
        if target in f.completion:
            assert r.stopped_at_eos and target in r.completion
            shorter = tokenizer.decode(r.completion_ids[:-1], skip_special_tokens=True)
            assert target not in shorter  # ends at the token that completes the match
        else:
            assert r.completion_ids == f.completion_ids
    assert results[1].stopped_at_eos and len(results[1].completion_ids) < len(
        free[1].completion_ids
    )


def test_the_generation_configs_end_tokens_stop_too(model, tokenizer, monkeypatch):
    free = generate_greedy(model, tokenizer, PROMPTS, 16, batch_size=5)
    stop_id = free[2].completion_ids[3]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, stop_id])
    assert stop_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, stop_id})
    results = generate_greedy(model, tokenizer, PROMPTS, 16, batch_size=5)
    for f, r in zip(free, results, strict=True):
        ids = f.completion_ids
        assert r.completion_ids == (ids[: ids.index(stop_id)] if stop_id in ids else ids)


def test_progress_moves_per_finished_prompt(model, tokenizer):
    finished = []
    generate_from_ids(
        model,
        [tokenizer(p)["input_ids"] for p in PROMPTS],
        [2, 4, 6, 8, 10],
        tokenizer.unk_token_id,  # never written: every prompt runs to its cap
        tokenizer.pad_token_id,
        torch.device("cpu"),
        on_done=finished.append,
    )
    assert finished == [1, 1, 1, 1, 1]


def test_generate_greedy_reports_each_finished_prompt_to_its_caller(model, tokenizer):
    """The traces stage's bar spans several calls (batches) and moves per prompt."""
    finished = []
    caps = dict(zip(PROMPTS, [2, 4, 6, 8, 10], strict=True))
    generate_greedy(
        model, tokenizer, PROMPTS, caps.__getitem__, len(PROMPTS), progress=False,
        on_done=finished.append,
    )  # fmt: skip
    assert sum(finished) == len(PROMPTS) and len(finished) > 1
