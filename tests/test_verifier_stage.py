"""The evaluation harness's new reports: paired trace bootstrap, crv+confidence, the
confident half, error kinds, and the identity block through the verifier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import csr_matrix

from crv.verifier.classifier import XGBVerifier, feature_matrix
from crv.verifier.config import VerifierConfig
from crv.verifier.methods import ProbeData, ablation_methods, build_methods, fit_method
from crv.verifier.metrics import detection_metrics, group_weights, paired_auroc_difference
from crv.verifier.stage import confident_half, error_kind_mask, strongest

FAST = VerifierConfig(n_estimators=30, early_stopping_rounds=5, runtime_n_threads=1)


def test_group_weights_resample_whole_traces():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    for w in group_weights(groups, 50, seed=0, chunk=20):
        assert w.shape[1] == 6
        # every step of a trace has its trace's multiplicity; n_traces traces per resample
        assert (
            np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 4]) and np.all(w[:, 4] == w[:, 5])
        )
        np.testing.assert_array_equal(w[:, [0, 2, 3]].sum(axis=1), 3)


def test_paired_interval_is_wider_when_traces_repeat_steps():
    rng = np.random.default_rng(0)
    n_traces, copies = 60, 8
    y = (rng.random(n_traces) < 0.3).astype(int)
    a = y + rng.normal(0, 0.8, n_traces)
    b = y + rng.normal(0, 0.8, n_traces)
    # every trace holds `copies` identical steps: they carry no more information than one
    y_s, a_s, b_s = (np.repeat(v, copies) for v in (y, a, b))
    traces = np.repeat(np.arange(n_traces), copies)
    by_trace = paired_auroc_difference(y_s, a_s, b_s, traces, 400, seed=1)
    by_step = paired_auroc_difference(y_s, a_s, b_s, np.arange(len(y_s)), 400, seed=1)
    point = detection_metrics(y, a)["auroc"] - detection_metrics(y, b)["auroc"]
    assert by_trace["diff"] == pytest.approx(point) == by_step["diff"]
    width = {k: v["ci"][1] - v["ci"][0] for k, v in (("trace", by_trace), ("step", by_step))}
    assert width["trace"] > 1.8 * width["step"]  # about sqrt(8) wider
    # resampling traces of the duplicated set = resampling the one-step traces
    single = paired_auroc_difference(y, a, b, np.arange(n_traces), 400, seed=1)
    assert single["ci"] == pytest.approx(by_trace["ci"])


def steps_with_confidence(n_traces=120, seed=0):
    """Label caused by a graph feature OR by low confidence, one trace = 4 steps."""
    rng = np.random.default_rng(seed)
    n = 4 * n_traces
    f0, maxprob = rng.normal(size=n), rng.random(n)
    y = ((f0 > 1.0) | (maxprob > 0.85)).astype(int)
    return pd.DataFrame(
        {
            "trace_id": np.repeat(np.arange(n_traces), 4).astype(str),
            "label": y,
            "f0": f0,
            "f1": rng.normal(size=n),
            "maxprob": maxprob,
            "energy": rng.normal(size=n),
            "hidden_row": np.arange(n),
            "feature_row": np.arange(n),
        }
    )


def test_crv_plus_confidence_uses_graph_and_confidence_columns():
    df = steps_with_confidence()
    methods = {
        m.name: m
        for m in build_methods(
            FAST, ["f0", "f1"], ["maxprob", "energy"], ProbeData(np.zeros((len(df), 2))), 0
        )
    }
    assert list(methods)[:3] == ["crv", "crv+confidence", "position"]
    scorer, _ = fit_method(methods["crv+confidence"], df)
    assert scorer.feature_names == ["f0", "f1", "maxprob", "energy"]
    gain = scorer.importance()
    assert gain["f0"] > 0 and gain["maxprob"] > 0
    crv, _ = fit_method(methods["crv"], df)
    assert crv.feature_names == ["f0", "f1"]
    y = df["label"].to_numpy()
    both = detection_metrics(y, scorer.score(methods["crv+confidence"].inputs(df)))["auroc"]
    graph_only = detection_metrics(y, crv.score(methods["crv"].inputs(df)))["auroc"]
    assert both > graph_only + 0.05


def test_identity_block_reaches_the_verifier_and_the_ablation():
    df = steps_with_confidence()
    rng = np.random.default_rng(3)
    n = len(df)
    # identity entry id_L1_F5 present exactly on the steps where f0 decides the label
    rows = np.flatnonzero(df["f0"].to_numpy() > 1.0)
    noise = rng.choice(n, size=40, replace=False)
    ident = csr_matrix(
        (
            np.r_[np.full(len(rows), 0.5), rng.random(40) + 0.1],
            (np.r_[rows, noise], np.r_[np.zeros(len(rows), int), np.ones(40, int)]),
        ),
        shape=(n, 2),
    )
    identity = (ident, ["id_L1_F5", "err_L0"])
    crv = build_methods(FAST, ["f1"], [], ProbeData(np.zeros((n, 2))), 0, identity)[0]
    x = crv.inputs(df)
    assert x.shape == (n, 3) and x.format == "csr"
    assert x.nnz == n + ident.nnz  # the dense column stored in full, identity sparse
    scorer, _ = fit_method(crv, df)
    assert scorer.feature_names == ["f1", "id_L1_F5", "err_L0"]
    assert scorer.importance()["id_L1_F5"] > 0
    df["n_edges"] = df["f1"]
    ablations = {m.name: m for m in ablation_methods(FAST, ["n_edges"], 0, identity)}
    assert list(ablations) == ["without_topology", "without_identity"]
    assert ablations["without_identity"].inputs(df).shape == (n, 1)
    assert ablations["without_topology"].inputs(df).shape == (n, 2)


def test_verifier_reads_identity_from_sparse_frames_and_dicts():
    rng = np.random.default_rng(0)
    n = 200
    dense = rng.normal(size=(n, 2))
    dense[::3, 1] = 0.0  # explicit zeros must stay values, not become missing
    present = rng.random(n) < 0.4
    ident = csr_matrix(
        (rng.random(present.sum()) + 0.5, (np.flatnonzero(present), np.zeros(present.sum(), int))),
        shape=(n, 1),
    )
    y = (present & (dense[:, 0] > 0)).astype(int)
    names = ["feature_act_max", "n_edges", "id_L0_F3"]
    v = XGBVerifier(FAST, names, seed=0).fit(feature_matrix(dense, ident), y, np.arange(n) // 4)
    p = v.predict_proba(feature_matrix(dense, ident))
    # the same steps as a frame with a sparse identity column (load_feature_table) ...
    frame = pd.DataFrame(dense, columns=names[:2])
    sparse = pd.DataFrame.sparse.from_spmatrix(ident, columns=names[2:])
    np.testing.assert_array_equal(v.predict_proba(pd.concat([frame, sparse], axis=1)), p)
    # ... and as graph_features rows: identity keys only where present, reordered columns
    dicts = [
        {names[0]: d[0], names[1]: d[1], **({names[2]: ident[i, 0]} if present[i] else {})}
        for i, d in enumerate(dense)
    ]
    np.testing.assert_array_equal(v.predict_proba(pd.DataFrame(dicts)), p)
    np.testing.assert_array_equal(v.predict_proba(pd.DataFrame(dicts, columns=names[::-1])), p)
    with pytest.raises(ValueError, match="n_edges"):
        v.predict_proba(frame.drop(columns=["n_edges"]))


def test_confident_half_takes_the_lowest_maxprob_scores():
    test = pd.DataFrame({"maxprob": [0.9, 0.1, 0.5, 0.2, 0.7], "label": [1, 0, 1, 0, 0]})
    # maxprob is 1 - mean max-probability: the lowest scores are the most confident steps
    np.testing.assert_array_equal(confident_half(test), [False, True, False, True, False])


def test_error_kinds_pair_each_kind_with_all_correct_steps():
    test = pd.DataFrame(
        {
            "label": [0, 1, 1, 0, 1],
            "planted_rule": ["", "", "seven_times", "seven_times", None],
        }
    )
    np.testing.assert_array_equal(error_kind_mask(test, "natural"), [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(error_kind_mask(test, "planted"), [1, 0, 1, 1, 0])


def test_strongest_is_chosen_on_validation_auroc_only():
    class Fitted:
        def __init__(self, val_auroc):
            self.info = {"val_auroc": val_auroc}

    fitted = {"maxprob": Fitted(0.8), "probe": Fitted(0.9), "energy": Fitted(None), "x": None}
    assert strongest(fitted, ["maxprob", "probe", "energy", "x"]) == {
        "method": "probe",
        "val_auroc": 0.9,
        "chosen_on": "validation",
    }
    assert strongest(fitted, ["maxprob"])["method"] == "maxprob"
    assert strongest(fitted, ["energy", "x"]) is None


def probe_steps(
    n_traces: int, seed: int, informative_layer: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Steps of 4 per trace whose label shows in one layer's last-token state."""
    rng = np.random.default_rng(seed)
    n = 4 * n_traces
    y = (rng.random(n) < 0.3).astype(int)
    hidden = rng.normal(size=(n, 3, 2, 8)).astype(np.float16)
    hidden[:, 1, informative_layer, 0] += 3 * y
    df = pd.DataFrame(
        {"trace_id": np.repeat(np.arange(n_traces), 4).astype(str) + f"-{seed}", "label": y}
    )
    return df, hidden


