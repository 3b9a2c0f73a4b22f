"""Feature cards: the streaming top-n, the logit effects, the one-pass card computation,
the artifact round trip and labels, and the labels crv-verify prints from a bundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import random_transcoder_set, tiny_llama
from fixtures_bundle import ATTRIBUTION, FEATURES, N_LAYERS, PROMPT, STEPS, build_parts

from crv.cards.config import CardsConfig
from crv.cards.stage import compute_cards, logit_effects
from crv.cards.store import CardArrays, load_feature_cards, save_cards
from crv.cards.topk import StreamingTopK
from crv.models.adapter import ArchAdapter


def brute_top_n(feature, value, order, payload, n_features, n):
    """Every entry sorted per feature by value (desc), then stream order (asc)."""
    out = {}
    for f in range(n_features):
        idx = np.flatnonzero(feature == f)
        idx = idx[np.lexsort((order[idx], -value[idx]))][:n]
        out[f] = (value[idx], order[idx], payload[idx])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_top_n_equals_brute_force_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    n_features, n, width = 7, 3, 2
    tracker = StreamingTopK(n_features, n, width)
    all_f, all_v, all_o, all_p = [], [], [], []
    seen = 0
    for _ in range(6):
        n_tokens = int(rng.integers(1, 9))
        order_N = seen + np.arange(n_tokens)
        payload_NP = rng.integers(0, 100, size=(n_tokens, width))
        m = int(rng.integers(0, 20))
        token_M = rng.integers(0, n_tokens, size=m)
        feature_M = rng.integers(0, n_features - 1, size=m)  # the last feature never occurs
        value_M = rng.integers(-3, 4, size=m).astype(np.float32)  # many ties
        tracker.update(feature_M, value_M, token_M, order_N, payload_NP)
        all_f.append(feature_M)
        all_v.append(value_M)
        all_o.append(order_N[token_M])
        all_p.append(payload_NP[token_M])
        seen += n_tokens
    expected = brute_top_n(*map(np.concatenate, (all_f, all_v, all_o, all_p)), n_features, n)
    for f, (vals, orders, payloads) in expected.items():
        k = len(vals)
        assert tracker.counts()[f] == k
        np.testing.assert_array_equal(tracker.values_FN[f, :k], vals)
        np.testing.assert_array_equal(tracker.order_FN[f, :k], orders)
        np.testing.assert_array_equal(tracker.payload_FNP[f, :k], payloads)
        assert np.all(np.isneginf(tracker.values_FN[f, k:]))
    assert tracker.counts()[-1] == 0


def test_logit_effects_equal_a_hand_computation():
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W_U = torch.tensor([[2.0, 0.5], [0.0, -1.0], [1.0, 1.0], [-3.0, 0.2]])
    # feature 0 -> logits [2, 0, 1, -3]; feature 1 -> [0.5, -1, 1, 0.2]
    up_id, up_val, down_id, down_val = logit_effects(W_dec, W_U, 2, chunk=1)
    np.testing.assert_array_equal(up_id, [[0, 2], [2, 0]])
    np.testing.assert_allclose(up_val, [[2.0, 1.0], [1.0, 0.5]])
    np.testing.assert_array_equal(down_id, [[3, 1], [1, 3]])
    np.testing.assert_allclose(down_val, [[-3.0, 0.0], [-1.0, 0.2]])


def test_logit_effects_go_in_chunks_that_fit_the_budget(monkeypatch):
    """Rows go as many at a time as the logits budget holds; the result does not depend on
    it."""
    import crv.cards.stage as cards_stage

    gen = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(10, 8, generator=gen), torch.randn(50, 8, generator=gen)
    whole = logit_effects(W_dec, W_U, 3, chunk=10)
    seen = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor, "topk", lambda t, *a, **k: seen.append(t.shape[0]) or real_topk(t, *a, **k)
    )
    monkeypatch.setattr(cards_stage, "LOGITS_BUDGET_BYTES", 3 * 50 * 4)  # 3 rows of logits
    chunked = logit_effects(W_dec, W_U, 3)
    assert max(seen) == 3 and sum(seen) == 2 * 10
    for a, b in zip(whole, chunked, strict=True):  # ids, values (matmul shapes: last bits)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_compute_cards_matches_a_direct_pass():
    """Batched streaming cards equal frequencies and top activations computed from one
    forward pass per sequence, and every context window is the sequence around the token."""
    model = tiny_llama(0)
    adapter = ArchAdapter.for_model(model)
    tset = random_transcoder_set(32, 64, 4, range(2), seed=0)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 50, size=int(rng.integers(2, 12))).tolist() for _ in range(9)]
    cfg = CardsConfig(n_contexts=3, context_before=2, context_after=1, runtime_batch_seqs=2)
    cards, n_tokens = compute_cards(model, adapter, tset, seqs, cfg)
    assert n_tokens == sum(len(s) - 1 for s in seqs)

    captured = {}
    hooks = [
        adapter.mlp(layer).register_forward_hook(
            lambda _m, inp, _o, layer=layer: captured.__setitem__(layer, inp[0][0])
        )
        for layer in range(2)
    ]
    entries = {layer: [] for layer in range(2)}  # (feature, value, row, pos)
    with torch.no_grad():
        for row, seq in enumerate(seqs):
            model(input_ids=torch.tensor([seq]))
            for layer in range(2):
                acts, idx = tset[layer].encode(captured[layer][1:])
                for pos, (a_k, i_k) in enumerate(
                    zip(acts.tolist(), idx.tolist(), strict=True), start=1
                ):
                    entries[layer] += [
                        (f, a, row, pos) for a, f in zip(a_k, i_k, strict=True) if a != 0
                    ]
    for h in hooks:
        h.remove()
    for layer in range(2):
        arr = cards[layer]
        counts = np.bincount([e[0] for e in entries[layer]], minlength=64)
        np.testing.assert_array_equal(arr.count, counts)
        for f in range(64):
            best = sorted((e for e in entries[layer] if e[0] == f), key=lambda e: -e[1])[:3]
            k = len(best)
            np.testing.assert_allclose(arr.top_value[f, :k], [e[1] for e in best], rtol=1e-5)
            for slot in range(k):
                row, pos = arr.top_row[f, slot], arr.top_pos[f, slot]
                padded = [-1, -1, *seqs[row], -1]
                np.testing.assert_array_equal(arr.top_window[f, slot], padded[pos : pos + 4])
        up_id, *_ = logit_effects(tset[layer].W_dec, adapter.unembed_weight, 5)
        np.testing.assert_array_equal(arr.promote_id, up_id)


class _Tokenizer:
    """Decodes token id i as the string in `PIECES[i]`."""

    PIECES = ["<bos>", "7", "*", "8", "=", "5", "6", "\n"]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.PIECES[i] for i in ids)


def hand_cards() -> dict[int, CardArrays]:
    """Layer 2, three features: 0 fires on "7" twice and "8" once, 1 never fires,
    2 fires once on "*" at the start of a trace."""
    neg = -np.inf
    windows = np.full((3, 3, 3), -1, dtype=np.int32)
    windows[0] = [[2, 1, 4], [6, 1, 2], [2, 3, 4]]  # "*7=", "67*", "*8="
    windows[2, 0] = [-1, 2, 1]  # "*7" with nothing before
    return {
        2: CardArrays(
            count=np.array([5, 0, 1]),
            top_value=np.array([[3.0, 2.0, 1.0], [neg] * 3, [0.5, neg, neg]], dtype=np.float32),
            top_row=np.array([[0, 1, 1], [-1] * 3, [1, -1, -1]], dtype=np.int32),
            top_pos=np.array([[4, 2, 6], [-1] * 3, [1, -1, -1]], dtype=np.int32),
            top_window=windows,
            promote_id=np.array([[3, 5], [6, 3], [7, 1]], dtype=np.int32),
            promote_value=np.ones((3, 2), dtype=np.float32),
            suppress_id=np.array([[5, 3], [3, 6], [1, 7]], dtype=np.int32),
            suppress_value=-np.ones((3, 2), dtype=np.float32),
        )
    }


def test_cards_round_trip_card_and_label(tmp_path: Path):
    cfg = CardsConfig(n_contexts=3, context_before=1, context_after=1)
    save_cards(tmp_path, hand_cards(), 10, _Tokenizer(), ["t0", "t1"], cfg)
    cards = load_feature_cards(tmp_path)
    assert cards.label(2, 0) == 'on "7" 2/3 → "8"'
    assert cards.label(2, 1) == 'never active → "6"'
    assert cards.label(2, 2) == 'on "*" → "\\n"'
    card = cards.card(2, 0)
    assert card["frequency"] == 0.5
    assert [c["text"] for c in card["top_contexts"]] == ["*7=", "67*", "*8="]
    assert [c["token"] for c in card["top_contexts"]] == ["7", "7", "8"]
    assert [c["token_start"] for c in card["top_contexts"]] == [1, 1, 1]
    assert [c["trace_id"] for c in card["top_contexts"]] == ["t0", "t1", "t1"]
    assert [c["activation"] for c in card["top_contexts"]] == [3.0, 2.0, 1.0]
    assert card["promotes"] == [{"token": "8", "value": 1.0}, {"token": "5", "value": 1.0}]
    assert [s["token"] for s in card["suppresses"]] == ["5", "8"]
    assert cards.top_contexts(2, 2) == [
        {"text": "*7", "token": "*", "token_start": 0, "activation": 0.5, "trace_id": "t1",
         "position": 1}
    ]  # fmt: skip
    with pytest.raises(KeyError, match="layer 0"):
        cards.label(0, 0)
    with pytest.raises(KeyError, match="feature 3 out of range"):
        cards.card(2, 3)


def test_load_feature_cards_names_a_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="cards.json"):
        load_feature_cards(tmp_path)


def test_crv_verify_labels_top_features_from_the_bundle_cards(tmp_path: Path):
    from crv.bundle import BundleConfig, export_bundle, load_bundle
    from crv.check.config import VerifyConfig
    from crv.check.inputs import Trace
    from crv.check.scorer import StepVerifier
    from crv.models.loading import load_subject
    from crv.transcoders.io import load_transcoder_set

    parts = build_parts(tmp_path / "parts")
    model, tokenizer = load_subject(parts["subject_dir"])
    tset = load_transcoder_set(parts["transcoders_dir"])
    seqs = [tokenizer(PROMPT + "\n".join(STEPS))["input_ids"]] * 2
    cfg = CardsConfig(n_contexts=2)
    cards, n_tokens = compute_cards(model, ArchAdapter.for_model(model), tset, seqs, cfg)
    save_cards(tmp_path / "cards", cards, n_tokens, tokenizer, ["a", "b"], cfg)
    export_bundle(
        tmp_path / "bundle",
        BundleConfig(),
        subject_dir=parts["subject_dir"],
        transcoders_dir=parts["transcoders_dir"],
        method_dir=parts["verifier_dir"],
        threshold=0.5,
        graphs=dataclasses.asdict(ATTRIBUTION),
        features=dataclasses.asdict(FEATURES),
        n_layers=N_LAYERS,
        seed=0,
        cards_dir=tmp_path / "cards",
    )
    bundle = load_bundle(tmp_path / "bundle")
    spans, start = [], 0
    completion = "\n".join(STEPS)
    for step in STEPS:
        spans.append((start, start + len(step)))
        start += len(step) + 1
    verifier = StepVerifier(bundle, VerifyConfig(top_features=3))
    records = verifier.verify(Trace(1, "x", PROMPT, completion, spans))
    labelled = [f for r in records for f in r["top_features"]]
    assert labelled
    saved = load_feature_cards(tmp_path / "cards")
    for f in labelled:
        assert f["label"] == saved.label(f["layer"], f["feature"])
        assert f["label"].startswith("on ")  # a graph feature was active, so it has contexts
