"""Step graphs as circuit-tracer / Neuronpedia graph JSON, for circuit-tracer's viewer.

Why: people who work with attribution graphs read them in circuit-tracer's viewer (the
Neuronpedia graph format); crv's graphs are the same kind of object (same node kinds, same
direct-effect edges, same influence pruning), so they are written in that format rather than
drawn by crv. The format, from circuit-tracer 0.5.0 (`frontend/graph_models.py`,
`utils/create_graph_files.py`, `frontend/local_server.py`; facts only), with the error-node
ids of the versions after it:

- `<out>/<slug>.json` = {`metadata`, `qParams`, `nodes`, `links`} and `<out>/graph-metadata.json`
  = {"graphs": [metadata, ...]} (one entry per slug, a re-export replaces its entry).
- Nodes, ids and numbering: a feature is `"{layer}_{latent}_{pos}"` with `feature` = the
  Cantor pairing of (layer, latent) and type "cross layer transcoder"; an error node
  `"{layer}_-1_{pos}"` (feature -1, "mlp reconstruction error"; circuit-tracer pull
  requests 100 and 102, merged after 0.5.0, since 0.5.0's `"0_{layer}_{pos}"` is also the id
  of latent `layer` of layer 0; `node_ids="0.5.0"` writes that format); a token node
  `"E_{token id}_{pos}"` (layer "E", feature = pos, "embedding"); a logit
  `"{n_layers + 1}_{token id}_{last pos}"` ("logit", `token_prob`, the most probable one is
  the target logit, clerp `Output "tok" (p=0.123)`). `influence` is circuit-tracer's
  cumulative score: the share of the total node influence held by the nodes at least as
  influential as this one (none for logits).
- Only the pruned graph is written: nodes kept by pruning and edges kept by pruning
  (weight = adjacency[target, source]); nodes left without an edge are dropped, except token
  and logit nodes.
- Features: the viewer reads a feature's examples from `{scan}/{feature}.json` when the
  graph's `scan` starts with "./"; the local server maps `/data/<path>` to `<out>/<path>`, so
  with scan `./data/features/<name>` the files live in `<out>/features/<name>/<feature>.json`
  (fields of `frontend/feature_models.py`). They are written from crv's feature cards when a
  run has them; `clerp` (the label shown on a node) is the card's label, else `L{layer}/F{latent}`.

The graph explained at position p of a longer trace is written as the prompt `tokens[:p + 1]`:
circuit-tracer's graph explains the next-token logits at its prompt's last position.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from crv.graphs.attribute import StepAttribution
from crv.graphs.graph import ERROR, FEATURE, LOGIT, TOKEN
from crv.graphs.prune import prune
from crv.graphs.viewer import NodeIds, error_node_id
from crv.io import atomic_write_json, read_json

SCHEMA_VERSION = 1
INDEX_FILE = "graph-metadata.json"
FEATURE_DIR = "features"
FEATURE_TYPES = {
    FEATURE: "cross layer transcoder",
    ERROR: "mlp reconstruction error",
    TOKEN: "embedding",
    LOGIT: "logit",
}
QPARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
"""The viewer's initial state (nothing pinned or grouped), as circuit-tracer writes it."""
NODE_FIELDS = (
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
)
"""A node's fields, in circuit-tracer's order."""


class Cards(Protocol):
    """What the export reads from crv's feature cards (`crv.cards.store.FeatureCards`)."""

    def label(self, layer: int, feature: int) -> str: ...

    def card(self, layer: int, feature: int) -> dict[str, Any]: ...


def cantor_pair(x: int, y: int) -> int:
    """circuit-tracer's feature number of latent `y` of layer `x`."""
    return (x + y) * (x + y + 1) // 2 + y


def cumulative_influence(influence_N: np.ndarray) -> np.ndarray:
    """circuit-tracer's node score: per node, the share of the total influence held by the
    nodes ranked at or above it (descending influence); 1 for the least influential."""
    order = np.argsort(-influence_N, kind="stable")
    total = influence_N.sum()
    out = np.zeros(len(influence_N))
    out[order] = np.cumsum(influence_N[order]) / (total if total > 0 else 1.0)
    return out


