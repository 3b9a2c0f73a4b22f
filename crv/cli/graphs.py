"""`crv-graphs export` / `crv-graphs serve`: a run's step graphs in circuit-tracer's viewer.

Usage (Hydra overrides)::

    crv-graphs export run=outputs/runs/<date>/<time> out=graphs-view limit=5
    crv-graphs serve run=outputs/runs/<date>/<time>    # or run=graphs-view; port=8032

The run directory's `artifacts.json` names the artifacts read: `graphs` (which steps were
attributed, at which position, with which settings), `traces`, `transcoders`, `subject` and,
when present, `cards` (feature labels and the viewer's feature files). The chosen steps are
re-attributed with the graphs artifact's settings, since the stored graphs are pruned and
the viewer's node scores need the unpruned influence (`crv.graphs.export`), and written as
`<out>/<slug>.json`, `<out>/graph-metadata.json` and `<out>/features/...`.

`serve` shows an export directory, or a run's graphs (exported first into `<run>/graphs-view`
with export's defaults), in circuit-tracer's viewer on 127.0.0.1, offline: the viewer's
page and libraries are fetched once (PyPI, npm) into a cache (`crv.graphs.viewer`).

Exit status 0 on success, 2 with a one-line error naming the problem (missing artifact,
unknown trace, bad option, a port in use, a failed fetch) and no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crv.errors import CRVError
from crv.graphs.viewer import NodeIds

log = logging.getLogger("crv.graphs.export")
REQUIRED = ("subject", "traces", "transcoders", "graphs")
INDEX = "graph-metadata.json"


@dataclass
class ExportConfig:
    """Options of `crv-graphs export` (Hydra overrides, e.g. `run=DIR out=DIR limit=5`)."""

    run: str | None = None
    """Run directory of `crv` (it holds artifacts.json)."""

    out: str | None = None
    """Directory the viewer's files are written to (created; graphs already there are kept
    in the index unless re-exported)."""

    limit: int = 5
    """Most step graphs exported."""

    split: str = "test"
    """Trace split the steps are taken from (`all`: every split)."""

    trace: str | None = None
    """Export only the steps of this trace id."""

    incorrect_first: bool = True
    """Take the steps labelled incorrect first, then the others (each in dataset order)."""

    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""

    node_ids: NodeIds = NodeIds.current
    """Error-node ids as circuit-tracer writes them now (`current`: `{layer}_-1_{pos}`) or
    as 0.5.0 did (`0.5.0`: `0_{layer}_{pos}`); the viewer loads either."""


@dataclass
class ServeConfig:
    """Options of `crv-graphs serve` (Hydra overrides, e.g. `run=DIR port=8032`)."""

    run: str | None = None
    """A crv run directory (its graphs are exported into `out` first, unless there already)
    or a directory written by `crv-graphs export` or `crv-verify export_graphs=`."""

    out: str | None = None
    """Where a run's graphs are exported (default `<run>/graphs-view`)."""

    port: int = 8032
    """Port on 127.0.0.1, the only address served (0: any free port)."""

    browser: bool = True
    """Open the page in the desktop's web browser (where there is a display)."""

    cache: str | None = None
    """Folder of the offline viewer (default ~/.cache/crv/viewer), built on first use from
    circuit-tracer's wheel (PyPI) and npm packages, then reused offline."""

    stop_after: float = 0.0
    """Stop serving after this many seconds (0: until Ctrl-C)."""


class ExportError(CRVError):
    """A problem with the options or the run: printed as one line, exit status 2."""


def read_artifacts(run: str | Path) -> dict[str, Path]:
    """Stage name -> artifact directory from `<run>/artifacts.json`, the needed ones checked."""
    from crv.io import read_json

    path = Path(run) / "artifacts.json"
    if not path.is_file():
        raise ExportError(f"{path}: not found (run= must be a crv run directory)")
    try:
        artifacts = {name: Path(p) for name, p in read_json(path).items()}
    except (ValueError, AttributeError) as exc:
        raise ExportError(f"{path}: not a JSON object of stage -> directory ({exc})") from None
    for name in REQUIRED:
        if name not in artifacts:
            raise ExportError(f"{path}: no {name!r} artifact (the run must include {name})")
        if not artifacts[name].is_dir():
            raise ExportError(f"{path}: the {name} artifact {artifacts[name]} does not exist")
    return artifacts


