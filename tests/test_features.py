"""Graph features on hand-built step graphs with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from crv.features.compute import FAMILIES, family_of, feature_names, graph_features
from crv.features.config import FeaturesConfig
from crv.features.table import feature_table
from crv.graphs.graph import StepGraph
from crv.traces.steps import KEY_COLUMNS, step_key_table


def make_graph(
    kind, layer, activation, influence, edges, trace_id="t0", step=0, position=9, pos=None
):
    n = len(kind)
    src, dst, w = (
        (np.array(c) for c in zip(*edges, strict=True)) if edges else (np.zeros(0, int),) * 3
    )
    return StepGraph(
        trace_id=trace_id,
        step=step,
        position=position,
        kind=np.array(kind, np.int8),
        layer=np.array(layer, np.int16),
        pos=np.arange(n, dtype=np.int32) if pos is None else np.array(pos, np.int32),
        feature=np.zeros(n, np.int32),
        activation=np.array(activation, np.float32),
        influence=np.array(influence, np.float32),
        src=np.asarray(src, np.int32),
        dst=np.asarray(dst, np.int32),
        weight=np.asarray(w, np.float32),
        scores={"n_active_features": 17.0},
    )


# Nodes [feature L0, feature L2, error L1, token, logit]; chain token -> f0 -> f1 -> logit
# plus error -> logit.
CHAIN_EDGES = [(3, 0, 2.0), (0, 1, -0.5), (1, 4, 1.0), (2, 4, 0.5)]


def chain(edges=CHAIN_EDGES, trace_id="t0"):
    return make_graph(
        kind=[0, 0, 1, 2, 3],
        layer=[0, 2, 1, -1, 4],
        activation=[1.0, 3.0, 0.0, 0.0, 0.9],
        influence=[0.5, 0.8, 0.3, 0.2, 0.9],
        edges=edges,
        trace_id=trace_id,
    )


def test_feature_names_and_families():
    assert len(feature_names(32)) == 55
    assert len(feature_names(4)) == 27
    assert len(set(feature_names(4))) == 27
    assert {family_of(n) for n in feature_names(4)} == set(FAMILIES) - {"identity"}
    assert family_of("layer_hist_3") == "node"
    assert sum(family_of(n) == "node" for n in feature_names(4)) == 6 + 4
    assert set(graph_features(chain(), 4)) == set(feature_names(4))


def test_global_features():
    f = graph_features(chain(), 4)
    assert f["total_active_features"] == 17
    assert f["n_feature_nodes"] == 2
    assert f["n_error_nodes"] == 1
    assert f["top_logit_prob"] == pytest.approx(0.9)
    assert f["logit_entropy"] == 0.0  # one attributed logit
    two_logits = make_graph(
        [0, 3, 3], [0, 4, 4], [1.0, 0.6, 0.2], [0.5, 0.6, 0.2], [(0, 1, 1.0)], pos=[1, 2, 2]
    )
    g = graph_features(two_logits, 4)
    assert g["top_logit_prob"] == pytest.approx(0.6)
    assert g["logit_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # a whole-step graph (logits at two positions): the least certain position's values
    whole_step = make_graph(
        [0, 3, 3, 3],
        [0, 4, 4, 4],
        [1.0, 0.6, 0.2, 0.9],
        [0.5, 0.6, 0.2, 0.9],
        [(0, 1, 1.0)],
        pos=[1, 2, 2, 3],
    )
    h = graph_features(whole_step, 4)
    assert h["top_logit_prob"] == pytest.approx(0.6)  # not 0.9, the other position's
    assert h["logit_entropy"] == pytest.approx(g["logit_entropy"])


def test_node_features():
    f = graph_features(chain(), 4)
    assert f["mean_node_influence"] == pytest.approx((0.5 + 0.8 + 0.3 + 0.2) / 4)
    assert f["error_influence_total"] == pytest.approx(0.3)
    assert f["error_influence_mean"] == pytest.approx(0.3)
    assert f["feature_act_mean"] == pytest.approx(2.0)
    assert f["feature_act_max"] == pytest.approx(3.0)
    assert f["feature_act_std"] == pytest.approx(1.0)
    assert [f[f"layer_hist_{i}"] for i in range(4)] == [1, 0, 1, 0]


def test_topology_features():
    f = graph_features(chain(), 4)
    w = np.array([2.0, -0.5, 1.0, 0.5])
    assert f["edge_weight_sum"] == pytest.approx(3.0)
    assert f["edge_weight_mean"] == pytest.approx(0.75)
    assert f["edge_weight_std"] == pytest.approx(w.std())
    assert f["n_edges"] == 4
    assert f["density"] == pytest.approx(4 / 20)
    assert f["n_weak_components"] == 1
    assert f["degree_centrality_mean"] == pytest.approx((2 + 2 + 1 + 1 + 2) / 4 / 5)
    assert f["degree_centrality_max"] == pytest.approx(0.5)
    # directed shortest paths: f0 lies on token->f1 and token->logit, f1 on token->logit
    # and f0->logit; normalised by (n-1)(n-2) = 12
    assert f["betweenness_max"] == pytest.approx(2 / 12)
    assert f["betweenness_mean"] == pytest.approx(4 / 12 / 5)
    # undirected component is the path token-f0-f1-logit-error: sum of d(5-d) = 20 pairs
    assert f["avg_shortest_path_lwcc"] == pytest.approx(40 / 20)
    # token -> f0 -> f1 -> logit with lengths 1/|w|: 1/2 + 1/0.5 + 1/1
    assert f["token_logit_shortest_path"] == pytest.approx(3.5)


def test_topology_components_and_missing_path():
    f = graph_features(chain(CHAIN_EDGES[:3]), 4)  # error node isolated
    assert f["n_weak_components"] == 2
    assert f["avg_shortest_path_lwcc"] == pytest.approx(2 * (3 + 4 + 3) / 12)  # path of 4
    g = graph_features(chain([e for e in CHAIN_EDGES if e[:2] != (1, 4)]), 4)
    assert g["token_logit_shortest_path"] == -1


def random_graph(seed=0, n=120, m=600):
    rng = np.random.default_rng(seed)
    kind = np.r_[np.zeros(n - 15), np.ones(5), 2 * np.ones(5), 3 * np.ones(5)].astype(int)
    layer = np.r_[rng.integers(0, 4, n - 10), -np.ones(5), 4 * np.ones(5)].astype(int)
    s, d = rng.integers(0, n, 4 * m), rng.integers(0, n, 4 * m)
    ok = layer[s] < layer[d]
    pairs = np.unique(np.c_[s[ok], d[ok]], axis=0)[:m]
    edges = list(zip(pairs[:, 0], pairs[:, 1], rng.normal(size=len(pairs)), strict=True))
    return make_graph(kind, layer, rng.random(n), rng.random(n), edges)


def test_avg_path_matches_networkx_and_betweenness_is_seeded():
    g = random_graph()
    f = graph_features(g, 4, FeaturesConfig(betweenness_exact_max_nodes=1000))
    und = g.to_networkx().to_undirected()
    largest = und.subgraph(max(nx.connected_components(und), key=len))
    assert f["avg_shortest_path_lwcc"] == pytest.approx(nx.average_shortest_path_length(largest))
    dg = nx.DiGraph()
    dg.add_nodes_from(range(g.n_nodes))
    dg.add_weighted_edges_from(
        (int(a), int(b), 1 / abs(float(w))) for a, b, w in zip(g.src, g.dst, g.weight, strict=True)
    )
    exact = np.array(list(nx.betweenness_centrality(dg, weight="weight").values()))
    assert f["betweenness_max"] == pytest.approx(exact.max())
    cfg = FeaturesConfig(betweenness_exact_max_nodes=10, betweenness_k=20)
    a, b = graph_features(g, 4, cfg, seed=3), graph_features(g, 4, cfg, seed=3)
    assert a["betweenness_mean"] == b["betweenness_mean"] and np.isfinite(a["betweenness_mean"])


def test_feature_table_keys_and_labels():
    from datasets import Dataset

    steps = [
        {"index": 0, "text": "a", "label": True, "parsed": True, "last_token": 5},
        {"index": 1, "text": "b", "label": False, "parsed": True, "last_token": 9},
        {"index": 2, "text": "c", "label": None, "parsed": False, "last_token": 12},
    ]
    traces = Dataset.from_list(
        [
            {
                "id": "t0",
                "task": "arithmetic",
                "complexity": 3,
                "split": "train",
                "prompt_len": 3,
                "steps": steps,
            }
        ]
    )
    keys = step_key_table(traces)
    assert keys["label"].tolist() == [0, 1, -1]
    assert keys["prev_last_token"].tolist() == [2, 5, 9]
    graphs = [
        chain(),
        make_graph([0, 3], [1, 4], [1.0, 1.0], [1.0, 1.0], [(0, 1, 1.0)], step=1, position=9),
    ]
    table = feature_table(graphs, keys, 4, FeaturesConfig(), seed=0)
    assert list(table.columns) == [*KEY_COLUMNS, *feature_names(4)]
    assert table["step_id"].tolist() == ["t0:0", "t0:1"]
    assert table["label"].tolist() == [0, 1]
    assert table["n_prefix_tokens"].tolist() == [10, 10]
    assert table["task"].tolist() == ["arithmetic"] * 2


@pytest.mark.parametrize("identity", [False, True])
def test_features_stage_writes_table_and_resumes_from_its_scratch(tmp_path, identity):
    """The stage reads the graph files, writes one result file per trace to its scratch
    directory and keeps a finished one on a rerun: the table is the in-memory one."""
    import logging

    from datasets import Dataset

    from crv.features.stage import run_stage
    from crv.features.table import load_feature_meta, load_feature_names, load_feature_table
    from crv.graphs.store import save_step_graphs, trace_file
    from crv.pipeline import StageContext

    rows, graphs = [], {}
    for t, task in enumerate(("boolean", "arithmetic")):
        steps = [
            {"index": i, "text": "", "label": i == 0, "parsed": True, "last_token": 5 + i}
            for i in range(2)
        ]
        tid = f"t{t}"
        rows.append(
            {"id": tid, "task": task, "complexity": 5, "split": "test", "prompt_len": 3}
            | {"steps": steps}
        )
        graphs[tid] = [
            chain(trace_id=tid),
            make_graph(
                [0, 3], [0, 4], [1.0, 1.0], [1.0, 1.0], [(0, 1, 1.0)], tid, step=1, position=6
            ),
        ]
        save_step_graphs(trace_file(tmp_path / "graphs", tid), tid, graphs[tid])
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "traces" / "dataset"))
    inputs = {"traces": tmp_path / "traces", "graphs": tmp_path / "graphs"}

    def run(out: Path) -> dict:
        ctx = StageContext(
            "features",
            FeaturesConfig(identity=identity),
            inputs,
            out,
            tmp_path / "scratch",
            0,
            "cpu",
            logging.getLogger("t"),
        )
        return run_stage(ctx)

    report = run(tmp_path / "out")
    assert report["n_layers"] == 4 and report["n_features"] == 27 and report["n_incorrect"] == 2
    assert report["n_resumed_traces"] == 0
    table = load_feature_table(tmp_path / "out")
    assert table["step_id"].tolist() == ["t0:0", "t0:1", "t1:0", "t1:1"]
    assert table["label"].tolist() == [0, 1, 0, 1]
    assert table["n_prefix_tokens"].tolist() == [10, 7, 10, 7]
    keys = step_key_table(Dataset.from_list(rows))
    in_memory = feature_table(
        [g for gs in graphs.values() for g in gs],
        keys,
        4,
        FeaturesConfig(identity=identity),
        seed=0,
    )
    pd.testing.assert_frame_equal(table, in_memory)
    assert load_feature_names(tmp_path / "out") == feature_names(4)
    meta = load_feature_meta(tmp_path / "out")
    assert meta["seed"] == 0 and meta["config"]["betweenness_k"] == 32

    (tmp_path / "scratch" / "features" / "t1.json").unlink()
    again = run(tmp_path / "again")
    assert again["n_resumed_traces"] == 1
    pd.testing.assert_frame_equal(load_feature_table(tmp_path / "again"), table)


def identity_graph(trace_id="t0", step=0, position=9):
    """[feature L1 F7 @0, feature L1 F7 @3, feature L0 F2, error L1 @0, error L1 @3,
    error L0 (zero influence), token, logit]."""
    g = make_graph(
        kind=[0, 0, 0, 1, 1, 1, 2, 3],
        layer=[1, 1, 0, 1, 1, 0, -1, 4],
        activation=[1.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.9],
        influence=[0.25, 0.5, 0.125, 0.0625, 0.1875, 0.0, 0.3, 0.9],
        edges=[(6, 2, 1.0), (2, 0, 1.0), (0, 7, 1.0), (1, 7, 1.0), (3, 7, 1.0)],
        trace_id=trace_id,
        step=step,
        position=position,
    )
    g.feature[:] = [7, 7, 2, -1, -1, -1, 11, 12]
    return g


def test_identity_features_by_hand():
    from crv.features.compute import identity_features, identity_matrix

    ident = identity_features(identity_graph())
    # features summed over positions, errors summed by layer, zero influence left out
    assert ident == {"id_L1_F7": 0.75, "id_L0_F2": 0.125, "err_L1": 0.25}
    assert all(family_of(n) == "identity" for n in ident)
    other = {"id_L3_F1630": 2.0, "err_L1": 1.0}
    m, names = identity_matrix([ident, {}, other])
    assert names == ["id_L0_F2", "id_L1_F7", "id_L3_F1630", "err_L1"]
    assert m.format == "csr" and m.shape == (3, 4) and m.nnz == 5  # absent entries not stored
    np.testing.assert_array_equal(
        m.toarray(), [[0.125, 0.75, 0, 0.25], [0, 0, 0, 0], [0, 0, 2.0, 1.0]]
    )
    with_id = graph_features(identity_graph(), 4, FeaturesConfig(identity=True))
    assert set(with_id) == set(feature_names(4)) | set(ident)
    assert set(graph_features(identity_graph(), 4)) == set(feature_names(4))


def test_feature_table_identity_block_and_planted_rule(tmp_path):
    from datasets import Dataset

    from crv.features.table import load_feature_table, load_identity, split_identity

    steps = [
        {"index": i, "text": "", "label": i != 1, "planted_rule": r, "last_token": 5 + i}
        for i, r in enumerate(["", "seven_times", ""])
    ]
    row = {"id": "t0", "task": "arithmetic", "complexity": 3, "split": "train", "prompt_len": 3}
    keys = step_key_table(Dataset.from_list([{**row, "steps": steps}]))
    assert keys["planted_rule"].tolist() == ["", "seven_times", ""]
    graphs = [identity_graph(step=2), chain(), identity_graph(step=1)]
    table = feature_table(graphs, keys, 4, FeaturesConfig(identity=True), seed=0)
    dense, m, names = split_identity(table)
    assert list(dense.columns) == [*KEY_COLUMNS, *feature_names(4)]
    assert dense["planted_rule"].tolist() == ["", "seven_times", ""]
    assert names == ["id_L0_F0", "id_L0_F2", "id_L1_F7", "id_L2_F0", "err_L1"]
    expected = np.array(
        [[0.5, 0, 0, 0.8, 0.3], [0, 0.125, 0.75, 0, 0.25], [0, 0.125, 0.75, 0, 0.25]]
    )
    np.testing.assert_allclose(m.toarray(), expected, rtol=1e-6)  # rows in table order
    # the stage's files: dense Parquet + sparse npz, read back as sparse columns
    import crv.features.table as fs
    from crv.io import atomic_write, atomic_write_json

    atomic_write(tmp_path / fs.TABLE_FILE, lambda p: dense.to_parquet(p, index=False))
    atomic_write(tmp_path / fs.IDENTITY_FILE, lambda p: fs.save_identity(p, m))
    atomic_write_json(tmp_path / fs.META_FILE, {"feature_names": [], "identity_names": names})
    back, back_names = load_identity(tmp_path)
    assert back_names == names and (back != m).nnz == 0
    loaded = load_feature_table(tmp_path)
    assert list(loaded.columns[-5:]) == names and loaded[names[2]].dtype.kind == "f"
    np.testing.assert_allclose(loaded[names].sparse.to_dense().to_numpy(), expected, rtol=1e-6)


def test_step_key_table_without_planted_rule_field():
    from datasets import Dataset

    steps = [{"index": 0, "text": "", "label": False, "last_token": 4}]
    row = {"id": "t", "task": "boolean", "complexity": 3, "split": "test", "prompt_len": 2}
    keys = step_key_table(Dataset.from_list([{**row, "steps": steps}]))
    assert keys["planted_rule"].tolist() == [""]
