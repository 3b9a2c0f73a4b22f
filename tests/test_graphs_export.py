"""`crv-graphs export` writes circuit-tracer graph JSON that its viewer reads.

Every exported file is checked against the schema of circuit-tracer 0.5.0's pydantic models
(`frontend/graph_models.py`, `frontend/feature_models.py`: required fields and their types,
restated here because the test suite runs without circuit-tracer) and against the graph it
came from: ids and Cantor numbers, link weights equal to the adjacency, the BOS token node.
`benchmarks/graph_export_circuit_tracer.py` runs the same files through circuit-tracer's own
models and local server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_bundle import PROMPT, STEPS, bundle_parts_fixture, tiny_bundle_fixture  # noqa: F401
from test_attribution_stage import CFG, context, make_artifacts

from crv.cli.graphs import ExportConfig, export_run, main, run_export
from crv.graphs.attribute import TraceAttributor
from crv.graphs.export import GraphExporter, cantor_pair, cumulative_influence
from crv.graphs.graph import FEATURE, LOGIT, TOKEN
from crv.graphs.stage import run_stage
from crv.io import atomic_write_json
from crv.models.adapter import ArchAdapter
from crv.models.loading import load_subject
from crv.transcoders.io import load_transcoder_set

# -- the schema (circuit-tracer 0.5.0's models: field -> allowed types) --------------------

OPTIONAL_FLOAT = (float, int, type(None))
METADATA = {
    "slug": str,
    "scan": str,
    "transcoder_list": list,
    "prompt_tokens": list,
    "prompt": str,
    "node_threshold": OPTIONAL_FLOAT,
    "schema_version": (int, type(None)),
}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {
    "node_id": str,
    "feature": int,
    "layer": str,
    "ctx_idx": int,
    "feature_type": str,
    "token_prob": (float, int),
    "is_target_logit": bool,
    "run_idx": int,
    "reverse_ctx_idx": int,
    "jsNodeId": str,
    "clerp": str,
    "influence": OPTIONAL_FLOAT,
    "activation": OPTIONAL_FLOAT,
}
LINK = {"source": str, "target": str, "weight": (float, int)}
FEATURE_FILE = {
    "transcoder_id": str,
    "index": int,
    "examples_quantiles": list,
    "top_logits": list,
    "bottom_logits": list,
    "act_min": (float, int),
    "act_max": (float, int),
    "quantile_values": list,
    "histogram": list,
    "activation_frequency": (float, int),
}
EXAMPLE = {
    "tokens_acts_list": list,
    "train_token_ind": int,
    "is_repeated_datapoint": bool,
    "tokens": list,
}
ID_FORMATS = {
    "cross layer transcoder": r"(\d+)_(\d+)_(\d+)",
    "mlp reconstruction error": r"0_(\d+)_(\d+)",
    "embedding": r"E_(\d+)_(\d+)",
    "logit": r"(\d+)_(\d+)_(\d+)",
}


def check_fields(obj: Any, schema: dict[str, Any], where: str) -> None:
    assert isinstance(obj, dict), f"{where}: not an object"
    assert set(schema) <= set(obj), f"{where}: missing {sorted(set(schema) - set(obj))}"
    for name, types in schema.items():
        value = obj[name]
        allowed = types if isinstance(types, tuple) else (types,)
        assert isinstance(value, allowed), f"{where}.{name}: {type(value).__name__}"
        if bool not in allowed:  # JSON booleans are no numbers
            assert not isinstance(value, bool), f"{where}.{name}: a boolean"
        if isinstance(value, float):
            assert math.isfinite(value), f"{where}.{name}: {value}"


def check_metadata(meta: Any, where: str) -> None:
    check_fields(meta, METADATA, where)
    assert all(isinstance(t, str) for t in meta["prompt_tokens"] + meta["transcoder_list"])
    assert meta["schema_version"] == 1


def check_graph_file(path: Path) -> dict[str, Any]:
    """Schema and internal consistency of one `<slug>.json`; returns its content."""
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    check_metadata(data["metadata"], f"{path.name}:metadata")
    assert data["metadata"]["slug"] == path.stem
    check_fields(data["qParams"], QPARAMS, f"{path.name}:qParams")
    assert all(isinstance(s, list) for s in data["qParams"]["supernodes"])
    n_pos = len(data["metadata"]["prompt_tokens"])
    ids = set()
    for i, node in enumerate(data["nodes"]):
        where = f"{path.name}:nodes[{i}]"
        check_fields(node, NODE, where)
        kind = node["feature_type"]
        match = re.fullmatch(ID_FORMATS[kind], node["node_id"])
        assert match, f"{where}: id {node['node_id']!r} is no {kind} id"
        assert 0 <= node["ctx_idx"] < n_pos
        assert node["node_id"] not in ids, f"{where}: duplicate id"
        ids.add(node["node_id"])
        if kind == "cross layer transcoder":
            layer, latent, pos = map(int, match.groups())
            assert (node["layer"], node["ctx_idx"]) == (str(layer), pos)
            assert node["feature"] == cantor_pair(layer, latent)
            assert node["jsNodeId"] == f"{layer}_{latent}-0"
            assert node["activation"] is not None and node["influence"] is not None
        elif kind == "mlp reconstruction error":
            layer, pos = map(int, match.groups())
            assert (node["layer"], node["ctx_idx"], node["feature"]) == (str(layer), pos, -1)
        elif kind == "embedding":
            token, pos = map(int, match.groups())
            assert (node["layer"], node["ctx_idx"], node["feature"]) == ("E", pos, pos)
            assert node["jsNodeId"] == f"E_{token}-{pos}"
        else:
            layer, token, pos = map(int, match.groups())
            assert (node["layer"], node["feature"], pos) == (str(layer), token, n_pos - 1)
            assert node["clerp"].startswith('Output "') and node["influence"] is None
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == n_pos  # every token, BOS included
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    for i, link in enumerate(data["links"]):
        check_fields(link, LINK, f"{path.name}:links[{i}]")
        assert link["source"] in ids and link["target"] in ids
    return data


def check_feature_file(path: Path) -> None:
    data = json.loads(path.read_text())
    check_fields(data, FEATURE_FILE, path.name)
    assert str(data["index"]) == path.stem
    for q in data["examples_quantiles"]:
        check_fields(q, {"quantile_name": str, "examples": list}, f"{path.name}:quantile")
        for ex in q["examples"]:
            check_fields(ex, EXAMPLE, f"{path.name}:example")
            assert len(ex["tokens"]) == len(ex["tokens_acts_list"])
            assert 0 <= ex["train_token_ind"] < len(ex["tokens"])


def check_export_dir(out: Path) -> list[dict[str, Any]]:
    """Every file an export wrote: the index, each graph it lists, each feature file."""
    index = json.loads((out / "graph-metadata.json").read_text())
    assert set(index) == {"graphs"}
    slugs = [m["slug"] for m in index["graphs"]]
    assert len(set(slugs)) == len(slugs)
    graphs = []
    for meta in index["graphs"]:
        check_metadata(meta, "graph-metadata.json")
        graphs.append(check_graph_file(out / f"{meta['slug']}.json"))
        assert graphs[-1]["metadata"] == meta
    assert {p.stem for p in out.glob("*.json")} == {*slugs, "graph-metadata"}
    for path in out.glob("features/*/*.json"):
        check_feature_file(path)
    return graphs


# -- tests ---------------------------------------------------------------------------------


class FakeCards:
    """Feature cards with the fields of `crv.cards.stage.FeatureCards`."""

    def label(self, layer: int, feature: int) -> str:
        return f"card {layer}/{feature}"

    def card(self, layer: int, feature: int) -> dict[str, Any]:
        return {
            "frequency": 0.01 * (layer + 1),
            "top_contexts": [
                {"text": "3+4=7", "token": "4", "token_start": 2, "activation": 2.5},
                {"text": "\n9*1", "token": "9", "activation": 1.0},
            ],
            "promotes": [{"token": "7", "value": 1.2}],
            "suppresses": [{"token": "8", "value": -0.7}],
        }


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny subject, traces (one step labelled incorrect), transcoders and graphs, and a run
    directory whose artifacts.json names them."""
    from datasets import load_from_disk

    root = tmp_path_factory.mktemp("run")
    inputs = make_artifacts(root)
    traces = load_from_disk(str(inputs["traces"] / "dataset"))

    def mark(row: dict[str, Any]) -> dict[str, Any]:
        if row["id"] == "t/3":
            row["steps"][1]["label"] = False
        return row

    traces.map(mark).save_to_disk(str(root / "traces2" / "dataset"))
    inputs["traces"] = root / "traces2"
    (root / "scratch").mkdir()
    run_stage(context(root, inputs, "graphs"))
    atomic_write_json(root / "graphs" / "manifest.json", {"config": dataclasses.asdict(CFG)})
    inputs["graphs"] = root / "graphs"
    atomic_write_json(root / "run" / "artifacts.json", {k: str(v) for k, v in inputs.items()})
    return {**inputs, "run": root / "run"}