def safe_slug(text: str) -> str:
    """A slug usable as a file name and in the viewer's URL."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "graph"


def default_label(layer: int, feature: int) -> str:
    return f"L{layer}/F{feature}"


def graph_json(
    att: StepAttribution,
    prompt_tokens: Sequence[str],
    prompt: str,
    logit_tokens: Sequence[str],
    slug: str,
    scan: str,
    n_layers: int,
    node_threshold: float,
    edge_threshold: float,
    label: Callable[[int, int], str] = default_label,
    node_ids: str = "current",
) -> dict[str, Any]:
    """One step's pruned graph as circuit-tracer graph JSON (see the module docstring).

    `prompt_tokens` are the strings of tokens 0..att.position, `logit_tokens` those of the
    attributed logits, in order; `node_ids` picks the error-node ids (`crv.graphs.viewer.NodeIds`).
    """
    if len(prompt_tokens) != att.position + 1:
        raise ValueError(
            f"{len(prompt_tokens)} prompt tokens given for a graph at position {att.position}"
        )
    result = prune(
        att.adjacency_RN,
        att.counts,
        att.logit_weights,
        att.feature_layer,
        node_threshold,
        edge_threshold,
    )
    cumulative_N = cumulative_influence(result.influence_N.numpy())
    kind_N, layer_N, pos_N, index_N, act_N = (
        att.nodes[c] for c in ("kind", "layer", "pos", "feature", "activation")
    )
    n_logits_before = att.counts.n_nodes - att.counts.n_logits
    nodes: dict[int, dict[str, Any]] = {}
    for j in np.flatnonzero(result.node_mask_N.numpy()).tolist():
        kind, layer, pos, index = (int(a[j]) for a in (kind_N, layer_N, pos_N, index_N))
        node: dict[str, Any] = {"feature_type": FEATURE_TYPES[kind], "ctx_idx": pos}
        if kind == FEATURE:
            node |= {
                "node_id": f"{layer}_{index}_{pos}",
                "feature": cantor_pair(layer, index),
                "layer": str(layer),
                "jsNodeId": f"{layer}_{index}-0",
                "clerp": label(layer, index),
                "activation": float(act_N[j]),
            }
        elif kind == ERROR:
            node |= {
                "node_id": error_node_id(layer, pos, node_ids),
                "feature": -1,
                "layer": str(layer),
                "jsNodeId": f"{layer}_{pos}-0",
            }
        elif kind == TOKEN:
            node |= {
                "node_id": f"E_{index}_{pos}",
                "feature": pos,
                "layer": "E",
                "jsNodeId": f"E_{index}-{pos}",
            }
        else:
            rank = j - n_logits_before
            prob = float(act_N[j])
            node |= {
                "node_id": f"{n_layers + 1}_{index}_{pos}",
                "feature": index,
                "layer": str(n_layers + 1),
                "jsNodeId": f"L_{index}-{pos}",
                "token_prob": prob,
                "is_target_logit": rank == 0,
                "clerp": f'Output "{logit_tokens[rank]}" (p={prob:.3f})',
            }
        node = {
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
            "influence": None if kind == LOGIT else float(cumulative_N[j]),
            "activation": None,
            **node,
        }
        nodes[j] = node

    rows = att.counts.row_nodes.numpy()
    r_E, src_E = np.nonzero(result.edge_mask_RN.numpy())
    weights = att.adjacency_RN.cpu().numpy()[r_E, src_E].tolist()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
        for s, t, w in zip(src_E.tolist(), rows[r_E].tolist(), weights, strict=True)
        if s in nodes and t in nodes
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    kept = [
        n
        for n in nodes.values()
        if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": list(prompt_tokens),
            "prompt": prompt,
            "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION,
        },
        "qParams": QPARAMS,
        "nodes": [{key: n[key] for key in NODE_FIELDS} for n in kept],
        "links": links,
    }


def feature_json(card: dict[str, Any], layer: int, feature: int, name: str) -> dict[str, Any]:
    """A feature card in the viewer's feature-file fields (`frontend/feature_models.py`).

    Each top context becomes one example of up to three pieces (text before, the activating
    token, text after; newlines shown as "⏎", as circuit-tracer shows them) with the
    activation on the token. The cards hold no activation
    distribution, so `quantile_values` and `histogram` are empty.
    """
    examples = []
    for ctx in card["top_contexts"]:
        text, token = ctx["text"], ctx["token"]
        start = ctx.get("token_start", text.find(token))
        pieces = [text[:start], token, text[start + len(token) :]]
        acts = [0.0, float(ctx["activation"]), 0.0]
        keep = [i for i, piece in enumerate(pieces) if piece or i == 1]
        examples.append(
            {
                "tokens_acts_list": [acts[i] for i in keep],
                "train_token_ind": keep.index(1),
                "is_repeated_datapoint": False,
                "tokens": [pieces[i].replace("\n", "⏎") for i in keep],
            }
        )
    top = max((float(c["activation"]) for c in card["top_contexts"]), default=0.0)
    return {
        "transcoder_id": name,
        "index": cantor_pair(layer, feature),
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
        "top_logits": [p["token"] for p in card["promotes"]],
        "bottom_logits": [p["token"] for p in card["suppresses"]],
        "act_min": 0.0,
        "act_max": top if top > 0 else 1.0,
        "quantile_values": [],
        "histogram": [],
        "activation_frequency": float(card["frequency"]),
    }


class GraphExporter:
    """Writes step graphs into one viewer data directory, then the features and the index.

    `name` names the transcoder set (the features' folder); `cards` (optional) label the
    features and fill their feature files; `node_ids` picks the error-node ids
    (`crv.graphs.viewer.NodeIds`). Call `add` per graph, then `finish`.
    """

    def __init__(
        self,
        out: str | Path,
        tokenizer: Any,
        n_layers: int,
        name: str,
        node_threshold: float,
        edge_threshold: float,
        cards: Cards | None = None,
        node_ids: str = "current",
    ) -> None:
        self.out = Path(out)
        self.tokenizer, self.n_layers, self.name = tokenizer, n_layers, safe_slug(name)
        self.node_threshold, self.edge_threshold = node_threshold, edge_threshold
        self.cards, self.node_ids = cards, str(NodeIds(node_ids))
        self.scan = f"./data/{FEATURE_DIR}/{self.name}"
        self.metadata: list[dict[str, Any]] = []
        self.features: set[tuple[int, int]] = set()
        self.out.mkdir(parents=True, exist_ok=True)

    def _decode(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def add(self, att: StepAttribution, input_ids: Sequence[int] | torch.Tensor, slug: str) -> Path:
        """Write the graph of `att` (explained at att.position of `input_ids`) as `<slug>.json`."""
        ids = [int(i) for i in list(input_ids)[: att.position + 1]]
        logit_ids = att.nodes["feature"][att.nodes["kind"] == LOGIT].tolist()
        data = graph_json(
            att,
            self._decode(ids),
            self.tokenizer.decode(ids, skip_special_tokens=True),
            self._decode(logit_ids),
            safe_slug(slug),
            self.scan,
            self.n_layers,
            self.node_threshold,
            self.edge_threshold,
            self.cards.label if self.cards is not None else default_label,
            self.node_ids,
        )
        for node in data["nodes"]:
            if node["feature_type"] == FEATURE_TYPES[FEATURE]:
                layer, latent, _ = node["node_id"].split("_")
                self.features.add((int(layer), int(latent)))
        self.metadata.append(data["metadata"])
        return atomic_write_json(self.out / f"{data['metadata']['slug']}.json", data)

    def finish(self) -> Path:
        """Write the feature files (with cards) and merge the graphs into the index."""
        if self.cards is not None:
            folder = self.out / FEATURE_DIR / self.name
            for layer, latent in sorted(self.features):
                card = self.cards.card(layer, latent)
                atomic_write_json(
                    folder / f"{cantor_pair(layer, latent)}.json",
                    feature_json(card, layer, latent, self.name),
                )
        index_path = self.out / INDEX_FILE
        graphs = read_json(index_path)["graphs"] if index_path.is_file() else []
        slugs = {m["slug"] for m in self.metadata}
        graphs = [g for g in graphs if g.get("slug") not in slugs] + self.metadata
        return atomic_write_json(index_path, {"graphs": graphs})
