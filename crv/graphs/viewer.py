"""circuit-tracer's graph viewer, offline: its page from its wheel, its libraries from npm.

Why: crv writes step graphs in circuit-tracer's graph JSON (`crv.graphs.export`) and leaves
the drawing to circuit-tracer's viewer, but that viewer loads d3 (with jetpack's helpers),
dagre and pako from script hosts, so without them the page stays blank, and circuit-tracer
itself cannot share crv's virtualenv (it pins transformers <= 4.57.3). So `crv-graphs serve`
builds an offline copy of the viewer once, into a cache folder:

- the page: `circuit_tracer/frontend/assets/` (HTML, JS, CSS; MIT licence) from circuit-tracer's
  wheel, fetched with `pip download --no-deps circuit-tracer==VIEWER_VERSION` and unpacked,
  not installed;
- the libraries: `npm pack` of NPM_FILES' packages (the npm registry, no script host), with
  the viewer's `<script src='https://...'>` lines pointed at the local copies; the d3 it
  loads is d3 7 plus jetpack's helpers, which d3-jetpack 2.3's d3v7 bundle provides with a
  few additions (JETPACK_SHIM); the host's hot-reload client, its newer jetpack and npy
  reader are not used by the graph page and are dropped.

The server (`ViewerServer`) answers on 127.0.0.1 only, as circuit-tracer's local server lays
it out: `/data/<path>` and `/graph_data/<path>` from the export directory, the rest from the
page's folder; it serves files only (no listings, nothing outside those two folders, no
saving: the viewer's Save button gets 501).

Error-node ids: circuit-tracer 0.5.0 wrote `0_{layer}_{pos}`; the versions after it
`{layer}_-1_{pos}` (0.5.0's id was also that of latent `layer` of layer 0). The viewer uses
ids only as keys, so both formats load in either.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from crv.errors import CRVError
from crv.io import current_umask
from crv.options import Choice

log = logging.getLogger("crv.graphs.viewer")

NodeIds = Choice("NodeIds", {"current": "current", "0.5.0": "0.5.0"})
"""Which circuit-tracer's error-node ids an export writes: `current` (`{layer}_-1_{pos}`,
circuit-tracer after 0.5.0) or `0.5.0` (`0_{layer}_{pos}`)."""
ERROR_ID = {"current": "{layer}_-1_{pos}", "0.5.0": "0_{layer}_{pos}"}

VIEWER_VERSION = "0.5.0"
"""circuit-tracer release whose viewer page is served (pinned: the newest the package index
served when written; the JETPACK_SHIM and SCRIPT_HOSTED are checked against its page)."""
ASSETS = "circuit_tracer/frontend/assets/"
NPM_FILES = {
    "d3-jetpack@2.3.0": {"package/build/d3v7+jetpack.js": "lib/d3v7+jetpack.js"},
    "dagre@0.8.5": {"package/dist/dagre.min.js": "lib/dagre.min.js"},
    "pako@2.1.0": {"package/dist/pako.min.js": "lib/pako.min.js"},
}
"""npm package -> {file in its tarball: where the offline viewer gets it}."""
SCRIPT_HOSTED = {
    "static_js/lib/d3.js": "lib/d3v7+jetpack.js",
    "dagre@0.8.5/dist/dagre.min.js": "lib/dagre.min.js",
    "pako@2.1.0/dist/pako.min.js": "lib/pako.min.js",
}
"""End of a script-host URL in the viewer's index.html -> the local file loaded instead."""
HOSTED_SCRIPT = re.compile(r"""<script src=(['"])(https?://[^'"]+)\1""")
JETPACK_SHIM = """
  // crv's offline copy: the bundle adds jetpack's methods to a second d3-selection; copy
  // them over, and give conventions() the drawAxis(svg) of the viewer's newer jetpack
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
"""Inserted before the bundle's closing `}));`, inside its factory (where `exports` is the
global d3 and `selection`/`transition` the bundle's own)."""


class ViewerError(CRVError):
    """The offline viewer could not be fetched or served: printed as one line, exit 2."""


def default_cache() -> Path:
    """Where the offline viewer is kept: `$XDG_CACHE_HOME/crv/viewer` (~/.cache/crv/viewer)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crv" / "viewer"


def error_node_id(layer: int, pos: int, node_ids: str = "current") -> str:
    """The graph-JSON id of the error node of `layer` at `pos`, in `node_ids`' format."""
    return ERROR_ID[str(NodeIds(node_ids))].format(layer=layer, pos=pos)


def _run(cmd: list[str], what: str) -> None:
    """Run a fetch command; a ViewerError with its last line of stderr if it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ViewerError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ViewerError(f"{what} failed (exit {done.returncode}): {last}")


def fetch_wheel(downloads: Path) -> Path:
    """circuit-tracer's wheel in `downloads`, fetched from PyPI unless it is there."""
    pattern = f"circuit_tracer-{VIEWER_VERSION}-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        spec = f"circuit-tracer=={VIEWER_VERSION}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        _run([*cmd, "-d", str(downloads), spec], f"pip download {spec}")
        found = sorted(downloads.glob(pattern))
    if not found:
        raise ViewerError(f"pip download circuit-tracer=={VIEWER_VERSION}: no wheel in {downloads}")
    return found[-1]


