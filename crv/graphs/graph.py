"""The pruned attribution graph of one reasoning step, as columnar arrays.

A step graph explains the model's next-token prediction at one token position, or at each
position of the step (a whole-step graph: logit nodes at several positions). Its nodes
are, in this order, transcoder features (layer, position, feature index, activation), error
nodes (what the transcoder of a layer failed to reconstruct at a position), input-token
nodes (the embedding at a position) and logit nodes (candidate next tokens with their
probability). An edge carries the signed direct linear effect of its source on its target
through the frozen local replacement model.

Columns are numpy arrays so thousands of graphs store compactly and load fast; networkx
is built only on demand (`to_networkx`) for the topology features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

FEATURE, ERROR, TOKEN, LOGIT = 0, 1, 2, 3
KIND_NAMES = {FEATURE: "feature", ERROR: "error", TOKEN: "token", LOGIT: "logit"}

NODE_COLUMNS = ("kind", "layer", "pos", "feature", "activation", "influence")
EDGE_COLUMNS = ("src", "dst", "weight")


@dataclass
class StepGraph:
    """Pruned graph of one step; node order is [features | errors | tokens | logits].

    `layer` is -1 for token nodes and `n_layers` for logit nodes; `feature` holds the
    feature index for features and the token id for tokens and logits (-1 for errors);
    `activation` holds a feature's activation and a logit's probability.
    """

    trace_id: str
    step: int
    position: int
    kind: np.ndarray
    layer: np.ndarray
    pos: np.ndarray
    feature: np.ndarray
    activation: np.ndarray
    influence: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.kind)
        for name in NODE_COLUMNS:
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"StepGraph column {name!r} has {len(getattr(self, name))} rows, expected {n}"
                )
        if not (len(self.src) == len(self.dst) == len(self.weight)):
            raise ValueError("StepGraph edge columns src/dst/weight differ in length")
        if len(self.src) and (
            self.src.max() >= n or self.dst.max() >= n or min(self.src.min(), self.dst.min()) < 0
        ):
            raise ValueError("StepGraph edge refers to a node that does not exist")

    @property
    def explained(self) -> tuple[int, ...]:
        """The positions whose predictions the graph explains (its logit nodes' positions):
        one for a single-prediction graph, every position of the step for a whole-step one."""
        return tuple(int(p) for p in np.unique(self.pos[self.kind == LOGIT]))

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    @property
    def n_edges(self) -> int:
        return len(self.src)

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph with node attributes kind (name), layer, position, feature,
        activation, influence, and a signed `weight` on each edge (source -> target)."""
        g = nx.DiGraph(trace_id=self.trace_id, step=self.step, position=self.position)
        for i in range(self.n_nodes):
            g.add_node(
                i,
                kind=KIND_NAMES[int(self.kind[i])],
                layer=int(self.layer[i]),
                position=int(self.pos[i]),
                feature=int(self.feature[i]),
                activation=float(self.activation[i]),
                influence=float(self.influence[i]),
            )
        g.add_weighted_edges_from(
            zip(
                self.src.tolist(),
                self.dst.tolist(),
                self.weight.astype(float).tolist(),
                strict=True,
            )
        )
        return g
