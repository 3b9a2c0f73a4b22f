"""Check a `crv-graphs export` directory with circuit-tracer 0.5.0 itself; optionally screenshot it.

Why: the test suite checks exported files against a restatement of circuit-tracer's schema
(CI has no circuit-tracer); this script is the check against the real thing. It runs in
circuit-tracer's own virtualenv (transformers <= 4.57.3, nnsight 0.6.x; see
`attribution_circuit_tracer.py` for the install line) and imports only circuit_tracer and the
standard library, never crv:

1. every `<slug>.json` listed in `graph-metadata.json` is parsed by circuit-tracer's pydantic
   `frontend.graph_models.Model` (metadata, qParams, nodes, links), each index entry by
   `Metadata`, each feature file under `features/` by `frontend.feature_models.Model`;
   node ids are unique and every link joins two nodes of its graph;
2. `frontend.local_server.serve(out, port)` serves the directory, and the viewer's page, the
   index (`/data/graph-metadata.json`), every graph (`/graph_data/<slug>.json`) and every
   feature file (`/data/features/...`, the path the viewer asks for with a local scan) come
   back with status 200 and the same content;
3. with `--screenshot FILE`, headless Chromium (`apt-get install chromium`) loads the viewer
   on the first graph (or `--slug`, with node `--clicked` selected) and saves a PNG.

The viewer loads d3, its jetpack helpers, dagre and pako from script hosts. Without network,
`--offline-libs node_modules` serves a copy of it that loads them from npm packages instead
(`npm install d3-jetpack@2.3.0 dagre@0.8.5 pako@2.1.0`; jetpack 2.3's d3 7 bundle, with a
small shim for what the viewer's newer jetpack adds: see `JETPACK_SHIM`).

    crv-graphs export run=outputs/runs/<date>/<time> out=/tmp/view limit=5
    /tmp/ctvenv/bin/python benchmarks/graph_export_circuit_tracer.py /tmp/view \\
        [--screenshot docs/viewer.png --slug SLUG --clicked NODE_ID --offline-libs node_modules]

Prints one line per checked file kind and ends with `ok: N graphs, M feature files`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        if response.status != 200:
            sys.exit(f"{url}: status {response.status}")
        body = response.read()
        return gzip.decompress(body) if response.headers.get("Content-Encoding") == "gzip" else body


def validate(out: Path) -> tuple[list[str], list[Path]]:
    """Slugs and feature files of an export directory, each parsed by circuit-tracer's models."""
    from circuit_tracer.frontend import feature_models, graph_models

    index = json.loads((out / "graph-metadata.json").read_text())
    slugs = []
    for entry in index["graphs"]:
        meta = graph_models.Metadata.model_validate(entry)
        graph = graph_models.Model.model_validate_json((out / f"{meta.slug}.json").read_text())
        ids = [n.node_id for n in graph.nodes]
        if len(set(ids)) != len(ids):
            sys.exit(f"{meta.slug}: duplicate node ids")
        known = set(ids)
        for link in graph.links:
            graph_models.Link.model_validate(link)
            if link["source"] not in known or link["target"] not in known:
                sys.exit(f"{meta.slug}: link {link} joins a node the graph does not have")
        if graph.metadata != meta:
            sys.exit(f"{meta.slug}: its metadata differs from graph-metadata.json's entry")
        slugs.append(meta.slug)
    print(f"graphs: {len(slugs)} parsed by circuit_tracer.frontend.graph_models.Model")
    features = sorted(out.glob("features/*/*.json"))
    for path in features:
        feature_models.Model.model_validate_json(path.read_text())
    print(f"features: {len(features)} parsed by circuit_tracer.frontend.feature_models.Model")
    return slugs, features


def check_served(out: Path, port: int, slugs: list[str], features: list[Path]) -> None:
    base = f"http://localhost:{port}"
    if b"graph-metadata.json" not in fetch(f"{base}/index.html"):
        sys.exit("the served index.html is not circuit-tracer's viewer")
    served = json.loads(fetch(f"{base}/data/graph-metadata.json"))
    if served != json.loads((out / "graph-metadata.json").read_text()):
        sys.exit("/data/graph-metadata.json differs from the file")
    for slug in slugs:
        if json.loads(fetch(f"{base}/graph_data/{slug}.json")) != json.loads(
            (out / f"{slug}.json").read_text()
        ):
            sys.exit(f"/graph_data/{slug}.json differs from the file")
    for path in features:
        rel = path.relative_to(out).as_posix()
        if json.loads(fetch(f"{base}/data/{rel}")) != json.loads(path.read_text()):
            sys.exit(f"/data/{rel} differs from the file")
    print(f"served: index.html, the index, {len(slugs)} graphs, {len(features)} feature files")


