"""Step graphs on disk: one safetensors file per trace, all its steps' node and edge tables.

`<dir>/graphs/<quoted trace id>.safetensors` holds the columns of every `StepGraph` of the
trace concatenated (node columns kind, layer, pos, feature, activation, influence; edge
columns src, dst, weight, with node indices local to their graph), `node_offsets` and
`edge_offsets` ([n_graphs + 1]) that cut them apart, `step` and `position` per graph, and
`scores` [n_graphs, n_scores] whose column names are in the metadata (`score_names`, JSON)
next to `trace_id` and `format`. Contrastive graphs (`graphs.contrastive`) are files of the
same format under `<dir>/contrastive/`, one per trace (`load_contrastive_graphs`). Files are written atomically, so a directory of them is a
resumable set of finished traces.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from crv.errors import CRVError
from crv.graphs.config import GraphsConfig
from crv.graphs.graph import EDGE_COLUMNS, NODE_COLUMNS, StepGraph
from crv.io import atomic_write
from crv.pipeline import artifact_config

FORMAT = "crv-step-graphs/1"
GRAPH_DIR = "graphs"
CONTRAST_DIR = "contrastive"
SUFFIX = ".safetensors"
_DTYPES = {
    "kind": np.int8,
    "layer": np.int16,
    "pos": np.int32,
    "feature": np.int32,
    "activation": np.float32,
    "influence": np.float32,
    "src": np.int32,
    "dst": np.int32,
    "weight": np.float32,
}


def trace_file(directory: str | Path, trace_id: str, kind: str = GRAPH_DIR) -> Path:
    """Where the graphs of `trace_id` live under an artifact (or scratch) directory; `kind`
    CONTRAST_DIR for its contrastive graphs."""
    return Path(directory) / kind / f"{quote(trace_id, safe='')}{SUFFIX}"


def save_step_graphs(
    path: str | Path,
    trace_id: str,
    graphs: Sequence[StepGraph],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write one trace's graphs to `path` atomically; `metadata` adds string entries."""
    score_names = sorted({name for g in graphs for name in g.scores})
    tensors: dict[str, np.ndarray] = {
        col: np.concatenate([np.asarray(getattr(g, col)) for g in graphs] or [np.zeros(0)]).astype(
            _DTYPES[col]
        )
        for col in (*NODE_COLUMNS, *EDGE_COLUMNS)
    }
    tensors["node_offsets"] = np.cumsum([0] + [g.n_nodes for g in graphs]).astype(np.int64)
    tensors["edge_offsets"] = np.cumsum([0] + [g.n_edges for g in graphs]).astype(np.int64)
    tensors["step"] = np.array([g.step for g in graphs], dtype=np.int32)
    tensors["position"] = np.array([g.position for g in graphs], dtype=np.int32)
    tensors["scores"] = np.array(
        [[g.scores.get(name, np.nan) for name in score_names] for g in graphs], dtype=np.float64
    ).reshape(len(graphs), len(score_names))
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "trace_id": trace_id,
        "score_names": json.dumps(score_names),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a trace file without reading its tensors."""
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def read_step_graphs(path: str | Path) -> list[StepGraph]:
    """All graphs of one trace file, in step order."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a crv step-graph file (format {meta.get('format')!r})")
    t = load_file(str(path))
    score_names = json.loads(meta["score_names"])
    graphs = []
    for i in range(len(t["step"])):
        n0, n1 = t["node_offsets"][i], t["node_offsets"][i + 1]
        e0, e1 = t["edge_offsets"][i], t["edge_offsets"][i + 1]
        graphs.append(
            StepGraph(
                trace_id=meta["trace_id"],
                step=int(t["step"][i]),
                position=int(t["position"][i]),
                **{col: t[col][n0:n1] for col in NODE_COLUMNS},
                **{col: t[col][e0:e1] for col in EDGE_COLUMNS},
                scores={
                    name: float(v)
                    for name, v in zip(score_names, t["scores"][i], strict=True)
                    if not np.isnan(v)
                },
            )
        )
    return graphs


def load_step_graphs(directory: str | Path, trace_id: str) -> list[StepGraph]:
    """The pruned graphs of every attributed step of `trace_id` in a `graphs` artifact."""
    path = trace_file(directory, trace_id)
    if not path.is_file():
        raise FileNotFoundError(f"no step graphs for trace {trace_id!r} in {directory}")
    return read_step_graphs(path)


def load_contrastive_graphs(directory: str | Path, trace_id: str) -> list[StepGraph]:
    """The pruned contrastive graphs of `trace_id`'s incorrect steps in a `graphs` artifact
    built with `graphs.contrastive=true` (`crv.graphs.contrastive`; none for a trace
    without an incorrect step that has a correct counterpart). A graph's `step` is its
    step's index, its `position` the prediction explained, its one logit node the
    contrastive target."""
    if not (Path(directory) / CONTRAST_DIR).is_dir():
        raise ContrastiveGraphsError(
            f"{directory} has no contrastive graphs: build it with graphs.contrastive=true"
        )
    path = trace_file(directory, trace_id, CONTRAST_DIR)
    if not path.is_file():
        raise ContrastiveGraphsError(f"no contrastive graphs for trace {trace_id!r} in {directory}")
    return read_step_graphs(path)


class ContrastiveGraphsError(CRVError):
    """A graphs artifact without the contrastive graphs asked for."""


def trace_ids(directory: str | Path) -> list[str]:
    """Ids of the traces with graphs in a `graphs` artifact, sorted."""
    return sorted(
        unquote(p.name[: -len(SUFFIX)]) for p in (Path(directory) / GRAPH_DIR).glob(f"*{SUFFIX}")
    )


def iter_step_graphs(directory: str | Path) -> Iterator[StepGraph]:
    """Every step graph of a `graphs` artifact, trace by trace (sorted by id), step by step."""
    for trace_id in trace_ids(directory):
        yield from load_step_graphs(directory, trace_id)


def load_graphs_config(path: str | Path) -> GraphsConfig:
    """The settings a `graphs` artifact's step graphs were built with."""
    return GraphsConfig(**artifact_config(path))
