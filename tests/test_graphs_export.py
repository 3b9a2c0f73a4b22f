"""`crv-graphs export` writes circuit-tracer graph JSON that its viewer reads, and
`crv-graphs serve` shows it offline.

Every exported file is checked against the schema of circuit-tracer 0.5.0's pydantic models
(`frontend/graph_models.py`, `frontend/feature_models.py`: required fields and their types,
restated here because the test suite runs without circuit-tracer) and against the graph it
came from: ids (error nodes in either circuit-tracer format) and Cantor numbers, link
weights equal to the adjacency, the BOS token node. `benchmarks/graph_export_circuit_tracer.py`
runs the same files through circuit-tracer's own models and local server.

The offline viewer is built from a fake wheel and fake npm tarballs (no network: the fetch
commands are faked where they run) and served on 127.0.0.1 for a few seconds.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_bundle import PROMPT, STEPS
from fixtures_graphs import CFG, context, make_artifacts

import crv.graphs.viewer as viewer
from crv.cli.graphs import ExportConfig, ServeConfig, export_run, main, run_export, run_serve
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
    "embedding": r"E_(\d+)_(\d+)",
    "logit": r"(\d+)_(\d+)_(\d+)",
}
ERROR_ID_FORMATS = {"current": r"(\d+)_-1_(\d+)", "0.5.0": r"0_(\d+)_(\d+)"}
"""Error-node ids: circuit-tracer after 0.5.0, and 0.5.0."""


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


def check_graph_file(path: Path, node_ids: str = "current") -> dict[str, Any]:
    """Schema and internal consistency of one `<slug>.json` (error ids in `node_ids`'
    format); returns its content."""
    formats = {**ID_FORMATS, "mlp reconstruction error": ERROR_ID_FORMATS[node_ids]}
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
        match = re.fullmatch(formats[kind], node["node_id"])
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


def check_export_dir(out: Path, node_ids: str = "current") -> list[dict[str, Any]]:
    """Every file an export wrote: the index, each graph it lists, each feature file."""
    index = json.loads((out / "graph-metadata.json").read_text())
    assert set(index) == {"graphs"}
    slugs = [m["slug"] for m in index["graphs"]]
    assert len(set(slugs)) == len(slugs)
    graphs = []
    for meta in index["graphs"]:
        check_metadata(meta, "graph-metadata.json")
        graphs.append(check_graph_file(out / f"{meta['slug']}.json", node_ids))
        assert graphs[-1]["metadata"] == meta
    assert {p.stem for p in out.glob("*.json")} == {*slugs, "graph-metadata"}
    for path in out.glob("features/*/*.json"):
        check_feature_file(path)
    return graphs


# -- tests ---------------------------------------------------------------------------------


class FakeCards:
    """Feature cards with the fields of `crv.cards.store.FeatureCards`."""

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


def test_error_node_ids_follow_circuit_tracer() -> None:
    assert viewer.error_node_id(1, 3) == "1_-1_3"
    # 0.5.0's id of that error node is also the id of latent 1 of layer 0 at position 3
    assert viewer.error_node_id(1, 3, "0.5.0") == "0_1_3"
    with pytest.raises(ValueError):
        viewer.error_node_id(1, 3, "0.4")


@pytest.mark.parametrize("id_format", ["current", "0.5.0"])
def test_graph_json_is_the_pruned_attribution(
    artifacts: dict[str, Path], tmp_path: Path, id_format: str
) -> None:
    from datasets import load_from_disk

    model, tokenizer = load_subject(artifacts["subject"])
    adapter = ArchAdapter.for_model(model.requires_grad_(False))
    tset = load_transcoder_set(artifacts["transcoders"])
    trace = load_from_disk(str(artifacts["traces"] / "dataset"))[0]
    position = trace["steps"][-1]["last_token"]
    att = TraceAttributor(adapter, tset, trace["input_ids"], [position], CFG).attribute_step(
        position, 2, trace["id"]
    )
    exporter = GraphExporter(
        tmp_path, tokenizer, adapter.n_layers, "tiny set", 0.8, 0.98, node_ids=id_format
    )
    path = exporter.add(att, trace["input_ids"], "t/0 step 2")
    exporter.finish()
    assert path.name == "t-0-step-2.json"
    (data,) = check_export_dir(tmp_path, id_format)
    assert any(n["feature_type"] == "mlp reconstruction error" for n in data["nodes"])
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
            }.get(kind, viewer.error_node_id(layer, pos, id_format))
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
    cfg = ExportConfig(run=str(artifacts["run"]), out=str(tmp_path), limit=2, node_ids="0.5.0")
    summary = export_run(cfg)
    assert summary["cards"] and summary["n_features"] > 0
    graphs = check_export_dir(tmp_path, "0.5.0")
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
    from crv.check.config import VerifyConfig
    from crv.cli.verify import verify_command

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
    assert verify_command(cfg) == 0
    graphs = check_export_dir(tmp_path / "view")
    slugs = ["mine-step0", "mine-step1", "mine-step2", "line2-step0"]
    assert [g["metadata"]["slug"] for g in graphs] == slugs
    assert graphs[0]["metadata"]["prompt"].startswith(PROMPT)


# -- the offline viewer and `crv-graphs serve` ---------------------------------------------

PAGE = "\n".join(
    [
        "<link rel='stylesheet' href='./style.css'>",
        "<script src='https://host.example/static_js/lib/hotserver-client-ws.js'></script>",
        "<script src='https://host.example/static_js/lib/d3.js'></script>",
        "<script src='https://host.example/static_js/lib/jetpack_2024-07-20.js'></script>",
        "<script src='https://cdn.example/dagre@0.8.5/dist/dagre.min.js'></script>",
        '<script src="https://cdn.example/pako@2.1.0/dist/pako.min.js"></script>',
        "<script src='./util.js'></script>",
        "<script>window.init()</script>",
    ]
)
"""The head of circuit-tracer 0.5.0's index.html, as it loads its scripts."""
BUNDLE = "(function (global, factory) {\n})(this, (function (exports) {\n  exports.x = 1;\n}));\n"