def load_cards(artifacts: dict[str, Path]) -> Any:
    """The run's feature cards, or None (no `cards` artifact, or crv without crv.cards)."""
    if "cards" not in artifacts:
        return None
    try:
        from crv.cards.store import load_feature_cards
    except ImportError:
        log.warning("this crv has no feature cards (crv.cards): features are named L/F")
        return None
    return load_feature_cards(artifacts["cards"])


def choose_steps(cfg: ExportConfig, graphs_dir: Path, traces: Any) -> list[tuple[int, int, int]]:
    """(trace row, step, explained positions) of the exported graphs, at most `cfg.limit`."""
    from crv.graphs.store import load_step_graphs, trace_ids

    row_of = {trace_id: i for i, trace_id in enumerate(traces["id"])}
    ids = trace_ids(graphs_dir)
    if cfg.trace is not None:
        if cfg.trace not in ids:
            raise ExportError(f"trace {cfg.trace!r} has no graphs in {graphs_dir}")
        ids = [cfg.trace]
    rows = sorted(row_of[t] for t in ids if t in row_of)
    if cfg.trace is None and cfg.split != "all":
        rows = [r for r in rows if traces[r]["split"] == cfg.split]
    chosen, incorrect = [], []
    for r in rows:
        labels = {s["index"]: s.get("label") for s in traces[r]["steps"]}
        for g in load_step_graphs(graphs_dir, traces[r]["id"]):
            (incorrect if labels.get(g.step) is False else chosen).append((r, g.step, g.explained))
        if cfg.incorrect_first and len(incorrect) >= cfg.limit:
            break
        if not cfg.incorrect_first and len(chosen) >= cfg.limit:
            break
    ordered = incorrect + chosen if cfg.incorrect_first else sorted(incorrect + chosen)
    return ordered[: cfg.limit]


def export_run(cfg: ExportConfig) -> dict[str, Any]:
    """Export the chosen step graphs of a run; returns what was written and how long it took."""
    import torch

    from crv.device import resolve_device
    from crv.graphs.attribute import TraceAttributor
    from crv.graphs.export import GraphExporter
    from crv.graphs.store import load_graphs_config
    from crv.models.adapter import ArchAdapter
    from crv.models.loading import load_subject
    from crv.traces.store import load_traces
    from crv.transcoders.io import load_transcoder_set

    if not cfg.run or not cfg.out:
        raise ExportError("usage: crv-graphs export run=RUN_DIR out=DIR [limit=5]")
    if cfg.limit < 1:
        raise ExportError(f"limit must be >= 1, not {cfg.limit}")
    start = time.perf_counter()
    artifacts = read_artifacts(cfg.run)
    graphs_cfg = load_graphs_config(artifacts["graphs"])
    traces = load_traces(artifacts["traces"])
    chosen = choose_steps(cfg, artifacts["graphs"], traces)
    if not chosen:
        raise ExportError(f"no step graphs of split {cfg.split!r} in {artifacts['graphs']}")

    device = resolve_device(cfg.device)
    model, tokenizer = load_subject(artifacts["subject"], device)
    model.requires_grad_(False)
    adapter = ArchAdapter.for_model(model)
    tset = load_transcoder_set(artifacts["transcoders"], device)
    for layer in tset.layers:
        tset[layer].requires_grad_(False)
    tset.check_compatible(adapter)
    cards = load_cards(artifacts)
    exporter = GraphExporter(
        cfg.out,
        tokenizer,
        adapter.n_layers,
        f"crv-{artifacts['transcoders'].name}",
        graphs_cfg.node_threshold,
        graphs_cfg.edge_threshold,
        cards,
        str(cfg.node_ids),
    )
    by_trace: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r, step, position in chosen:
        by_trace[r].append((step, position))
    slugs = []
    with torch.no_grad():
        for r, steps in by_trace.items():
            trace = traces[r]
            positions = [p for _, p in steps]
            attributor = TraceAttributor(adapter, tset, trace["input_ids"], positions, graphs_cfg)
            atts = attributor.attribute_steps(positions, [s for s, _ in steps], trace["id"])
            for att in atts:
                slug = f"{trace['id']}-step{att.step}"
                exporter.add(att, trace["input_ids"], slug)
                slugs.append(exporter.metadata[-1]["slug"])
    index = exporter.finish()
    return {
        "out": str(Path(cfg.out).resolve()),
        "index": str(index),
        "slugs": slugs,
        "n_features": len(exporter.features),
        "cards": cards is not None,
        "seconds": time.perf_counter() - start,
    }


