"""Proposing feature interventions for a flagged step, and the random feature controls.

The step window `(lo, hi)` holds the positions whose computation can change the step's
text on regeneration: from the earlier of the token before the step's first token and the
graph's explained token (`lo`; positions from there on are recomputed with the
intervention) through the token before the step's last token (`hi`, which predicts the last
token; see `crv.interventions.apply.StepSpan.window`). A candidate is a transcoder feature
`(layer, feature)` with a node at a position >= lo in the step's pruned attribution graph.
Its positions are those of the window where it was active in the original trace (in its
layer's top k, non-zero) or has a graph node; with `scope="step"` a candidate without any is
dropped (it could only change what comes after the step). Candidates are ranked by one of

* `influence`: the summed graph influence of the feature's nodes at positions >= lo.
  Influence is the feature's share of the (pruned, |weight|-normalised) paths into the
  explained logits, so this ranks the features that most shaped the explained prediction,
  whatever their sign.
* `verifier`: how much the verifier's score drops when those nodes are deleted from the
  graph and the graph features recomputed (for `amplify`, how much it rises: features whose
  presence the verifier reads as a sign of a correct step). This is very indirect: the
  verifier sees only aggregate statistics (counts, per-layer histograms, activation and
  influence moments, centralities), deleting nodes neither re-runs pruning nor recomputes
  the other nodes' influence, and a feature that moves a histogram bin the trees happen to
  split on is not thereby a cause of the error. It answers "which nodes make this graph look
  like an error graph", not "which feature made the model err".
* `layer`: the latest layer first (ties by influence), after the paper's hand-picked case
  where a late-layer feature carried the wrong operation.
* `margin`: the measured effect of the intervention itself on the explained prediction:
  how much it lowers the margin between the top two next-token logits at the graph's
  position, in a forward pass of the spliced model (`apply.margin_drops`); only the
  `candidate_pool` most influential candidates are measured. It uses no label: the runner-up
  is the model's own second choice. With graphs at the step's least confident prediction
  (`graphs.position=least_confident`) this asks "which graph features make the model
  pick this token over its alternative", the decision where a wrong step usually goes wrong.

The random control draws, for each proposal, one feature uniformly among the features
active somewhere in the window at the same layer, excluding the proposed ones, with the same
action, value and scope, from a generator seeded by the run seed and the step id. It is
matched on layer, count and action, not on activation size or number of active positions:
graph features tend to be the strongly active ones, so part of any advantage over the
control may come from editing a bigger activation rather than the right feature.

The margin-matched control (`margin_matched_control`) closes that gap for `rank_by=margin`:
it replaces each feature of the proposals' candidate pool by a random active feature of the
same layer and positions, measures every draw's margin drop as the pool's are measured, and
keeps the top N. Whatever the proposals gain over it comes from the graph's influence
ranking, which chose the pool; what the measured margin ranking does by itself, it does for
both.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from crv.graphs.graph import FEATURE, StepGraph
from crv.interventions.config import Action, RankBy, Scope

FeatureKey = tuple[int, int]
"""(layer, feature index)."""
ActiveMap = Mapping[FeatureKey, tuple[int, ...]]
"""Feature -> the positions of the step window where it is in its layer's top k."""


@dataclass(frozen=True)
class Proposal:
    """One intervention on one feature: what, where, and why it was chosen."""

    layer: int
    feature: int
    action: Action
    value: float
    """0 for suppress, the scale for amplify."""
    scope: Scope
    start: int
    """First position of the step window (lo); `onward` intervenes from here to the end."""
    positions: tuple[int, ...]
    """Positions of the step window where the feature was active in the original trace
    (or has a graph node); `step` intervenes here."""
    score: float
    """The ranking score (influence, verifier score change, or layer)."""
    source: str
    """`graph` for a proposal, `random` or `margin_matched` for a control."""

    def target_positions(self, end: int) -> tuple[int, ...]:
        """The absolute positions to intervene at, for sequences shorter than `end`."""
        if self.scope == "onward":
            return tuple(range(self.start, end))
        return self.positions

    def name(self) -> str:
        verb = "suppress" if self.action == "suppress" else f"amplify x{self.value:g}"
        where = (
            f"from position {self.start} on"
            if self.scope == "onward"
            else f"at {list(self.positions)}"
        )
        return f"{verb} L{self.layer}/F{self.feature} {where}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Proposal:
        """The proposal `to_dict` gave."""
        return cls(**{**d, "positions": tuple(d["positions"])})