OFFLINE_SCRIPTS = {
    "static_js/lib/d3.js": "lib/d3v7+jetpack.js",  # d3 7 with the jetpack helpers
    "dagre@0.8.5/dist/dagre.min.js": "lib/dagre.min.js",
    "pako@2.1.0/dist/pako.min.js": "lib/pako.min.js",
}
"""The viewer's scripts from script hosts (tail of the URL) -> the local copy served instead;
its jetpack_2024-07-20.js, npy_v0.js and hotserver-client-ws.js are left out."""
JETPACK_SHIM = """
  // offline copy: the bundle adds jetpack's methods to a second d3-selection; copy them over,
  // and give conventions() the drawAxis(svg) of the viewer's newer jetpack
  ['translate', 'append', 'insert', 'parent', 'selectAppend', 'tspans', 'appendMany', 'at',
   'st', 'prop'].forEach(function (k) { exports.selection.prototype[k] = selection.prototype[k]; });
  ['translate', 'at', 'st'].forEach(function (k) {
    exports.transition.prototype[k] = transition.prototype[k]; });
  var conventions0 = exports.conventions;
  exports.conventions = function (c) {
    c = conventions0(c);
    c.drawAxis = function (svg) {
      svg = svg || c.svg;
      svg.append('g').attr('class', 'x axis')
        .attr('transform', 'translate(0,' + c.height + ')').call(c.xAxis);
      svg.append('g').attr('class', 'y axis').call(c.yAxis);
    };
    return c;
  };
"""


def offline_frontend(node_modules: Path, dest: Path) -> Path:
    """A copy of circuit-tracer's viewer that loads its libraries from `dest/lib`."""
    from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR

    out = dest / "assets"
    shutil.copytree(str(DEFAULT_FRONTEND_DIR), out)
    (out / "lib").mkdir()
    bundle = (node_modules / "d3-jetpack/build/d3v7+jetpack.js").read_text()
    end = bundle.rindex("}));")
    (out / OFFLINE_SCRIPTS["static_js/lib/d3.js"]).write_text(
        bundle[:end] + JETPACK_SHIM + bundle[end:]
    )
    for name in ("dagre/dist/dagre.min.js", "pako/dist/pako.min.js"):
        shutil.copy(node_modules / name, out / "lib")
    page = out / "index.html"
    lines = []
    for line in page.read_text().splitlines():
        if "<script src='https://" in line:
            url = line.split("'")[1]
            local = [v for k, v in OFFLINE_SCRIPTS.items() if url.endswith(k)]
            if not local:
                continue
            line = line.replace(url, "./" + local[0])
        lines.append(line)
    page.write_text("\n".join(lines) + "\n")
    return out


def screenshot(port: int, slug: str, path: Path, clicked: str | None) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH (apt-get install chromium)")
    url = f"http://localhost:{port}/index.html?slug={slug}"
    if clicked:
        url += f"&clickedId={clicked}"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1600,1100",
            "--virtual-time-budget=15000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"screenshot: {path} ({url})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="a crv-graphs export directory")
    parser.add_argument("--port", type=int, default=8032)
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the viewer here")
    parser.add_argument("--slug", help="graph shown in the screenshot (default: the first)")
    parser.add_argument("--clicked", help="node id selected in the screenshot")
    parser.add_argument(
        "--offline-libs",
        type=Path,
        help="a node_modules folder with d3-jetpack@2.3.0, dagre@0.8.5 and pako@2.1.0: serve a "
        "copy of the viewer that loads them instead of its script hosts (no network here)",
    )
    args = parser.parse_args()
    from circuit_tracer.frontend.local_server import serve

    slugs, features = validate(args.out)
    scratch = tempfile.TemporaryDirectory(prefix="ct_viewer_")
    frontend = (
        offline_frontend(args.offline_libs, Path(scratch.name)) if args.offline_libs else None
    )
    server = serve(str(args.out.resolve()), frontend_dir=frontend, port=args.port)
    try:
        check_served(args.out, args.port, slugs, features)
        if args.screenshot:
            screenshot(args.port, args.slug or slugs[0], args.screenshot, args.clicked)
    finally:
        server.stop()
        scratch.cleanup()
    print(f"ok: {len(slugs)} graphs, {len(features)} feature files")


if __name__ == "__main__":
    main()