def test_probe_layer_is_chosen_without_test_steps():
    """Layer 0 carries the label on training steps, layer 3 on test steps: a choice that
    looked at test steps would take layer 3."""
    from crv.verifier.methods import HiddenInputs
    from crv.verifier.stage import evaluate_methods

    train, h_train = probe_steps(60, 0, informative_layer=0)
    test, h_test = probe_steps(60, 1, informative_layer=1)
    hidden = HiddenInputs(np.concatenate([h_train, h_test]), [0, 3])
    train["hidden_row"] = np.arange(len(train))
    test["hidden_row"] = len(train) + np.arange(len(test))
    data = ProbeData(np.zeros((len(hidden), 2)), hidden)
    probe = [m for m in build_methods(FAST, [], [], data, 0) if m.name == "probe"]
    metrics, fitted, _ = evaluate_methods(probe, train, {"all": test}, 0, 0)
    chosen = fitted["probe"]
    assert (chosen.layer, chosen.pooling) == (0, "last")
    assert chosen.info["val_auroc"] > 0.9
    assert metrics["all"]["probe"]["auroc"] < 0.7  # the test steps' signal went unused
    # the grid holds every layer x pooling x C, each with its validation AUROC
    assert len(chosen.info["grid"]) == 2 * 3 * len(FAST.probe_c_grid)


