"""crv-tiny: tokenizer round trip and ids, and a micro training run end to end."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crv.models.tiny import TinyConfig, build_model, build_tokenizer, encode_trace, train_tiny
from crv.tasks import generate_problems


def _traces() -> list[str]:
    return [
        p.prompt + p.solution()
        for task in ("arithmetic", "boolean")
        for n in (1, 3, 5, 10)
        for p in generate_problems(task, n, 5, seed=7)
    ]


def test_special_ids():
    tok = build_tokenizer()
    assert tok.pad_token_id == 0
    assert tok.bos_token_id not in (0, None)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert len(tok) < 40


def test_round_trip_on_canonical_traces():
    tok = build_tokenizer()
    for text in _traces():
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    pieces = tok.convert_ids_to_tokens(
        tok("Step 1: True and False=False, so not False")["input_ids"]
    )
    assert pieces[:5] == ["<bos>", "Step ", "1", ":", " "]
    assert " and " in pieces and ", so " in pieces and "not " in pieces


def test_save_load(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in _traces()[:6]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)


def _loss(model, tok, texts: list[str]) -> float:
    losses = []
    with torch.no_grad():
        for text in texts:
            prompt, completion = text.split("\n", 1)
            ids, n_prompt = encode_trace(tok, prompt + "\n", completion)
            labels = torch.tensor([[-100] * n_prompt + ids[n_prompt:]])
            losses.append(model(input_ids=torch.tensor([ids]), labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_micro_training_lowers_loss_and_saves(tmp_path):
    cfg = TinyConfig(
        layers=1,
        hidden=32,
        heads=2,
        intermediate=64,
        context=512,
        tokens=20 * 512,
        batch_tokens=512,
        max_complexity=3,
        curriculum=0.0,
        checkpoint_every=5 * 512,
        threads=1,
    )
    stats = train_tiny(cfg, tmp_path / "m", progress=False)
    assert stats["finished"] and 18 <= stats["steps"] <= 22
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    texts = [p.prompt + p.solution() for p in generate_problems("arithmetic", 2, 8, seed=99)]
    before = _loss(build_model(cfg, tok).eval(), tok, texts)
    after = _loss(model.eval(), tok, texts)
    assert after < before - 0.3
    assert not list(tmp_path.glob(".m.*"))  # no temporary directories left behind

    again = train_tiny(cfg, tmp_path / "m2", progress=False)
    assert again["tokens"] == stats["tokens"]
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
