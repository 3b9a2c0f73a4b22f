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

The bundled viewer loads d3, dagre and pako from script hosts. Without network, pass
`--frontend` the offline copy that `crv-graphs serve` builds (`crv.graphs.viewer`: the same
page with those libraries from npm), e.g. ~/.cache/crv/viewer/circuit-tracer-0.5.0.
circuit-tracer's models need only pydantic, so a virtualenv with
`pip install --no-deps circuit-tracer==0.5.0 pydantic` runs this script.

    crv-graphs export run=outputs/runs/<date>/<time> out=/tmp/view limit=5
    /tmp/ctvenv/bin/python benchmarks/graph_export_circuit_tracer.py /tmp/view \\
        [--screenshot docs/viewer.png --slug SLUG --clicked NODE_ID --frontend DIR]

Prints one line per checked file kind and ends with `ok: N graphs, M feature files`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
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
        "--frontend",
        type=Path,
        help="a viewer page folder served instead of the bundled one, e.g. the offline copy "
        "crv-graphs serve builds (~/.cache/crv/viewer/circuit-tracer-0.5.0)",
    )
    args = parser.parse_args()
    from circuit_tracer.frontend.local_server import serve

    slugs, features = validate(args.out)
    server = serve(str(args.out.resolve()), frontend_dir=args.frontend, port=args.port)
    try:
        check_served(args.out, args.port, slugs, features)
        if args.screenshot:
            screenshot(args.port, args.slug or slugs[0], args.screenshot, args.clicked)
    finally:
        server.stop()
    print(f"ok: {len(slugs)} graphs, {len(features)} feature files")


if __name__ == "__main__":
    main()