def test_graph_json_is_the_pruned_attribution(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from datasets import load_from_disk

    model, tokenizer = load_subject(artifacts["subject"])
    adapter = ArchAdapter.for_model(model.requires_grad_(False))
    tset = load_transcoder_set(artifacts["transcoders"])
    trace = load_from_disk(str(artifacts["traces"] / "dataset"))[0]
    position = trace["steps"][-1]["last_token"]
    att = TraceAttributor(adapter, tset, trace["input_ids"], [position], CFG).attribute_step(
        position, 2, trace["id"]
    )
    exporter = GraphExporter(tmp_path, tokenizer, adapter.n_layers, "tiny set", 0.8, 0.98)
    path = exporter.add(att, trace["input_ids"], "t/0 step 2")
    exporter.finish()
    assert path.name == "t-0-step-2.json"
    (data,) = check_export_dir(tmp_path)
    assert not (tmp_path / "features").exists()  # no cards, no feature files
    assert data["metadata"]["scan"] == "./data/features/tiny-set"
    assert data["metadata"]["prompt_tokens"][0] == tokenizer.decode([trace["input_ids"][0]])

    # the same nodes and edges as crv's pruned graph, weights from the adjacency
    g = att.pruned(0.8, 0.98)
    node_ids = {n["node_id"] for n in data["nodes"]}
    feats = {
        (int(g.layer[j]), int(g.feature[j]), int(g.pos[j]))
        for j in np.flatnonzero(g.kind == FEATURE)
    }
    assert {f"{layer}_{f}_{p}" for layer, f, p in feats} <= node_ids
    n_exported = sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    assert n_exported == len(feats)
    assert len(data["links"]) == g.n_edges > 0
    column = {}
    for j in range(att.counts.n_nodes):
        kind, layer, pos, index = (
            int(att.nodes[c][j]) for c in ("kind", "layer", "pos", "feature")
        )
        column[
            {
                FEATURE: f"{layer}_{index}_{pos}",
                LOGIT: f"{adapter.n_layers + 1}_{index}_{pos}",
                TOKEN: f"E_{index}_{pos}",
            }.get(kind, f"0_{layer}_{pos}")
        ] = j
    rows = {int(n): r for r, n in enumerate(att.counts.row_nodes)}
    dense = att.adjacency_RN.numpy()
    for link in data["links"]:
        expected = dense[rows[column[link["target"]]], column[link["source"]]]
        assert link["weight"] == pytest.approx(float(expected), rel=1e-6)
    # BOS is a token node with edges; logits are the attributed ones, the first the target
    bos = f"E_{trace['input_ids'][0]}_0"
    assert any(link["source"] == bos for link in data["links"])
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
    assert logits[0]["token_prob"] == pytest.approx(float(att.logit_probs[0]))


def test_cumulative_influence_is_circuit_tracers_score() -> None:
    scores = cumulative_influence(np.array([0.1, 0.4, 0.0, 0.5]))
    np.testing.assert_allclose(scores, [1.0, 0.9, 1.0, 0.5])


def test_cards_label_nodes_and_fill_feature_files(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crv.cli.graphs as cli

    monkeypatch.setattr(cli, "load_cards", lambda _: FakeCards())
    summary = export_run(ExportConfig(run=str(artifacts["run"]), out=str(tmp_path), limit=2))
    assert summary["cards"] and summary["n_features"] > 0
    graphs = check_export_dir(tmp_path)
    features = [
        n for g in graphs for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"
    ]
    assert features and all(n["clerp"].startswith("card ") for n in features)
    files = sorted(tmp_path.glob("features/*/*.json"))
    assert {int(p.stem) for p in files} == {n["feature"] for n in features}
    first, second = json.loads(files[0].read_text())["examples_quantiles"][0]["examples"]
    assert first["tokens"] == ["3+", "4", "=7"] and first["tokens_acts_list"] == [0, 2.5, 0]
    assert second["tokens"] == ["⏎", "9", "*1"] and second["train_token_ind"] == 1


def test_cli_exports_incorrect_steps_first(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "view"
    monkeypatch.setattr(
        sys, "argv", ["crv-graphs", "export", f"run={artifacts['run']}", f"out={out}", "limit=3"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    graphs = check_export_dir(out)
    assert [g["metadata"]["slug"] for g in graphs] == ["t-3-step1", "t-0-step0", "t-0-step1"]
    # a second export into the same directory adds to the index
    cfg = ExportConfig(run=str(artifacts["run"]), out=str(out), limit=1, trace="t/2")
    assert run_export(cfg) == 0
    assert len(check_export_dir(out)) == 4


def test_bad_run_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_export(ExportConfig(run=str(tmp_path), out=str(tmp_path / "o"))) == 2
    assert f"{tmp_path / 'artifacts.json'}: not found" in capsys.readouterr().err
    atomic_write_json(tmp_path / "artifacts.json", {"subject": str(tmp_path)})
    assert run_export(ExportConfig(run=str(tmp_path), out=str(tmp_path / "o"))) == 2
    assert "no 'traces' artifact" in capsys.readouterr().err


def test_crv_verify_exports_every_step(tiny_bundle: Path, tmp_path: Path) -> None:
    from crv.cli.verify import verify_main
    from crv.verify.config import VerifyConfig

    lines = [
        {"id": "mine", "prompt": PROMPT, "steps": STEPS},
        {"prompt": PROMPT, "steps": STEPS[:1]},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    cfg = VerifyConfig(
        bundle=str(tiny_bundle),
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out.jsonl"),
        export_graphs=str(tmp_path / "view"),
        quiet=True,
    )
    assert verify_main(cfg) == 0
    graphs = check_export_dir(tmp_path / "view")
    slugs = ["mine-step0", "mine-step1", "mine-step2", "line2-step0"]
    assert [g["metadata"]["slug"] for g in graphs] == slugs
    assert graphs[0]["metadata"]["prompt"].startswith(PROMPT)
