"""The xgboost verifier: trace-level validation split, JSON round trip, the verifier stage."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file
from scipy.sparse import csr_matrix
from sklearn.metrics import roc_auc_score

from crv.baselines.scores import (
    LatentLayout,
    load_baseline_table,
    load_hidden_states,
    load_latents,
    save_latents,
)
from crv.features.compute import feature_names
from crv.io import atomic_write, atomic_write_json
from crv.pipeline import StageContext
from crv.traces.steps import KEY_COLUMNS
from crv.verifier.classifier import (
    XGBVerifier,
    choose_threshold,
    load_verifier,
    split_train_val,
)
from crv.verifier.config import VerifierConfig
from crv.verifier.methods import HiddenInputs, StepInputs, load_method, selected_method
from crv.verifier.stage import run_stage

FAST = VerifierConfig(
    n_estimators=40,
    early_stopping_rounds=5,
    n_bootstrap=50,
    runtime_n_threads=1,
    mlp_probe_max_iter=50,
)


def synthetic_steps(n_traces=60, n_layers=4, seed=0, tasks=("arithmetic", "boolean")):
    """Steps whose label depends on two graph features; split by trace."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_traces):
        task = tasks[i % len(tasks)]
        for step in range(int(rng.integers(2, 7))):
            rows.append(
                {
                    "step_id": f"{task}{i}:{step}",
                    "trace_id": f"{task}{i}",
                    "step": step,
                    "task": task,
                    "complexity": int(rng.choice([3, 5])),
                    "split": "test" if i % 5 == 0 else "train",
                    "planted_rule": "",
                    "n_prefix_tokens": 10 + 8 * step,
                }
            )
    df = pd.DataFrame(rows)
    names = feature_names(n_layers)
    x = rng.normal(size=(len(df), len(names)))
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 3] - 1.0
    df["label"] = (rng.random(len(df)) < 1 / (1 + np.exp(-logit))).astype(int)
    df.loc[df.index[::17], "label"] = -1  # a few unknown labels
    return pd.concat([df[list(KEY_COLUMNS)], pd.DataFrame(x, columns=names)], axis=1), names


def test_validation_split_never_splits_a_trace():
    df, _ = synthetic_steps(n_traces=80)
    groups, y = df["trace_id"].to_numpy(), df["label"].clip(lower=0).to_numpy()
    for seed in range(10):
        val = split_train_val(groups, y, 0.25, seed)
        in_val = set(groups[val])
        in_train = set(groups[~val])
        assert not in_val & in_train, "a problem's steps fall in both train and validation"
        assert y[val].sum() > 0 and y[~val].sum() > 0
        assert 0.15 < len(in_val) / len(set(groups)) < 0.35


def test_verifier_fit_records_trace_split():
    df, names = synthetic_steps()
    df = df[df["label"] >= 0]
    v = XGBVerifier(FAST, names, seed=0).fit(
        df[names].to_numpy(), df["label"].to_numpy(), df["trace_id"].to_numpy()
    )
    assert v.info["n_train_traces"] + v.info["n_val_traces"] == df["trace_id"].nunique()
    assert 0 < v.threshold < 1
    # the validation AUROC is that of the validation rows' scores
    val = split_train_val(df["trace_id"].to_numpy(), df["label"].to_numpy(), FAST.val_frac, 0)
    p_val = v.predict_proba(df[names].to_numpy()[val])
    assert v.info["val_auroc"] == pytest.approx(roc_auc_score(df["label"].to_numpy()[val], p_val))


def test_json_round_trip_gives_identical_probabilities(tmp_path):
    df, names = synthetic_steps()
    df = df[df["label"] >= 0]
    v = XGBVerifier(FAST, names, seed=0).fit(
        df[names].to_numpy(), df["label"].to_numpy(), df["trace_id"].to_numpy()
    )
    v.save(tmp_path)
    assert (tmp_path / "model.json").read_text().lstrip().startswith("{")
    w = load_verifier(tmp_path)
    assert w.feature_names == names and w.threshold == v.threshold
    np.testing.assert_array_equal(v.predict_proba(df), w.predict_proba(df))
    np.testing.assert_array_equal(w.predict_proba(df), w.predict_proba(df[names[::-1]]))  # by name


