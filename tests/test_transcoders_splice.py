"""Splicing transcoders into a model, feature interventions, evaluation and the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import random_transcoder_set, tiny_llama

from crv.transcoders.config import TranscodersConfig
from crv.transcoders.evaluate import evaluate_transcoders
from crv.transcoders.module import TopKTranscoder, TranscoderSet
from crv.transcoders.splice import FeatureIntervention, splice

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_llama().requires_grad_(False)


@pytest.fixture(scope="module")
def adapter(tiny_model: torch.nn.Module):  # noqa: ANN201
    from crv.models.adapter import ArchAdapter

    return ArchAdapter.for_model(tiny_model)


@pytest.fixture(scope="module")
def tset() -> TranscoderSet:
    def init(tc: TopKTranscoder, _: torch.Generator) -> None:
        tc.b_enc.fill_(0.05)
        tc.W_dec.mul_(0.05)

    return random_transcoder_set(32, 64, 4, (0, 1), init=init)


IDS = torch.tensor([[1, 7, 3, 9, 12, 5, 44, 2, 8, 30]])


def _mlp_outputs(model: torch.nn.Module, adapter, layer: int, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Layer `layer`'s MLP output as the rest of the model sees it (hook added last)."""
    seen = []
    handle = adapter.mlp(layer).register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def test_splice_with_error_reproduces_clean_logits(tiny_model, adapter, tset) -> None:  # noqa: ANN001
    clean = tiny_model(input_ids=IDS).logits
    with splice(adapter, tset, add_error=True):
        spliced = tiny_model(input_ids=IDS).logits
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)
    with splice(adapter, tset):
        replaced = tiny_model(input_ids=IDS).logits
    assert (replaced - clean).abs().max() > 1e-4  # without the error term the model changes
    torch.testing.assert_close(tiny_model(input_ids=IDS).logits, clean)  # hooks removed


@pytest.mark.parametrize("action", ["zero", "scale", "clamp"])
def test_intervention_changes_exactly_that_feature(tiny_model, adapter, tset, action: str) -> None:  # noqa: ANN001
    with splice(adapter, tset, add_error=True, record=True) as handle:
        base = _mlp_outputs(tiny_model, adapter, 0, IDS)
    rec = handle.records[0][0]
    # A feature active at position 4 (zero/scale) or one inactive there (clamp).
    active = rec.idx_BTK[0, 4][rec.acts_BTK[0, 4] > 0]
    feature = (
        int(active[0])
        if action != "clamp"
        else int(next(f for f in range(64) if f not in rec.idx_BTK[0, 4]))
    )
    old = float((rec.acts_BTK[0, 4] * (rec.idx_BTK[0, 4] == feature)).sum())
    new = {"zero": 0.0, "scale": old * 3.0, "clamp": 2.5}[action]
    iv = FeatureIntervention(
        layer=0,
        feature=feature,
        positions=[4, 7],
        action=action,
        value=3.0 if action == "scale" else 2.5,
    )
    with splice(adapter, tset, add_error=True, interventions=[iv]):
        edited = _mlp_outputs(tiny_model, adapter, 0, IDS)
    diff = edited - base
    torch.testing.assert_close(
        diff[0, 4], (new - old) * tset[0].W_dec[feature], atol=1e-6, rtol=1e-5
    )
    others = [p for p in range(IDS.shape[1]) if p not in (4, 7)]
    assert diff[0, others].abs().max() == 0
    old_7 = float((rec.acts_BTK[0, 7] * (rec.idx_BTK[0, 7] == feature)).sum())
    new_7 = {"zero": 0.0, "scale": old_7 * 3.0, "clamp": 2.5}[action]
    torch.testing.assert_close(
        diff[0, 7], (new_7 - old_7) * tset[0].W_dec[feature], atol=1e-6, rtol=1e-5
    )


def test_interventions_restricted_to_rows_leave_other_rows_clean(tiny_model, adapter, tset) -> None:  # noqa: ANN001
    a = FeatureIntervention(layer=1, feature=3, positions=[2, 8], action="clamp", value=4.0)
    b = FeatureIntervention(layer=0, feature=5, positions=None, action="clamp", value=3.0)
    with splice(adapter, tset, add_error=True, interventions=[a]):
        only_a = tiny_model(input_ids=IDS).logits[0]
    with splice(adapter, tset, add_error=True, interventions=[b]):
        only_b = tiny_model(input_ids=IDS).logits[0]
    rows = [
        FeatureIntervention(**{**a.__dict__, "rows": (1,)}),
        FeatureIntervention(**{**b.__dict__, "rows": (2,)}),
    ]
    with splice(adapter, tset, add_error=True, interventions=rows):
        batch = tiny_model(input_ids=IDS.repeat(3, 1)).logits
    torch.testing.assert_close(batch[0], tiny_model(input_ids=IDS).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], only_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[2], only_b, atol=1e-5, rtol=0)


