"""`crv-graphs export`: a run's step graphs in circuit-tracer's viewer format.

Usage (Hydra overrides)::

    crv-graphs export run=outputs/runs/<date>/<time> out=graphs-view limit=5

The run directory's `artifacts.json` names the artifacts read: `graphs` (which steps were
attributed, at which position, with which settings), `traces`, `transcoders`, `subject` and,
when present, `cards` (feature labels and the viewer's feature files). The chosen steps are
re-attributed with the graphs artifact's settings, since the stored graphs are pruned and
the viewer's node scores need the unpruned influence (`crv.graphs.export`), and written as
`<out>/<slug>.json`, `<out>/graph-metadata.json` and `<out>/features/...`. View them with
circuit-tracer's local server, from circuit-tracer's own virtualenv::

    python -c "from circuit_tracer.frontend.local_server import serve; \\
        serve('graphs-view', port=8032).server_thread.join()"
    # open http://localhost:8032/index.html

Exit status 0 on success, 2 with a one-line error naming the problem (missing artifact,
unknown trace, bad option) and no traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("crv.graphs.export")
REQUIRED = ("subject", "traces", "transcoders", "graphs")


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


class ExportError(Exception):
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
        from crv.cards.stage import load_feature_cards
    except ImportError:
        log.warning("this crv has no feature cards (crv.cards): features are named L/F")
        return None
    return load_feature_cards(artifacts["cards"])


def choose_steps(cfg: ExportConfig, graphs_dir: Path, traces: Any) -> list[tuple[int, int, int]]:
    """(trace row, step, position) of the exported graphs, at most `cfg.limit`."""
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
            (incorrect if labels.get(g.step) is False else chosen).append((r, g.step, g.position))
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
    from crv.graphs.stage import load_graphs_config
    from crv.models.adapter import ArchAdapter
    from crv.models.loading import load_subject
    from crv.traces.stage import load_traces
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


def run_export(cfg: ExportConfig) -> int:
    """`crv-graphs export`: 0 on success, 2 with a one-line error."""
    try:
        summary = export_run(cfg)
    except ExportError as exc:
        print(f"crv-graphs: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"crv-graphs: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    labels = "feature cards" if summary["cards"] else "L/F numbers (the run has no cards)"
    print(
        f"wrote {len(summary['slugs'])} graphs ({summary['n_features']} features, labelled by "
        f"{labels}) to {summary['out']} in {summary['seconds']:.2f} s\n"
        "view in circuit-tracer's virtualenv: python -c \"from circuit_tracer.frontend."
        f"local_server import serve; serve('{summary['out']}', port=8032).server_thread.join()\""
        f"\nthen open http://localhost:8032/index.html?slug={summary['slugs'][0]}"
    )
    return 0


def main() -> None:
    """Console script `crv-graphs`."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from crv.options import options_help

    wants_help = "--help" in sys.argv or "-h" in sys.argv
    if wants_help or len(sys.argv) < 2 or sys.argv[1] != "export":
        print("usage: crv-graphs export run=RUN_DIR out=DIR [option=value ...]\n\nOptions:")
        print("\n".join(options_help(ExportConfig)))
        sys.exit(0 if wants_help else 2)
    del sys.argv[1]
    ConfigStore.instance().store(name="crv_graphs_export", node=ExportConfig)

    def _task(cfg: Any) -> None:
        sys.exit(run_export(OmegaConf.to_object(cfg)))

    sys.argv += [
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    hydra.main(config_path=None, config_name="crv_graphs_export", version_base="1.3")(_task)()