def test_stacked_verifier_trains_on_out_of_fold_probe_scores():
    """Random labels on many dimensions: a probe scores its own training steps far above
    chance (it memorises them), its out-of-fold scores do not; each fold's scores are those
    of a probe fit without that fold."""
    from sklearn.model_selection import GroupKFold

    from crv.verifier.methods import HiddenInputs, HiddenProbe, StackedVerifier, StackInputs

    rng = np.random.default_rng(0)
    n = 240
    y = (rng.random(n) < 0.4).astype(int)
    groups = np.repeat(np.arange(n // 2), 2).astype(str)
    hidden = HiddenInputs(rng.normal(size=(n, 3, 1, 300)).astype(np.float16), [2])
    cfg = VerifierConfig(
        n_estimators=20, early_stopping_rounds=5, runtime_n_threads=1, probe_c_grid=[10.0]
    )
    stacked = StackedVerifier(cfg, ["f0"], {"probe": lambda: HiddenProbe(cfg, 0)}, 0, {})
    x = StackInputs(rng.normal(size=(n, 1)), {"probe": hidden})
    oof = stacked.out_of_fold(x, y, groups)[:, 0]
    in_sample = HiddenProbe(cfg, 0).fit(hidden, y, groups).score(hidden)
    assert detection_metrics(y, in_sample)["auroc"] > 0.95
    assert detection_metrics(y, oof)["auroc"] < 0.7
    tr, te = next(GroupKFold(n_splits=cfg.stack_folds).split(np.zeros(n), y, groups))
    alone = HiddenProbe(cfg, 0).fit(hidden[tr], y[tr], groups[tr]).score(hidden[te])
    np.testing.assert_allclose(oof[te], alone)
    stacked.fit(x, y, groups)
    assert stacked.xgb.feature_names == ["f0", "probe_score"]


def test_saved_methods_refuse_unknown_formats_and_missing_inputs(tmp_path):
    from crv.io import atomic_write_json
    from crv.verifier.methods import MethodError, SavedMethod, StepInputs, selected_method

    with pytest.raises(MethodError, match="no spec.json"):
        SavedMethod(tmp_path / "nothing")
    spec = {"format_version": 99, "name": "maxprob", "kind": "fixed", "inputs": {}}
    atomic_write_json(tmp_path / "m" / "spec.json", spec)
    with pytest.raises(MethodError, match="format_version 99"):
        SavedMethod(tmp_path / "m")
    inputs = {"features": [], "scores": ["maxprob"], "hidden": None, "latents": [], "parts": []}
    atomic_write_json(
        tmp_path / "m" / "spec.json",
        {**spec, "format_version": 1, "threshold": 0.3, "inputs": inputs},
    )
    method = SavedMethod(tmp_path / "m")
    assert method.needs == {"scores"} and method.threshold == 0.3
    with pytest.raises(MethodError, match="reads scores, not given"):
        method.score(StepInputs())
    scores = pd.DataFrame({"maxprob": [0.2, 0.9]})
    np.testing.assert_array_equal(method.score(StepInputs(scores=scores)), [0.2, 0.9])
    with pytest.raises(MethodError, match="no selected.json"):
        selected_method(tmp_path, "arithmetic")