def fetch_npm(downloads: Path) -> dict[str, Path]:
    """NPM_FILES' package tarballs in `downloads`, packed from the npm registry once."""
    tarball = {spec: downloads / f"{spec.replace('@', '-')}.tgz" for spec in NPM_FILES}
    missing = [spec for spec, path in tarball.items() if not path.is_file()]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise ViewerError(
                "npm not found: the viewer's libraries come from the npm registry "
                "(Debian: apt-get install npm)"
            )
        cmd = [npm, "pack", *missing, "--pack-destination", str(downloads)]
        _run(cmd, f"npm pack {' '.join(missing)}")
    for spec, path in tarball.items():
        if not path.is_file():
            raise ViewerError(f"npm pack {spec}: no {path.name} in {downloads}")
    return tarball


def _unpack_assets(wheel: Path, dest: Path) -> None:
    """The viewer's page files from the wheel (only members under ASSETS, by name)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(ASSETS) and not m.endswith("/")]
        if f"{ASSETS}index.html" not in members:
            raise ViewerError(f"{wheel.name}: no {ASSETS}index.html")
        for member in members:
            rel = Path(member[len(ASSETS) :])
            if ".." in rel.parts:
                raise ViewerError(f"{wheel.name}: unsafe member {member}")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(zf.read(member))


def _unpack_libs(tarballs: dict[str, Path], dest: Path) -> None:
    """NPM_FILES' files from their tarballs, the jetpack bundle with JETPACK_SHIM added."""
    for spec, files in NPM_FILES.items():
        with tarfile.open(tarballs[spec]) as tf:
            for member, target in files.items():
                try:
                    data = tf.extractfile(member)
                except KeyError:
                    data = None
                if data is None:
                    raise ViewerError(f"{tarballs[spec].name}: no file {member}")
                text = data.read().decode("utf-8")
                if target == SCRIPT_HOSTED["static_js/lib/d3.js"]:
                    end = text.rfind("}));")
                    if end < 0:
                        raise ViewerError(f"{tarballs[spec].name}: {member} is no UMD bundle")
                    text = text[:end] + JETPACK_SHIM + text[end:]
                (dest / target).parent.mkdir(parents=True, exist_ok=True)
                (dest / target).write_text(text, encoding="utf-8")


def offline_index(html: str) -> str:
    """The viewer's index.html with each script-host script replaced by its local copy (or
    dropped where the graph page does not need it); ViewerError if one it needs is absent."""
    lines, used = [], set()
    for line in html.splitlines():
        hosted = HOSTED_SCRIPT.search(line)
        if hosted:
            url = hosted.group(2)
            local = [(k, v) for k, v in SCRIPT_HOSTED.items() if url.endswith(k)]
            if not local:
                continue
            used.add(local[0][0])
            line = line.replace(url, "./" + local[0][1])
        lines.append(line)
    missing = sorted(set(SCRIPT_HOSTED) - used)
    if missing:
        raise ViewerError(f"the viewer's index.html loads none of {missing} (another version?)")
    return "\n".join(lines) + "\n"


def prepare_viewer(cache: str | Path | None = None) -> Path:
    """The offline viewer's page folder, built in `cache` on first use (fetching the wheel
    and the npm packages), then reused as it is."""
    cache = Path(cache) if cache else default_cache()
    folder = cache / f"circuit-tracer-{VIEWER_VERSION}"
    if (folder / "index.html").is_file():
        return folder
    downloads = cache / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        wheel, tarballs = fetch_wheel(downloads), fetch_npm(downloads)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
        try:
            _unpack_assets(wheel, tmp)
            _unpack_libs(tarballs, tmp)
            index = tmp / "index.html"
            index.write_text(offline_index(index.read_text(encoding="utf-8")), encoding="utf-8")
            tmp.chmod(0o777 & ~current_umask())
            if (folder / "index.html").is_file():  # built meanwhile by another process
                return folder
            shutil.rmtree(folder, ignore_errors=True)  # a folder left without its page
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ViewerError(
            f"building the offline viewer in {cache}: {exc} (delete {downloads} to fetch again)"
        ) from None
    log.info("offline viewer built in %s", folder)
    return folder


def graph_slugs(data_dir: str | Path) -> list[str]:
    """The slugs of an export directory's index (`graph-metadata.json`)."""
    path = Path(data_dir) / "graph-metadata.json"
    try:
        return [g["slug"] for g in json.loads(path.read_text(encoding="utf-8"))["graphs"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ViewerError(f"{path}: not a viewer index ({exc})") from None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of the page folder, `/data/` and `/graph_data/` from the export directory."""

    data_dir: Path

    def translate_path(self, path: str) -> str:
        parts = [p for p in unquote(urlsplit(path).path).split("/") if p not in ("", ".")]
        root = Path(self.directory)
        if parts and parts[0] in ("data", "graph_data"):
            root, parts = self.data_dir, parts[1:]
        if any(p == ".." or os.sep in p for p in parts):
            return ""  # no such file: 404
        return str(root.joinpath(*parts))

    def list_directory(self, path: Any) -> None:
        self.send_error(404, "no listings")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class ViewerServer:
    """The viewer and an export directory on http://127.0.0.1:`port` (0: a free port), in a
    daemon thread until `stop()`."""

    def __init__(self, data_dir: str | Path, frontend: str | Path, port: int = 8032) -> None:
        handler = type("Handler", (_Handler,), {"data_dir": Path(data_dir).resolve()})
        directory = str(Path(frontend).resolve())
        try:
            self.httpd = http.server.ThreadingHTTPServer(
                ("127.0.0.1", port), functools.partial(handler, directory=directory)
            )
        except OSError as exc:
            raise ViewerError(
                f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); choose another port=N"
            ) from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, slug: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port}/index.html" + (f"?slug={slug}" if slug else "")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