def export_line(summary: dict[str, Any]) -> str:
    """What an export wrote, in one line."""
    labels = "feature cards" if summary["cards"] else "L/F numbers (the run has no cards)"
    return (
        f"wrote {len(summary['slugs'])} graphs ({summary['n_features']} features, labelled by "
        f"{labels}) to {summary['out']} in {summary['seconds']:.2f} s"
    )


def fail(exc: Exception) -> int:
    """Print a failed command's one line (a CRVError's own words; other expected errors
    with their type) and give exit status 2."""
    detail = str(exc) if isinstance(exc, CRVError) else f"{type(exc).__name__}: {exc}"
    print(f"crv-graphs: error: {detail}", file=sys.stderr)
    return 2


def run_export(cfg: ExportConfig) -> int:
    """`crv-graphs export`: 0 on success, 2 with a one-line error."""
    try:
        summary = export_run(cfg)
    except (CRVError, OSError, ValueError) as exc:
        return fail(exc)
    print(f"{export_line(summary)}\nview: crv-graphs serve run={summary['out']}")
    return 0


def serve_dir(cfg: ServeConfig) -> Path:
    """The export directory `serve` shows: `run` itself, or a run's export (made if absent)."""
    if not cfg.run:
        raise ExportError("usage: crv-graphs serve run=RUN_DIR|EXPORT_DIR [port=8032]")
    run = Path(cfg.run)
    if (run / INDEX).is_file():
        if cfg.out:
            raise ExportError(f"out= is for a run directory; {run} is already an export")
        return run
    if not (run / "artifacts.json").is_file():
        raise ExportError(
            f"{run}: neither a crv run directory (artifacts.json) nor an export ({INDEX})"
        )
    out = Path(cfg.out) if cfg.out else run / "graphs-view"
    if not (out / INDEX).is_file():
        print(f"exporting the run's graphs first (crv-graphs export run={run} out={out})")
        print(export_line(export_run(ExportConfig(run=str(run), out=str(out)))), flush=True)
    return out


def has_display() -> bool:
    """Whether a desktop browser can open (elsewhere Python's webbrowser falls back to a
    text browser in the terminal)."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def run_serve(cfg: ServeConfig) -> int:
    """`crv-graphs serve`: serves until Ctrl-C (or `stop_after`); 0, or 2 with one line."""
    import webbrowser

    from crv.graphs.viewer import VIEWER_VERSION, ViewerServer, graph_slugs, prepare_viewer

    try:
        data_dir = serve_dir(cfg)
        slugs = graph_slugs(data_dir)
        frontend = prepare_viewer(cfg.cache)
        server = ViewerServer(data_dir, frontend, cfg.port)
    except (CRVError, OSError, ValueError) as exc:
        return fail(exc)
    url = server.url(slugs[0] if slugs else None)
    until = f"for {cfg.stop_after:g} s" if cfg.stop_after > 0 else "until Ctrl-C"
    print(
        f"serving {len(slugs)} graphs from {data_dir.resolve()} in circuit-tracer "
        f"{VIEWER_VERSION}'s viewer (offline copy: {frontend}) {until} at\n  {url}",
        flush=True,
    )
    if cfg.browser and has_display():
        webbrowser.open(url)
    try:
        server.thread.join(cfg.stop_after if cfg.stop_after > 0 else None)
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.stop()
    return 0


COMMANDS = {"export": (ExportConfig, run_export), "serve": (ServeConfig, run_serve)}


def main() -> None:
    """Console script `crv-graphs`."""
    from crv.cli.checks import command_config, print_command_help
    from crv.options import options_help

    usage = (
        "usage: crv-graphs export run=RUN_DIR out=DIR [option=value ...]\n"
        "       crv-graphs serve run=RUN_DIR|EXPORT_DIR [option=value ...]"
    )
    wants_help = "--help" in sys.argv or "-h" in sys.argv
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command not in COMMANDS:
        if not wants_help:
            print(f"crv-graphs: error: {usage.splitlines()[0]} (or serve)", file=sys.stderr)
            sys.exit(2)
        print(usage)
        for name, (config, _) in COMMANDS.items():
            print(f"\n{name} options (name=default, then the help):")
            print("\n".join(options_help(config)))
        return
    config, runner = COMMANDS[command]
    if wants_help:
        print_command_help(f"usage: crv-graphs {command} [option=value ...]", config)
        return
    sys.exit(runner(command_config("crv-graphs", config, sys.argv[2:])))


if __name__ == "__main__":
    main()