def _candidate_nodes(graph: StepGraph, lo: int) -> np.ndarray:
    """Indices of the graph's feature nodes at positions >= lo."""
    return np.flatnonzero((graph.kind == FEATURE) & (graph.pos >= lo))


def candidate_influence(graph: StepGraph, lo: int) -> dict[FeatureKey, float]:
    """Summed influence of each feature's graph nodes at positions >= lo."""
    out: dict[FeatureKey, float] = {}
    for i in _candidate_nodes(graph, lo):
        key = (int(graph.layer[i]), int(graph.feature[i]))
        out[key] = out.get(key, 0.0) + float(graph.influence[i])
    return out


def drop_nodes(graph: StepGraph, drop: np.ndarray) -> StepGraph:
    """The graph without the nodes where `drop` (bool [N]) is set, and their edges."""
    keep = ~drop
    new_index = np.cumsum(keep) - 1
    edge_keep = keep[graph.src] & keep[graph.dst]
    return StepGraph(
        trace_id=graph.trace_id,
        step=graph.step,
        position=graph.position,
        kind=graph.kind[keep],
        layer=graph.layer[keep],
        pos=graph.pos[keep],
        feature=graph.feature[keep],
        activation=graph.activation[keep],
        influence=graph.influence[keep],
        src=new_index[graph.src[edge_keep]],
        dst=new_index[graph.dst[edge_keep]],
        weight=graph.weight[edge_keep],
        scores=dict(graph.scores),
    )


def rank_candidates(
    graph: StepGraph,
    lo: int,
    rank_by: RankBy,
    action: Action = "suppress",
    score_graph: Callable[[StepGraph], float] | None = None,
    candidate_pool: int = 24,
    allowed: Collection[FeatureKey] | None = None,
) -> list[tuple[FeatureKey, float]]:
    """Candidates (nodes at positions >= lo; only `allowed` ones if given) with their
    ranking score, best first; ties broken by (layer, feature).

    `score_graph` (the verifier's probability of "incorrect" for a graph) is needed for
    `rank_by="verifier"`, which re-scores only the `candidate_pool` most influential ones.
    """
    influence = candidate_influence(graph, lo)
    if allowed is not None:
        influence = {key: value for key, value in influence.items() if key in allowed}
    by_influence = sorted(influence, key=lambda key: (-influence[key], key))
    if rank_by == "influence":
        return [(key, influence[key]) for key in by_influence]
    if rank_by == "layer":
        order = sorted(influence, key=lambda key: (-key[0], -influence[key], key))
        return [(key, float(key[0])) for key in order]
    if rank_by != "verifier":
        raise ValueError(f"unknown rank_by {rank_by!r}; expected influence, verifier or layer")
    if score_graph is None:
        raise ValueError("rank_by='verifier' needs a score_graph function")
    base = score_graph(graph)
    nodes = _candidate_nodes(graph, lo)
    sign = 1.0 if action == "suppress" else -1.0
    scored = {}
    for key in by_influence[:candidate_pool]:
        mask = np.zeros(graph.n_nodes, dtype=bool)
        mask[nodes[(graph.layer[nodes] == key[0]) & (graph.feature[nodes] == key[1])]] = True
        scored[key] = sign * (base - score_graph(drop_nodes(graph, mask)))
    return [(key, scored[key]) for key in sorted(scored, key=lambda k: (-scored[k], k))]


def window_positions(
    graph: StepGraph, window: tuple[int, int], active: ActiveMap
) -> dict[FeatureKey, tuple[int, ...]]:
    """Each candidate's positions in the window: where it was active or has a graph node."""
    lo, hi = window
    found: dict[FeatureKey, set[int]] = {}
    for i in _candidate_nodes(graph, lo):
        key = (int(graph.layer[i]), int(graph.feature[i]))
        positions = found.setdefault(key, set(active.get(key, ())))
        if graph.pos[i] <= hi:
            positions.add(int(graph.pos[i]))
    return {key: tuple(sorted(positions)) for key, positions in found.items()}