def test_choose_threshold():
    y = np.array([1, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    assert choose_threshold(y, p, "max_f1") == pytest.approx(0.6)  # F1 = 6/7 there
    assert choose_threshold(y, p, "recall95") == pytest.approx(0.6)
    assert choose_threshold(np.zeros(3), p[:3], "max_f1") == 0.5


def write_inputs(tmp_path, df, names, hidden_dim=6):
    feat, base = tmp_path / "features", tmp_path / "baselines"
    atomic_write(feat / "features.parquet", lambda p: df.to_parquet(p, index=False))
    atomic_write_json(feat / "features.json", {"n_layers": 4, "feature_names": names})
    rng = np.random.default_rng(1)
    b = df[list(KEY_COLUMNS)].iloc[::-1].reset_index(drop=True)  # another row order
    lab = b["label"].clip(lower=0).to_numpy()
    b["maxprob"] = rng.random(len(b)) + 0.3 * lab
    b["energy"] = rng.random(len(b))
    atomic_write(base / "baselines.parquet", lambda p: b.to_parquet(p, index=False))
    hidden = rng.normal(size=(len(b), hidden_dim)).astype(np.float32)
    hidden[:, 0] += lab
    with open(base / "hidden.npy", "wb") as f:
        np.save(f, hidden, allow_pickle=False)
    # pooled hidden states [n, 3 poolings, 2 layers, D]: the label is in layer 4's last token
    pooled = rng.normal(size=(len(b), 3, 2, hidden_dim)).astype(np.float16)
    pooled[:, 1, 1, 0] += 2 * lab
    save_file({"hidden": pooled}, str(base / "hidden_states.safetensors"), {"layers": "[0, 4]"})
    # transcoder latents: latent 5 of layer 1, max-pooled, fires on incorrect steps
    layout = LatentLayout((0, 1), 8)
    dense = (rng.random((len(b), layout.n_columns)) < 0.05) * rng.random((len(b), layout.n_columns))
    dense[:, layout.column(1, 5, "max")] = lab * (1 + rng.random(len(b)))
    save_latents(base / "latents.safetensors", csr_matrix(dense), layout)
    meta = {"score_columns": ["maxprob", "energy"], "temperature": 1.0}
    atomic_write_json(base / "baselines.json", meta)
    return feat, base


def test_verifier_stage_end_to_end(tmp_path):
    df, names = synthetic_steps(n_traces=80)
    # boolean test steps are all correct: its metrics must be null, not a crash
    df.loc[(df["task"] == "boolean") & (df["split"] == "test") & (df["label"] == 1), "label"] = 0
    wrong = df.index[(df["task"] == "arithmetic") & (df["label"] == 1)]
    df.loc[wrong[::2], "planted_rule"] = "seven_times"
    feat, base = write_inputs(tmp_path, df, names)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        "verifier",
        FAST,
        {"features": feat, "baselines": base},
        out,
        tmp_path,
        0,
        "cpu",
        logging.getLogger("t"),
    )
    det = run_stage(ctx)
    methods = [
        "crv",
        "crv+confidence",
        "crv+probes",
        "position",
        "maxprob",
        "energy",
        "probe",
        "tc_probe",
        "probes+confidence",
        "lr_probe",
        "mlp_probe",
    ]
    ari = det["arithmetic"]
    assert list(ari["methods"]) == methods
    val = ari["validation_auroc"]
    baselines = [m for m in methods if m not in ("crv", "crv+confidence", "crv+probes")]
    best = max((m for m in baselines if val[m] is not None), key=val.__getitem__)
    assert ari["strongest_baseline"] == {
        "method": best,
        "val_auroc": val[best],
        "chosen_on": "validation",
    }
    probe = ari["strongest_probe"]["method"]
    assert probe in ("probe", "tc_probe", "lr_probe", "mlp_probe")
    # the planted signals: layer 4's last token, latent 5 of layer 1 max-pooled
    assert ari["probe_choice"]["probe"]["layer"] == 4
    assert ari["probe_choice"]["probe"]["pooling"] == "last"
    top = ari["probe_choice"]["tc_probe"]["top_features"][0]
    assert (top["layer"], top["latent"], top["pooling"]) == (1, 5, "max") and top["coef"] > 0
    for m in ("crv", "crv+confidence", "crv+probes"):
        paired = ari["paired"][m]
        assert paired["baseline"] == best
        assert paired["diff"] == pytest.approx(
            ari["methods"][m]["auroc"] - ari["methods"][best]["auroc"]
        )
        assert paired["ci"][0] <= paired["diff"] <= paired["ci"][1]
    assert set(ari["confident_half"]) == set(methods)
    assert ari["confident_half_counts"]["n_test_steps"] == ari["n_test_steps"] // 2
    n_kind = ari["n_test_incorrect_by_kind"]
    assert n_kind["natural"] + n_kind["planted"] == ari["n_test_incorrect"]
    assert n_kind["planted"] > 0 and n_kind["natural"] > 0
    for kind in ("natural", "planted"):
        assert set(ari["by_error_kind"][kind]) == set(methods)
        kind_methods = ari["by_error_kind"][kind]
        for m in ("crv", "crv+confidence"):
            vs = ari["by_error_kind_vs_maxprob"][kind][m]
            assert vs["baseline"] == "maxprob"
            assert vs["diff"] == pytest.approx(
                kind_methods[m]["auroc"] - kind_methods["maxprob"]["auroc"]
            )
            assert vs["ci"][0] <= vs["diff"] <= vs["ci"][1]
        for m in ("crv", "crv+confidence", "crv+probes", "maxprob"):
            vs = ari["by_error_kind_vs_probe"][kind][m]
            assert vs["probe"] == probe
            assert vs["diff"] == pytest.approx(
                kind_methods[m]["auroc"] - kind_methods[probe]["auroc"]
            )
        assert probe not in ari["by_error_kind_vs_probe"][kind]
        assert ari["by_error_kind"][kind]["crv"]["auroc_ci"] is not None
    for key in ("vs_maxprob", "vs_probe", "confident_half_vs_maxprob", "confident_half_vs_probe"):
        assert ari[key]["crv+probes"]["diff"] is not None
    # report.md shows the paired differences against MaxProb per error kind
    from crv.verifier.metrics import detection_markdown, diff_cell

    md = detection_markdown(det)
    assert "against MaxProb by error kind" in md
    vs = ari["by_error_kind_vs_maxprob"]["planted"]["crv"]
    assert f"| arithmetic | planted | crv | {diff_cell(vs)} |" in md
    vs = ari["by_error_kind_vs_probe"]["planted"]["crv+probes"]
    assert f"| arithmetic | planted | crv+probes | {probe} | {diff_cell(vs)} |" in md
    assert "layer 4, last" in md
    # no planted rule among boolean steps: no split by error kind there
    assert "by_error_kind" not in det["boolean"] and "| boolean | planted |" not in md
    assert ari["methods"]["crv"]["auroc"] > 0.75
    assert ari["methods"]["crv"]["auroc_ci"][0] <= ari["methods"]["crv"]["auroc"]
    assert det["boolean"]["methods"]["crv"]["auroc"] is None
    assert "reason" in det["boolean"]["methods"]["crv"]
    assert set(det["per_complexity"]["arithmetic"]) == {"3", "5"}
    assert det["n_identity_features"] == 0
    assert list(det["ablation"]["arithmetic"]) == [
        "all",
        "without_global",
        "without_node",
        "without_topology",
    ]
    assert set(det["transfer"]) == {"arithmetic", "boolean"}
    assert det["transfer"]["boolean"]["arithmetic"]["auroc"] is not None
    assert set(det["all_tasks"]) == {"arithmetic", "boolean"}
    assert (out / "roc_arithmetic.png").stat().st_size > 0
    assert (out / "feature_importance.png").stat().st_size > 0
    pooled, per_task = load_verifier(out), load_verifier(out, task="arithmetic")
    assert pooled.feature_names == names and per_task.feature_names == names
    assert np.all((pooled.predict_proba(df) >= 0) & (pooled.predict_proba(df) <= 1))
    # every saved method, read back, scores the test steps as the stage did
    test = df[(df["task"] == "arithmetic") & (df["split"] == "test") & (df["label"] >= 0)]
    test = test.reset_index(drop=True)
    table = load_baseline_table(base)
    rows = table.reset_index().set_index("step_id").loc[test["step_id"], "index"].to_numpy()
    hidden, layers = load_hidden_states(base)
    latents, layout = load_latents(base)
    inputs = StepInputs(
        features=test[names],
        scores=table.iloc[rows].reset_index(drop=True),
        hidden=HiddenInputs(hidden[rows], layers),
        latents=(latents[rows], layout),
    )
    saved = ["crv", "crv+confidence", "crv+probes", "maxprob", "probe", "tc_probe"]
    for m in [*saved, "probes+confidence", "energy"]:
        method = load_method(out, "arithmetic", m)
        auroc = roc_auc_score(test["label"], method.score(inputs))
        assert auroc == pytest.approx(ari["methods"][m]["auroc"]), m
    assert load_method(out, "arithmetic", "tc_probe").needs == {"latents"}
    assert load_method(out, "arithmetic", "crv+probes").needs == {
        "features",
        "scores",
        "hidden",
        "latents",
    }
    chosen, threshold = selected_method(out, "arithmetic")
    assert chosen.name == ari["selected"]["method"] and threshold == ari["selected"]["threshold"]
    assert ari["validation_auroc"][chosen.name] == max(
        ari["validation_auroc"][m] for m in [*saved, "probes+confidence", "energy"]
    )
    assert selected_method(out, "all")[0].name in saved + ["probes+confidence", "energy"]


def test_verifier_stage_refuses_a_task_without_test_steps(tmp_path):
    from crv.errors import CRVError

    df, names = synthetic_steps(n_traces=40)
    df = df[~((df["task"] == "boolean") & (df["split"] == "test"))]
    feat, base = write_inputs(tmp_path, df, names)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        "verifier", FAST, {"features": feat, "baselines": base}, out, tmp_path, 0, "cpu",
        logging.getLogger("t"),
    )  # fmt: skip
    with pytest.raises(CRVError, match=r"task\(s\) \['boolean'\]"):
        run_stage(ctx)