def test_interventions_use_absolute_positions_with_kv_cache(tiny_model, adapter, tset) -> None:  # noqa: ANN001
    iv = FeatureIntervention(layer=1, feature=3, positions=[2, 8], action="clamp", value=4.0)
    with splice(adapter, tset, add_error=True, interventions=[iv]):
        full = tiny_model(input_ids=IDS).logits
        out = tiny_model(input_ids=IDS[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, IDS.shape[1]):
            out = tiny_model(input_ids=IDS[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert (full - tiny_model(input_ids=IDS).logits)[0, 8].abs().max() > 1e-4


def test_trained_transcoders_beat_mean_predictor(tiny_model, adapter, monkeypatch) -> None:  # noqa: ANN001
    from crv.transcoders.activations import training_batches
    from crv.transcoders.train import TranscoderTrainer

    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (40,), generator=gen).tolist() for _ in range(60)]
    cfg = TranscodersConfig(
        k=8,
        expansion=4,
        tokens=40_000,
        batch_tokens=512,
        lr=3e-3,
        shuffle_buffer_tokens=2048,
        lr_warmup_steps=5,
    )
    trainer = TranscoderTrainer(cfg, adapter.d_model, [0, 1], seed=0)
    trainer.train(
        training_batches(cfg, tiny_model, adapter, seqs[:50], [0, 1], gen), progress=False
    )
    report = evaluate_transcoders(
        tiny_model, adapter, trainer.transcoder_set(), seqs[50:], batch_seqs=8
    )
    assert {
        "layers",
        "ce_clean",
        "ce_spliced",
        "ce_zero",
        "ce_loss_recovered",
        "kl_spliced",
    } <= set(report)
    for row in report["layers"]:
        assert (
            row["fvu"] < 0.5 and row["l0"] <= 8 and 0 <= row["dead_frac"] <= 1 and row["cos"] > 0.7
        )
    assert report["kl_spliced"] >= 0
    assert all("ce_loss_recovered" in row for row in report["layers"])

    # Without per-layer CE the all-layer numbers are the same and no layer row has CE.
    lean = evaluate_transcoders(
        tiny_model, adapter, trainer.transcoder_set(), seqs[50:], batch_seqs=8, per_layer_ce=False
    )
    for key in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced"):
        assert lean[key] == pytest.approx(report[key], rel=1e-6)
    assert not any("ce_loss_recovered" in row for row in lean["layers"])
    assert [row["fvu"] for row in lean["layers"]] == [row["fvu"] for row in report["layers"]]

    # A logits budget of one short sequence per forward changes the batching, not the numbers.
    import crv.transcoders.evaluate as evaluate

    one_seq = 4 * max(len(s) for s in seqs[50:]) * adapter.vocab_size
    assert evaluate.logits_batch_seqs(seqs[50:], 8, adapter.vocab_size) == 8
    monkeypatch.setattr(evaluate, "LOGITS_BUDGET_BYTES", one_seq)
    assert evaluate.logits_batch_seqs(seqs[50:], 8, adapter.vocab_size) == 1
    small = evaluate_transcoders(
        tiny_model, adapter, trainer.transcoder_set(), seqs[50:], batch_seqs=8, per_layer_ce=False
    )
    for key in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced"):
        assert small[key] == pytest.approx(report[key], rel=1e-5)


def test_stage_writes_loadable_set_and_eval(tmp_path: Path, tiny_model) -> None:  # noqa: ANN001
    loading = pytest.importorskip("crv.models.loading")
    import logging

    from datasets import Dataset

    from crv.io import read_json
    from crv.models.tiny import build_tokenizer
    from crv.pipeline import StageContext
    from crv.transcoders.io import load_transcoder_set
    from crv.transcoders.stage import run_stage

    subject = tmp_path / "subject"
    tiny_model.save_pretrained(subject)
    build_tokenizer().save_pretrained(subject)
    loading.load_subject(subject, "cpu")
    gen = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": [1, *torch.randint(3, 30, (30,), generator=gen).tolist()],
            "split": "test" if i % 4 == 0 else "train",
        }
        for i in range(24)
    ]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "traces" / "dataset"))
    out = tmp_path / "out"
    out.mkdir()
    cfg = TranscodersConfig(
        k=4, expansion=2, tokens=2048, batch_tokens=256, shuffle_buffer_tokens=512
    )
    ctx = StageContext(
        "transcoders",
        cfg,
        {"subject": subject, "traces": tmp_path / "traces"},
        out,
        tmp_path / "scratch",
        0,
        "cpu",
        logging.getLogger("test"),
    )
    report = run_stage(ctx)
    assert read_json(out / "eval.json")["ce_clean"] == report["ce_clean"]
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    assert load_transcoder_set(out).layers == [0, 1]