def propose(
    graph: StepGraph,
    window: tuple[int, int],
    active: ActiveMap,
    n: int,
    rank_by: RankBy,
    action: Action,
    amplify_scale: float,
    scope: Scope,
    score_graph: Callable[[StepGraph], float] | None = None,
    candidate_pool: int = 24,
    margin_drops: Callable[[list[Proposal]], list[float]] | None = None,
) -> list[Proposal]:
    """The top `n` interventions for one step (fewer when there are fewer candidates).

    `margin_drops` (proposals -> how much each lowers the explained prediction's top-two
    logit margin) is needed for `rank_by="margin"`. Deterministic: the ranking has no
    randomness and ties break on (layer, feature).
    """
    positions = window_positions(graph, window, active)
    allowed = {key for key, where in positions.items() if where or scope == "onward"}
    value = 0.0 if action == "suppress" else float(amplify_scale)

    def make(key: FeatureKey, score: float) -> Proposal:
        return Proposal(*key, action, value, scope, window[0], positions[key], score, "graph")

    if rank_by == "margin":
        if margin_drops is None:
            raise ValueError("rank_by='margin' needs a margin_drops function")
        pool = rank_candidates(graph, window[0], "influence", allowed=allowed)[:candidate_pool]
        return rank_by_margin([make(key, 0.0) for key, _ in pool], margin_drops, n)
    ranked = rank_candidates(
        graph, window[0], rank_by, action, score_graph, candidate_pool, allowed
    )
    return [make(key, score) for key, score in ranked[:n]]


def rank_by_margin(
    candidates: Sequence[Proposal],
    margin_drops: Callable[[list[Proposal]], list[float]],
    n: int,
) -> list[Proposal]:
    """The `n` candidates whose measured margin drop is largest, best first (ties by
    (layer, feature)), each scored by its drop."""
    drops = margin_drops(list(candidates)) if candidates else []
    ranked = sorted(
        zip(candidates, drops, strict=True), key=lambda cd: (-cd[1], cd[0].layer, cd[0].feature)
    )
    return [replace(c, score=float(drop)) for c, drop in ranked[:n]]


def step_rng(seed: int, step_id: str) -> np.random.Generator:
    """A generator that depends only on the run seed and the step (not on visiting order)."""
    return np.random.default_rng([seed, zlib.crc32(step_id.encode())])


def random_control(
    proposals: list[Proposal], active: ActiveMap, rng: np.random.Generator
) -> list[Proposal]:
    """One random active feature per proposal, of the proposal's layer, never a proposed one.

    A proposal whose layer has no other active feature in the window gets no control, so
    the control can be shorter than `proposals` (rare: k features are active per token).
    """
    taken = {(p.layer, p.feature) for p in proposals}
    out = []
    for p in proposals:
        pool = sorted(key for key in active if key[0] == p.layer and key not in taken)
        if not pool:
            continue
        key = pool[int(rng.integers(len(pool)))]
        taken.add(key)
        out.append(
            Proposal(
                key[0], key[1], p.action, p.value, p.scope, p.start, active[key], 0.0, "random"
            )
        )
    return out


def margin_matched_control(
    pool: Sequence[Proposal],
    proposals: Sequence[Proposal],
    active: ActiveMap,
    n: int,
    rng: np.random.Generator,
    margin_drops: Callable[[list[Proposal]], list[float]],
) -> list[Proposal]:
    """The margin-matched control: for each feature of the proposals' candidate `pool`
    (the `candidate_pool` most influential, which `rank_by=margin` measures), one random
    feature of the same layer active at one of its positions (any window position when it
    has none), never a proposed or an already drawn one; the draws are then ranked by their
    own measured margin drop as the pool is, and the top `n` kept.

    Pool, layers, positions, action and ranking are the proposals'; only the graph's
    influence ranking, which chose the pool, is missing. A pool feature whose layer has no
    eligible feature gets no draw.
    """
    taken = {(p.layer, p.feature) for p in proposals}
    drawn = []
    for c in pool:
        where = set(c.positions)
        options = sorted(
            key
            for key, positions in active.items()
            if key[0] == c.layer and key not in taken and (not where or where & set(positions))
        )
        if not options:
            continue
        key = options[int(rng.integers(len(options)))]
        taken.add(key)
        drawn.append(replace(c, feature=key[1], positions=active[key], source="margin_matched"))
    return rank_by_margin(drawn, margin_drops, n)