def fake_fetch(mp: pytest.MonkeyPatch, page: str = PAGE) -> list[list[str]]:
    """Fake pip and npm where viewer runs them (no network): pip writes a wheel holding
    `page` and one script, npm the tarballs of the packages asked for; returns the calls."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[1:4] == ["-m", "pip", "download"]:
            version = cmd[-1].split("==")[1]
            wheel = Path(cmd[cmd.index("-d") + 1]) / f"circuit_tracer-{version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(viewer.ASSETS + "index.html", page)
                zf.writestr(viewer.ASSETS + "attribution_graph/init-cg.js", "// cg")
                zf.writestr("circuit_tracer/graph.py", "# not part of the page")
        else:
            dest = Path(cmd[cmd.index("--pack-destination") + 1])
            for spec in cmd[2 : cmd.index("--pack-destination")]:
                with tarfile.open(dest / f"{spec.replace('@', '-')}.tgz", "w:gz") as tf:
                    for member in viewer.NPM_FILES[spec]:
                        data = (BUNDLE if "jetpack" in member else f"// {spec}").encode()
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    mp.setattr(viewer.subprocess, "run", run)
    mp.setattr(viewer.shutil, "which", lambda name: f"/usr/bin/{name}")
    return calls


def test_offline_viewer_is_fetched_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_fetch(monkeypatch)
    folder = viewer.prepare_viewer(tmp_path)
    assert folder == tmp_path / "circuit-tracer-0.5.0"
    pip, npm = calls
    assert pip[-1] == "circuit-tracer==0.5.0" and "--no-deps" in pip
    assert npm[:5] == ["/usr/bin/npm", "pack", "d3-jetpack@2.3.0", "dagre@0.8.5", "pako@2.1.0"]
    # the page loads the npm copies instead of the script hosts, in the same order
    lines = (folder / "index.html").read_text().splitlines()
    assert "https://" not in "\n".join(lines)
    assert [line.split("src=")[1][1:].split("'")[0].split('"')[0] for line in lines[1:5]] == [
        "./lib/d3v7+jetpack.js",
        "./lib/dagre.min.js",
        "./lib/pako.min.js",
        "./util.js",
    ]
    assert lines[0] == "<link rel='stylesheet' href='./style.css'>"
    assert (folder / "attribution_graph" / "init-cg.js").read_text() == "// cg"
    assert not (folder / "graph.py").exists()
    assert (folder / "lib" / "dagre.min.js").read_text() == "// dagre@0.8.5"
    d3 = (folder / "lib" / "d3v7+jetpack.js").read_text()
    assert d3.startswith(BUNDLE[: BUNDLE.rindex("}));")]) and d3.endswith("}));\n")
    assert viewer.JETPACK_SHIM in d3
    # built once; rebuilt from the downloads without fetching again
    assert viewer.prepare_viewer(tmp_path) == folder and len(calls) == 2
    viewer.shutil.rmtree(folder)
    assert (viewer.prepare_viewer(tmp_path) / "index.html").is_file() and len(calls) == 2


def test_offline_viewer_failures_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_fetch(monkeypatch, page=PAGE.replace("static_js/lib/d3.js", "d3@7.js"))
    with pytest.raises(viewer.ViewerError, match=r"loads none of \['static_js/lib/d3.js'\]"):
        viewer.prepare_viewer(tmp_path / "a")
    assert not (tmp_path / "a" / "circuit-tracer-0.5.0").exists()
    monkeypatch.setattr(viewer.shutil, "which", lambda name: None)
    with pytest.raises(viewer.ViewerError, match="npm not found"):
        viewer.prepare_viewer(tmp_path / "b")

    def refused(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: no network")

    monkeypatch.setattr(viewer.subprocess, "run", refused)
    with pytest.raises(viewer.ViewerError, match=r"circuit-tracer==0.5.0 failed .*no network$"):
        viewer.prepare_viewer(tmp_path / "c")


@pytest.fixture(scope="module")
def exported(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export directory with feature files (two graphs of the tiny run)."""
    import crv.cli.graphs as cli

    out = tmp_path_factory.mktemp("view")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "load_cards", lambda _: FakeCards())
        export_run(ExportConfig(run=str(artifacts["run"]), out=str(out), limit=2))
    return out


