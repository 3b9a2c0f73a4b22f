"""Baselines on a tiny random Llama, CoE by hand, temperature fit, the position baseline."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factories import random_transcoder_set, tiny_llama

from crv.baselines.config import BaselinesConfig
from crv.baselines.scores import (
    POOLINGS,
    SCORE_COLUMNS,
    coe_scores,
    fit_temperature,
    load_baseline_meta,
    load_baseline_table,
    load_hidden_states,
    load_latents,
    load_probe_inputs,
    resolve_probe_layer,
    trace_step_scores,
)
from crv.baselines.stage import baseline_table, run_stage
from crv.pipeline import StageContext
from crv.traces.steps import KEY_COLUMNS
from crv.verifier.config import VerifierConfig
from crv.verifier.methods import POSITION_COLUMNS, ProbeData, build_methods, fit_method


@pytest.fixture(scope="module", name="tiny_llama")
def tiny_llama_fixture():
    return tiny_llama(
        vocab_size=40, num_hidden_layers=4, num_key_value_heads=4, max_position_embeddings=128
    )


IDS = [1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33]
SPANS = [(4, 8), (9, 12), (13, 15)]  # prompt of 4 tokens, three steps


def test_scores_are_finite_and_shaped(tiny_llama):
    scores, probe, conf, hidden, latents = trace_step_scores(
        tiny_llama, IDS, SPANS, BaselinesConfig()
    )
    assert set(scores) == set(SCORE_COLUMNS) - {"temperature"}
    for v in scores.values():
        assert v.shape == (3,) and np.all(np.isfinite(v))
    assert probe.shape == (3, 32) and probe.dtype == np.float32
    assert conf.shape == (3, len(BaselinesConfig().temperature_grid))
    assert np.all(np.diff(conf, axis=1) <= 1e-9)  # hotter = less confident
    assert np.all((scores["maxprob"] > 0) & (scores["maxprob"] < 1)) and np.all(
        scores["perplexity"] >= 1
    )
    assert hidden.shape == (3, len(POOLINGS), 5, 32) and hidden.dtype == np.float16
    assert latents is None


def test_hidden_states_pooled_three_ways_over_each_step(tiny_llama):
    """Every layer's hidden state pooled over the step's own tokens: mean, last token, max."""
    out = trace_step_scores(tiny_llama, IDS, SPANS, BaselinesConfig(), hidden_layers=[0, 2, 4])
    with torch.no_grad():
        states = tiny_llama(input_ids=torch.tensor([IDS]), output_hidden_states=True).hidden_states
    for i, (first, last) in enumerate(SPANS):
        for j, layer in enumerate([0, 2, 4]):
            block = states[layer][0, first : last + 1].numpy()
            expected = [block.mean(0), block[-1], block.max(0)]
            for p, want in enumerate(expected):
                np.testing.assert_allclose(out.hidden[i, p, j], want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(out.hidden[:, 0, 1], out.probe, rtol=2e-3, atol=2e-3)


def test_latents_are_the_transcoders_codes_of_the_mlp_inputs_pooled(tiny_llama):
    from crv.models.adapter import ArchAdapter

    tset = random_transcoder_set(32, 24, 3, [1, 3], seed=1)
    out = trace_step_scores(tiny_llama, IDS, SPANS, BaselinesConfig(), transcoders=tset)
    captured = {}
    adapter = ArchAdapter.for_model(tiny_llama)
    handles = [
        adapter.mlp(layer).register_forward_hook(
            lambda _m, inp, _o, layer=layer: captured.__setitem__(layer, inp[0][0])
        )
        for layer in (1, 3)
    ]
    with torch.no_grad():
        tiny_llama(input_ids=torch.tensor([IDS]))
    for h in handles:
        h.remove()
    from crv.baselines.scores import latent_layout

    layout = latent_layout(tset)
    assert out.latents.shape == (3, layout.n_columns)
    dense = out.latents.toarray()
    for layer in (1, 3):
        with torch.no_grad():
            acts, idx = tset[layer].encode(captured[layer])
        codes = torch.zeros(len(IDS), 24).scatter_(1, idx, acts).numpy()
        for i, (first, last) in enumerate(SPANS):
            block = codes[first : last + 1]
            for pooling, want in zip(
                POOLINGS, [block.mean(0), block[-1], block.max(0)], strict=True
            ):
                cols = [layout.column(layer, j, pooling) for j in range(24)]
                np.testing.assert_allclose(dense[i, cols], want, rtol=1e-5, atol=1e-6)
    assert layout.describe(layout.column(3, 7, "max")) == (3, 7, "max")


def test_step_scores_read_the_predictions_of_the_step_tokens(tiny_llama):
    """Each step scores the predictions of its own tokens (logits at first-1 .. last-1),
    computed here from one plain forward pass over the whole trace."""
    scores = trace_step_scores(tiny_llama, IDS, SPANS, BaselinesConfig(coe=False)).scores
    with torch.no_grad():
        logp_TV = tiny_llama(input_ids=torch.tensor([IDS])).logits[0].float().log_softmax(-1)
    for i, (first, last) in enumerate(SPANS):
        pred = logp_TV[first - 1 : last]
        assert scores["maxprob"][i] == pytest.approx(float((1 - pred.max(-1).values.exp()).mean()))
        nll = -pred.gather(1, torch.tensor(IDS[first : last + 1])[:, None])[:, 0]
        assert scores["perplexity"][i] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_flatter_logits_raise_uncertainty_scores(tiny_llama):
    sharp_model, flat_model = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    with torch.no_grad():
        sharp_model.lm_head.weight.mul_(20.0)
        flat_model.lm_head.weight.mul_(0.05)
    sharp = trace_step_scores(sharp_model, IDS, SPANS, BaselinesConfig(coe=False)).scores
    flat = trace_step_scores(flat_model, IDS, SPANS, BaselinesConfig(coe=False)).scores
    assert np.all(flat["maxprob"] > sharp["maxprob"])
    assert np.all(flat["entropy"] > sharp["entropy"])
    assert np.allclose(flat["entropy"], math.log(40), atol=0.05)  # nearly uniform


def test_coe_by_hand():
    # h0 = (1, 0), h1 = (1, 1), h2 = (0, 1): steps of length 1, total sqrt(2);
    # 45 degrees per step out of 90 in total.
    chain = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    coe_r, coe_c = coe_scores(chain)
    assert coe_r == pytest.approx(-(1 / math.sqrt(2) - 0.5))
    assert coe_c == pytest.approx(-1 / math.sqrt(2))


def test_fit_temperature_picks_best_calibrated():
    grid = [0.5, 1.0, 2.0]
    correct = np.r_[np.ones(70), np.zeros(30)]
    conf = np.tile([0.99, 0.7, 0.4], (100, 1))  # only T = 1 matches the 70% accuracy
    assert fit_temperature(conf, correct, grid)[0] == 1.0
    assert resolve_probe_layer(None, 5) == 2 and resolve_probe_layer(-1, 5) == 4


def two_traces():
    """A train trace with a correct, an incorrect and an unlabelled step; a test trace."""
    from datasets import Dataset

    def steps(lasts, labels):
        return [
            {"index": i, "text": "", "label": lab, "parsed": True, "last_token": t}
            for i, (t, lab) in enumerate(zip(lasts, labels, strict=True))
        ]

    return Dataset.from_list(
        [
            {
                "id": "a",
                "task": "arithmetic",
                "complexity": 3,
                "split": "train",
                "prompt_len": 4,
                "input_ids": IDS,
                "steps": steps([8, 12, 15], [True, False, None]),
            },
            {
                "id": "b",
                "task": "arithmetic",
                "complexity": 5,
                "split": "test",
                "prompt_len": 3,
                "input_ids": IDS[:10],
                "steps": steps([6, 9], [True, True]),
            },
        ]
    )


def test_baseline_table_on_traces(tiny_llama):
    traces = two_traces()
    table, hidden, _, _, meta = baseline_table(tiny_llama, traces, BaselinesConfig())
    assert list(table.columns) == [*KEY_COLUMNS, *SCORE_COLUMNS]
    assert table["step_id"].tolist() == ["a:0", "a:1", "a:2", "b:0", "b:1"]
    assert table["label"].tolist() == [0, 1, -1, 0, 0]
    assert hidden.shape == (5, 32)
    assert meta["temperature"] in BaselinesConfig().temperature_grid and meta["probe_layer"] == 2
    assert np.all(np.isfinite(table[list(SCORE_COLUMNS)].to_numpy()))
    single = trace_step_scores(tiny_llama, IDS, SPANS, BaselinesConfig()).scores
    np.testing.assert_allclose(table["maxprob"].to_numpy()[:3], single["maxprob"], rtol=1e-6)


def test_position_baseline_uses_only_its_three_columns():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame(
        {
            "trace_id": [f"t{i // 4}" for i in range(n)],
            "step": np.tile(np.arange(4), n // 4),
            "n_prefix_tokens": rng.integers(10, 90, n),
            "complexity": rng.choice([3, 5, 7], n),
            "f0": rng.normal(size=n),
            "maxprob": rng.random(n),
        }
    )
    df["label"] = (rng.random(n) < 0.1 + 0.2 * df["step"] / 3).astype(int)
    cfg = VerifierConfig(n_estimators=20, early_stopping_rounds=5, runtime_n_threads=1)
    position = next(
        m
        for m in build_methods(cfg, ["f0"], ["maxprob"], ProbeData(np.zeros((n, 2))), 0)
        if m.name == "position"
    )
    assert position.inputs(df).shape == (n, 3)
    scorer, _ = fit_method(position, df)
    assert scorer.feature_names == list(POSITION_COLUMNS)
    shuffled = df.assign(f0=rng.permutation(df["f0"]), maxprob=0.0, trace_id="x")
    np.testing.assert_array_equal(
        scorer.score(position.inputs(df)), scorer.score(position.inputs(shuffled))
    )


def test_stage_scores_traces_through_scratch_files_and_resumes(tiny_llama, tmp_path: Path):
    """The stage's table (each trace scored into a scratch file, then merged) is the
    in-memory `baseline_table`; a rerun reuses the traces whose file is there."""
    from crv.models.tiny import build_tokenizer

    tiny_llama.save_pretrained(tmp_path / "subject")
    build_tokenizer().save_pretrained(tmp_path / "subject")
    two_traces().save_to_disk(str(tmp_path / "traces" / "dataset"))
    from crv.transcoders.io import load_transcoder_set, save_transcoder_set

    save_transcoder_set(random_transcoder_set(32, 24, 3, [0, 2], seed=2), tmp_path / "tc")
    tset = load_transcoder_set(tmp_path / "tc")
    cfg = BaselinesConfig()

    def run(out: str) -> dict:
        (tmp_path / out).mkdir()
        ctx = StageContext(
            name="baselines",
            cfg=cfg,
            inputs={
                "subject": tmp_path / "subject",
                "traces": tmp_path / "traces",
                "transcoders": tmp_path / "tc",
            },
            out=tmp_path / out,
            scratch=tmp_path / "scratch",
            seed=0,
            device="cpu",
            log=logging.getLogger("test"),
        )
        return run_stage(ctx)

    assert run("out1")["n_resumed_traces"] == 0
    table, hidden, pooled, latents, meta = baseline_table(
        tiny_llama, two_traces(), cfg, transcoders=tset
    )
    pd.testing.assert_frame_equal(load_baseline_table(tmp_path / "out1"), table)
    np.testing.assert_array_equal(load_probe_inputs(tmp_path / "out1"), hidden)
    np.testing.assert_array_equal(load_hidden_states(tmp_path / "out1")[0], pooled)
    saved, layout = load_latents(tmp_path / "out1")
    assert layout.layers == (0, 2) and latents.nnz > 0
    np.testing.assert_array_equal(saved.toarray(), latents.toarray())
    assert load_baseline_meta(tmp_path / "out1") == meta
    files = sorted((tmp_path / "scratch" / "scores").iterdir())
    assert len(files) == 2
    files[1].unlink()
    assert run("out2")["n_resumed_traces"] == 1
    pd.testing.assert_frame_equal(load_baseline_table(tmp_path / "out2"), table)


def test_step_inputs_from_trace_scores_stack_the_traces(tiny_llama):
    """What a bundle builds for a user's traces: the rows of each trace in order, the
    temperature column at T*, hidden states and latents stacked."""
    from crv.baselines.scores import latent_layout
    from crv.verifier.methods import StepInputs

    tset = random_transcoder_set(32, 24, 3, [1], seed=1)
    cfg = BaselinesConfig()
    a = trace_step_scores(tiny_llama, IDS, SPANS, cfg, transcoders=tset)
    b = trace_step_scores(tiny_llama, IDS[:10], [(4, 6), (7, 9)], cfg, transcoders=tset)
    t_star = cfg.temperature_grid[7]
    x = StepInputs.from_trace_scores(
        [a, b], t_star, cfg.temperature_grid, list(range(5)), latent_layout(tset)
    )
    assert len(x.scores) == 5 and x.hidden.hidden.shape == (5, 3, 5, 32)
    np.testing.assert_allclose(x.scores["temperature"], 1 - np.r_[a.conf[:, 7], b.conf[:, 7]])
    np.testing.assert_array_equal(
        x.scores["maxprob"], np.r_[a.scores["maxprob"], b.scores["maxprob"]]
    )
    np.testing.assert_array_equal(x.latents[0][3:].toarray(), b.latents.toarray())
    np.testing.assert_array_equal(x.hidden.at(4, "last")[:3], a.hidden[:, 1, 4].astype(np.float64))