@pytest.fixture(scope="module")
def viewer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("viewer-cache")
    with pytest.MonkeyPatch.context() as mp:
        fake_fetch(mp)
        viewer.prepare_viewer(cache)
    return cache


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def raw_status(port: int, method: str, path: str) -> int:
    """Status of a request sent as written (no client-side path normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_server_answers_on_loopback_only(exported: Path, viewer_cache: Path) -> None:
    server = viewer.ViewerServer(exported, viewer.prepare_viewer(viewer_cache), port=0)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{server.port}"
        assert b"./lib/d3v7+jetpack.js" in get(f"{base}/index.html")
        index = json.loads(get(f"{base}/data/graph-metadata.json"))
        assert index == json.loads((exported / "graph-metadata.json").read_text())
        slug = index["graphs"][0]["slug"]
        assert get(f"{base}/graph_data/{slug}.json") == (exported / f"{slug}.json").read_bytes()
        feature = next(exported.glob("features/*/*.json"))
        assert get(f"{base}/data/{feature.relative_to(exported).as_posix()}") == (
            feature.read_bytes()
        )
        assert raw_status(server.port, "GET", "/data/../graph-metadata.json") == 404
        assert raw_status(server.port, "GET", "/data/%2e%2e/graph-metadata.json") == 404
        assert raw_status(server.port, "GET", "/data/features/") == 404  # no listings
        assert raw_status(server.port, "POST", f"/save_graph/{slug}") == 501
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{server.port}/index.html")


def served_url(capsys: pytest.CaptureFixture[str], worker: threading.Thread) -> str:
    """The page URL `crv-graphs serve` prints, read while it serves (at most 60 s)."""
    out, deadline = "", time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        out += capsys.readouterr().out
        found = re.search(r"http://127\.0\.0\.1:\d+/\S+", out)
        if found:
            return found.group(0)
        time.sleep(0.05)
    raise AssertionError(f"no URL printed: {out!r}")


def serve_in_thread(cfg: ServeConfig) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    worker = threading.Thread(target=lambda: status.append(run_serve(cfg)), daemon=True)
    worker.start()
    return worker, status


def test_serve_shows_an_export_and_stops_itself(
    exported: Path, viewer_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ServeConfig(
        run=str(exported), port=0, browser=False, cache=str(viewer_cache), stop_after=3
    )
    worker, status = serve_in_thread(cfg)
    url = served_url(capsys, worker)
    first = json.loads((exported / "graph-metadata.json").read_text())["graphs"][0]["slug"]
    assert url.endswith(f"/index.html?slug={first}")
    assert b"./lib/pako.min.js" in get(url)
    worker.join(timeout=30)
    assert not worker.is_alive() and status == [0]


def test_serve_exports_a_run_first(
    artifacts: dict[str, Path], viewer_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = artifacts["run"]
    cfg = ServeConfig(run=str(run), port=0, browser=False, cache=str(viewer_cache), stop_after=1)
    worker, status = serve_in_thread(cfg)
    url = served_url(capsys, worker)
    worker.join(timeout=30)
    assert status == [0] and "slug=t-3-step1" in url
    assert len(check_export_dir(run / "graphs-view")) == 5


def test_serve_problems_are_one_line(
    exported: Path, viewer_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = viewer.ViewerServer(exported, viewer.prepare_viewer(viewer_cache), port=0)
    try:
        cfg = ServeConfig(run=str(exported), port=busy.port, cache=str(viewer_cache))
        assert run_serve(cfg) == 2
        assert f"cannot listen on 127.0.0.1:{busy.port}" in capsys.readouterr().err
    finally:
        busy.stop()
    assert run_serve(ServeConfig(run=str(tmp_path), cache=str(viewer_cache))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a crv run directory" in err


def test_cli_serve_bad_run_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["crv-graphs", "serve", f"run={tmp_path}", "browser=false"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
