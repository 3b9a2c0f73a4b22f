"""Attribution graphs of reasoning steps: one forward pass per trace, rows shared by steps.

The method (CRV, Zhao et al. 2025, on the attribution graphs of Ameisen et al. 2025)
---------------------------------------------------------------------------------
A step's graph explains the model's next-token prediction at one token position p (the
step's last token with `position="after"`), or at several (below: targets). Its nodes are the active transcoder features at
positions 1..p (layer, position, latent, activation), one error node per (layer, position)
(the MLP output minus its transcoder's reconstruction), one token node per position (the
input of layer 0, so positional or scaled embeddings are part of it) and the top next-token
logits at p (up to `max_logits`, until `logit_cum_prob`). At position 0 (BOS) only the token
node is a source (no features, no error node), as in circuit-tracer 0.5.0, whose token nodes
include BOS. Its edges matter: on 30 least-confident crv-tiny test steps its largest edge is
4.5-100% (median 13%) of the graph's largest, and it enters every row's normalisation, so the
influence ranking needs it to select the same features as circuit-tracer
(`benchmarks/attribution_circuit_tracer.py --run`).
The weight of an edge source -> target is the direct linear effect of the source on the
target's pre-activation: the encoder pre-activation `W_enc[f] . MLP-in` for a feature, the
demeaned logit `(W_U[t] - mean_v W_U[v]) . final-norm-out` for a logit.

Targets (`LogitNode`)
---------------------
A graph's logit nodes are its targets, each with a weight in the influence on the logits
(`prune`). A one-position graph weights its top logits by their probabilities. A whole-step
graph (`position=step`) explains every prediction of a step at once (positions `before` ..
`after - 1`): a logit node per (position, attributed token), position p's weights its
probabilities times w_p, w_p = 1/n (`step`) or proportional to the surprise 1 - p of the
token the model wrote after p (`step_surprise`); the features expanded are those with the
most influence on all of them, within the same `max_feature_nodes`. With one position it is
that position's graph. A contrastive target (`TraceAttributor.contrast_node`, weight 1) is
logit(token) - logit(baseline) at one position: its row is the difference of the two
tokens' logit rows (a row is linear in its target direction), so it is exact like them;
`crv.graphs.contrastive` finds the wrong and the right token of an incorrect step.

Local replacement model, and why the weights are exact
------------------------------------------------------
`ReplacementTrace` runs the model inside `adapter.frozen()` (attention probabilities and
norm scale factors are constants for autograd, values unchanged) and replaces every MLP
output by a detached leaf of the same value. Every MLP output splits exactly into
sum_f a_f W_dec[f] + b_dec + error. Between the leaves (layer-0 input, MLP outputs) and any
MLP input or the final norm's output, the network is then affine: residual additions,
linear projections, attention as a constant mixing of values, norms as constant scalings.
So the gradient g of a target at a leaf gives the exact direct effect of everything that
enters there: a feature contributes a_f (W_dec[f] . g), an error e . g, a token node h0 . g.
"Direct" because a feature's own downstream activations are not recomputed: every path
from a source to a target that passes through another MLP is cut at that MLP's leaf.

Rows in batches
---------------
A row (all sources of one target) costs one backward pass; `ReplacementTrace.rows` runs one
backward for a batch of targets with `torch.autograd.grad(..., is_grads_batched=True)`
(vmap over the batch: target b's vector is injected at its (layer, position) in batch row b).
On crv-tiny this costs about as much per row as a batch-expanded forward (the approach of
circuit-tracer) without that forward's start-up, and the vmap form runs a partial batch at
its own size; batches of 16-32 rows were the cheapest per row. Targets: the logits first, then features in order of their
estimated influence on the logits (influence through the rows computed so far, see
`prune.column_influence`), `update_interval` batches at a time, re-ranked in between, up to
`max_feature_nodes`. Pruning and scores are in `prune.py`.

One forward pass per trace
--------------------------
With causal attention everything at positions <= p is the same in the whole trace as in
the prefix that ends at p. So `TraceAttributor` runs the trace once (through the KV cache
in segments that end at the steps' positions, so a backward for a target at q only walks
positions <= q) and builds every step's graph from it. A feature's row does not depend on
which logits are explained, so rows live in a cache keyed by (layer, position, latent) and a
later step that selects the same feature reuses it. The logit rows of all steps are
computed together, in full batches (for whole-step graphs: every position of every step;
a step's positions share its forward segment). The graphs are identical to attributing each
step from its own prefix; `benchmarks/attribution.py` measures the speed-up and where the time goes
(README.md's Benchmarks section has the numbers). The gain is modest: a step's graph is
dominated by the features at its own position, so the steps of a trace share few rows, and
rows (backward passes and their assembly) are most of the time; what is saved is the single
forward and encoding per trace and the packed logit rows.

Correctness test (tests/test_graphs_attribute.py)
--------------------------------------------
For tiny random models of every supported family with random TopK transcoders, every
MLP output is replaced by constants equal to transcoder-out + error (its clean value), and
single sources are perturbed in the frozen model: a feature's activation, an error vector,
a token node's vector. Forward-mode AD through `adapter.frozen()` gives the change of every
feature pre-activation and demeaned logit per unit perturbation; since the frozen model is
affine in the sources, this is exactly the finite change, and it must equal the unpruned
adjacency's column of that source (atol 1e-4). A second test checks that a step's graph
from the whole trace equals the graph from the prefix that ends at the step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crv.graphs.config import GraphsConfig, Position
from crv.graphs.graph import ERROR, FEATURE, LOGIT, TOKEN, StepGraph
from crv.graphs.prune import (
    GraphCounts,
    column_influence,
    normalize_rows,
    prune,
    to_step_graph,
)
from crv.graphs.replacement import Key, ReplacementTrace, Stopwatch
from crv.models.adapter import ArchAdapter
from crv.transcoders.module import TranscoderSet

Explained = int | tuple[int, ...]
"""What one graph explains: the next-token prediction at a token position, or those at
several positions (a whole-step graph, `position=step`)."""

WHOLE_STEP = (Position.step, Position.step_surprise)


def span_of(explained: Explained) -> tuple[int, ...]:
    """The positions of an `Explained` (one int: a one-position tuple)."""
    if isinstance(explained, (int, np.integer)):
        return (int(explained),)
    return tuple(int(p) for p in explained)


@dataclass(frozen=True)
class LogitNode:
    """A target node of a graph: the demeaned logit of `token` at `position`, minus the
    logit of `baseline` when one is set (a contrastive target: logit(token) -
    logit(baseline), circuit-tracer's custom attribution targets). `weight` is the node's
    weight in the influence on the logits (`prune`), `prob` its token's probability (the
    node's activation)."""

    position: int
    token: int
    weight: float
    prob: float
    baseline: int = -1


class RowCache:
    """Rows by target key, the least recently used dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.n_bytes = 0
        self._rows: OrderedDict[Key, torch.Tensor] = OrderedDict()

    def get(self, key: Key) -> torch.Tensor | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: Key, row: torch.Tensor) -> None:
        self._rows[key] = row
        self.n_bytes += row.numel() * row.element_size()
        while self.n_bytes > self.max_bytes and len(self._rows) > 1:
            _, old = self._rows.popitem(last=False)
            self.n_bytes -= old.numel() * old.element_size()


@dataclass
class StepAttribution:
    """The unpruned graph of one step: node table and the rows of its adjacency.

    Nodes are ordered [features | errors | tokens | logits] like `StepGraph`; errors are
    ordered by (layer, position), features by (layer, position, TopK slot).
    `adjacency_RN[r, j]` is the direct effect of node j on row r's node, where rows are the
    feature nodes followed by the logit nodes (errors and tokens have no incoming edges).
    `scores`: n_active_features (active latents of all layers at positions 1..position),
    n_expanded_features, n_logits, logit_mass (their total probability), top_logit_prob,
    logit_entropy (of the attributed logits' renormalised probabilities); `pruned` adds
    replacement_score and completeness_score (see `prune.graph_scores`).
    """

    trace_id: str
    step: int
    position: int
    nodes: dict[str, np.ndarray]
    adjacency_RN: torch.Tensor
    counts: GraphCounts
    logit_probs: torch.Tensor
    logit_weights: torch.Tensor
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def feature_layer(self) -> torch.Tensor:
        return torch.from_numpy(self.nodes["layer"][: self.counts.n_features].astype(np.int64))

    def dense_adjacency(self) -> np.ndarray:
        """[N, N] float32, target x source (zero rows for errors and tokens)."""
        dense = np.zeros((self.counts.n_nodes, self.counts.n_nodes), dtype=np.float32)
        dense[self.counts.row_nodes.numpy()] = self.adjacency_RN.cpu().numpy()
        return dense

    def pruned(self, node_threshold: float, edge_threshold: float) -> StepGraph:
        """The `StepGraph` pruned by influence, with replacement and completeness scores."""
        result = prune(
            self.adjacency_RN,
            self.counts,
            self.logit_weights,
            self.feature_layer,
            node_threshold,
            edge_threshold,
        )
        return to_step_graph(
            self.trace_id,
            self.step,
            self.position,
            self.nodes,
            self.adjacency_RN,
            self.counts,
            result,
            self.scores,
        )


def top_logits(
    probs_V: torch.Tensor, max_logits: int, cum_prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most probable tokens until their cumulative probability reaches `cum_prob` (at most
    `max_logits`): (token ids, probabilities)."""
    probs, tokens = torch.topk(probs_V, min(max_logits, len(probs_V)))
    n = (
        int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(cum_prob, dtype=probs.dtype)))
        + 1
    )
    return tokens[:n], probs[:n]


def step_positions(
    steps: Sequence[dict[str, Any]],
    prompt_len: int,
    position: str,
    token_probs: Sequence[float] | None = None,
) -> list[Explained]:
    """The token position(s) each step's graph explains.

    A step owns the predictions made at positions `prev` .. `last - 1`, where `prev` is the
    previous step's last token (the prompt's last token for step 0) and `last` its own last
    token. `after` = `last` (the prediction that follows the step), `before` = `prev` (the
    prediction of the step's first token), `least_confident` = the position among the step's
    own predictions where the generated token had the lowest probability (the earliest on
    ties): the model's least certain decision in the step, often the token where an error
    is made. It needs `token_probs[p]` = P(token p + 1 | tokens <= p), see `next_token_probs`.
    `step` and `step_surprise` = all of them, `(prev, ..., last - 1)`: a whole-step graph
    (an empty step falls back to `(last,)`).
    """
    last = [int(s["last_token"]) for s in steps]
    previous = [prompt_len - 1, *last[:-1]]
    if position == "after":
        return list(last)
    if position == "before":
        return previous
    if position in WHOLE_STEP:
        return [
            tuple(range(lo, hi)) if lo < hi else (hi,)
            for lo, hi in zip(previous, last, strict=True)
        ]
    if position != "least_confident":
        raise ValueError(f"unknown position {position!r}")
    if token_probs is None:
        raise ValueError("position='least_confident' needs the trace's token probabilities")
    probs = np.asarray(token_probs, dtype=np.float64)
    out = []
    for lo, hi in zip(previous, last, strict=True):
        if lo >= hi or hi > len(probs):
            out.append(hi)  # an empty or out-of-range step: fall back to its last token
            continue
        out.append(lo + int(np.argmin(probs[lo:hi])))
    return out


@torch.inference_mode()
def next_token_probs(model: torch.nn.Module, input_ids: Sequence[int]) -> np.ndarray:
    """[T - 1] float64: element p = the model's probability of token p + 1 given tokens <= p."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(input_ids)], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0].exp().cpu().numpy()


def explained_positions(
    model: torch.nn.Module,
    input_ids: Sequence[int],
    steps: Sequence[dict[str, Any]],
    prompt_len: int,
    position: str,
) -> list[Explained]:
    """`step_positions` of one trace, running the model for its token probabilities only
    when the rule needs them (`least_confident`)."""
    probs = next_token_probs(model, input_ids) if position == "least_confident" else None
    return step_positions(steps, prompt_len, position, probs)


class TraceAttributor:
    """The step graphs of one token sequence from one forward pass, sharing rows."""

    def __init__(
        self,
        adapter: ArchAdapter,
        tset: TranscoderSet,
        input_ids: Sequence[int] | torch.Tensor,
        positions: Sequence[Explained],
        cfg: GraphsConfig,
    ) -> None:
        self.cfg = cfg
        self.stopwatch = Stopwatch()
        self.input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
        spans = [span_of(p) for p in positions]
        self.trace = ReplacementTrace(
            adapter,
            tset,
            self.input_ids,
            [p for span in spans for p in span],
            self.stopwatch,
            segment_at=[max(span) for span in spans],
        )
        self.cache = RowCache(cfg.runtime_row_cache_mb << 20)
        self.n_rows_computed = 0
        self.n_rows_requested = 0

    def extend(
        self, input_ids: Sequence[int] | torch.Tensor, positions: Sequence[Explained]
    ) -> None:
        """Targets further along a growing sequence (`ReplacementTrace.extend`): no second
        pass over the prefix, and the cached rows stay valid."""
        spans = [span_of(p) for p in positions]
        self.input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
        self.trace.extend(
            self.input_ids, [p for span in spans for p in span], [max(span) for span in spans]
        )

    def rows(self, keys: Sequence[Key]) -> list[torch.Tensor]:
        """Rows of `keys`, from the cache or computed in batches of targets near each other."""
        part = "logit rows" if all(k[0] == self.trace.n_layers for k in keys) else "feature rows"
        with self.stopwatch(part):
            return self._rows(keys)

    def _rows(self, keys: Sequence[Key]) -> list[torch.Tensor]:
        found: dict[Key, torch.Tensor] = {}
        missing = []
        for key in dict.fromkeys(keys):
            row = self.cache.get(key)
            if row is None:
                missing.append(key)
            else:
                found[key] = row
        # A batch's backward runs up to its highest layer and its last position.
        missing.sort(key=lambda k: (k[0], k[1]))
        batch_size = self.cfg.batch_size
        for i in range(0, len(missing), batch_size):
            batch = missing[i : i + batch_size]
            for key, row in zip(batch, self.trace.rows(batch), strict=True):
                found[key] = row
                self.cache.put(key, row)
        self.n_rows_computed += len(missing)
        self.n_rows_requested += len(keys)
        return [found[key] for key in keys]

    def position_weights(self, span: tuple[int, ...]) -> np.ndarray:
        """Each position's share of a whole-step graph's logit weight: 1/n each, or with
        `position=step_surprise` in proportion to the surprise 1 - p of the token written
        after it (1/n each when every one is certain)."""
        n = len(span)
        uniform = np.full(n, 1.0 / n)
        if self.cfg.position != Position.step_surprise or n == 1:
            return uniform
        surprise = np.array(
            [1.0 - float(self.trace.probs(p)[int(self.input_ids[p + 1])]) for p in span]
        )
        return surprise / surprise.sum() if surprise.sum() > 0 else uniform

    def logit_nodes(self, explained: Explained) -> list[LogitNode]:
        """The logit nodes of a graph explaining `explained`: at each position its top
        logits (`top_logits`), weighted by probability times the position's weight."""
        span = span_of(explained)
        nodes = []
        for p, w in zip(span, self.position_weights(span), strict=True):
            tokens, probs = top_logits(
                self.trace.probs(p), self.cfg.max_logits, self.cfg.logit_cum_prob
            )
            nodes += [
                LogitNode(p, int(t), float(w * q), float(q))
                for t, q in zip(tokens.tolist(), probs.tolist(), strict=True)
            ]
        return nodes

    def contrast_node(self, position: int, token: int, baseline: int) -> LogitNode:
        """The single target logit(token) - logit(baseline) at `position` (a target of the
        trace), weight 1: why the model preferred `token` over `baseline` there."""
        prob = float(self.trace.probs(position)[token])
        return LogitNode(position, int(token), 1.0, prob, int(baseline))

    def margin_node(self, position: int) -> LogitNode:
        """`contrast_node` of the top-1 over the top-2 token at `position`: the margin of
        the model's choice, when no correct token is known."""
        first, second = torch.topk(self.trace.probs(position), 2).indices.tolist()
        return self.contrast_node(position, first, second)

    def node_rows(self, targets: Sequence[LogitNode]) -> list[torch.Tensor]:
        """The rows of logit nodes; a contrastive node's row is the difference of its two
        tokens' rows (the row is linear in the target direction)."""
        L = self.trace.n_layers
        keys = [(L, t.position, t.token) for t in targets]
        bases = [(L, t.position, t.baseline) for t in targets if t.baseline >= 0]
        rows = self.rows(keys + bases)
        by_key = dict(zip(keys + bases, rows, strict=True))
        return [
            by_key[key] - by_key[(L, t.position, t.baseline)] if t.baseline >= 0 else by_key[key]
            for key, t in zip(keys, targets, strict=True)
        ]

    def attribute_steps(
        self,
        positions: Sequence[Explained],
        steps: Sequence[int] | None = None,
        trace_id: str = "",
    ) -> list[StepAttribution]:
        """The unpruned graphs of several steps; their logit rows are computed together."""
        targets = [self.logit_nodes(p) for p in positions]
        self.node_rows([t for nodes in targets for t in nodes])
        steps = list(range(len(positions))) if steps is None else steps
        return [self.attribute(nodes, s, trace_id) for nodes, s in zip(targets, steps, strict=True)]

    def attribute_step(
        self, position: Explained, step: int = 0, trace_id: str = ""
    ) -> StepAttribution:
        """The unpruned graph of the step whose next-token logits at `position` (one token
        position, or several for a whole-step graph) are explained."""
        return self.attribute(self.logit_nodes(position), step, trace_id)

    def attribute(
        self,
        targets: Sequence[LogitNode],
        step: int = 0,
        trace_id: str = "",
        extra_scores: dict[str, float] | None = None,
    ) -> StepAttribution:
        """The unpruned graph whose logit nodes are `targets` (their rows are the direct
        effects on them; features are expanded by influence on their weighted sum)."""
        cfg, trace = self.cfg, self.trace
        layout, L = trace.layout, trace.n_layers
        position = max(t.position for t in targets)
        n_cols = (position + 1) * layout.stride
        n_logits = len(targets)
        probs = torch.tensor([t.prob for t in targets], dtype=torch.float64)

        active_PLK = trace.acts_PLK[: position + 1] != 0
        active_PLK[0] = False
        c_pos, c_layer, c_slot = (t.cpu().numpy() for t in torch.nonzero(active_PLK, as_tuple=True))
        c_latent = trace.idx_PLK[c_pos, c_layer, c_slot].cpu().numpy()
        c_col = layout.feature_col(c_pos, c_layer, c_slot)
        n_max = min(cfg.max_feature_nodes, len(c_pos))

        # Rows so far: [logits | selected features], signed and row-normalised |.|.
        n_rows = n_logits + n_max
        signed_RC = torch.zeros(n_rows, n_cols)
        normed_RC = torch.zeros(n_rows, n_cols)
        own_col_R = torch.full((n_rows,), -1, dtype=torch.long)
        layer_R = torch.zeros(n_rows, dtype=torch.long)
        weight_R = torch.zeros(n_rows, dtype=torch.float64)
        weight_R[:n_logits] = torch.tensor([t.weight for t in targets], dtype=torch.float64)

        def put(first: int, rows: list[torch.Tensor]) -> None:
            """Rows first.. of the tables; normalised together (one call, not one per row)."""
            for r, row in enumerate(rows, first):
                signed_RC[r, : len(row)] = row
            end = first + len(rows)
            normed_RC[first:end] = normalize_rows(signed_RC[first:end])

        logit_rows = self.node_rows(targets)
        with self.stopwatch("bookkeeping"):
            put(0, logit_rows)
        n_filled = n_logits
        c_col_t = torch.from_numpy(c_col)
        taken = torch.zeros(len(c_pos), dtype=torch.bool)
        chosen: list[int] = []
        while len(chosen) < n_max:
            with self.stopwatch("influence"):
                influence_C = column_influence(
                    normed_RC[:n_filled],
                    weight_R[:n_filled],
                    own_col_R[:n_filled],
                    layer_R[:n_filled],
                )
                score = influence_C[c_col_t].masked_fill(taken, 0.0)
                top = torch.topk(
                    score, min(cfg.update_interval * cfg.batch_size, n_max - len(chosen))
                )
                picked = top.indices[top.values > 0].numpy()
            if len(picked) == 0:
                break
            keys = [(int(c_layer[i]), int(c_pos[i]), int(c_latent[i])) for i in picked]
            feature_rows = self.rows(keys)
            with self.stopwatch("bookkeeping"):
                put(n_filled, feature_rows)
                end = n_filled + len(picked)
                own_col_R[n_filled:end] = torch.from_numpy(c_col[picked])
                layer_R[n_filled:end] = torch.from_numpy(c_layer[picked])
                n_filled = end
            taken[picked] = True
            chosen.extend(picked.tolist())

        # The step graph: features sorted by (layer, position, slot), then errors, tokens.
        chosen_F = np.array(chosen, dtype=np.int64)
        order = np.lexsort((c_slot[chosen_F], c_pos[chosen_F], c_layer[chosen_F]))
        feat = chosen_F[order]
        err_layer, err_pos = (
            a.ravel() for a in np.meshgrid(np.arange(L), np.arange(1, position + 1), indexing="ij")
        )
        tok_pos = np.arange(position + 1)  # BOS (position 0) included
        src_cols = np.concatenate(
            [c_col[feat], layout.error_col(err_pos, err_layer), layout.token_col(tok_pos)]
        )
        counts = GraphCounts(len(feat), len(err_pos), len(tok_pos), n_logits)
        row_index = np.concatenate([n_logits + order, np.arange(n_logits)])
        adjacency_RN = torch.zeros(len(row_index), counts.n_nodes)
        adjacency_RN[:, : len(src_cols)] = signed_RC[row_index][:, src_cols]

        logit_tokens = np.array([t.token for t in targets], dtype=np.int32)
        logit_pos = np.array([t.position for t in targets], dtype=np.int32)
        input_ids = trace.input_ids.cpu().numpy()
        nodes = {
            "kind": np.concatenate(
                [
                    np.full(len(feat), FEATURE),
                    np.full(len(err_pos), ERROR),
                    np.full(len(tok_pos), TOKEN),
                    np.full(n_logits, LOGIT),
                ]
            ).astype(np.int8),
            "layer": np.concatenate(
                [c_layer[feat], err_layer, np.full(len(tok_pos), -1), np.full(n_logits, L)]
            ).astype(np.int16),
            "pos": np.concatenate([c_pos[feat], err_pos, tok_pos, logit_pos]).astype(np.int32),
            "feature": np.concatenate(
                [c_latent[feat], np.full(len(err_pos), -1), input_ids[tok_pos], logit_tokens]
            ).astype(np.int32),
            "activation": np.concatenate(
                [
                    trace.acts_PLK[c_pos[feat], c_layer[feat], c_slot[feat]].cpu().numpy(),
                    np.zeros(len(err_pos) + len(tok_pos)),
                    probs.numpy(),
                ]
            ).astype(np.float32),
        }
        scores = {
            "n_active_features": float(len(c_pos)),
            "n_expanded_features": float(len(feat)),
            "n_logits": float(n_logits),
            **logit_scores(probs, logit_pos),
            **(extra_scores or {}),
        }
        weights = weight_R[:n_logits].clone()
        return StepAttribution(
            trace_id, step, position, nodes, adjacency_RN, counts, probs, weights, scores
        )


def logit_scores(probs: torch.Tensor, pos: np.ndarray) -> dict[str, float]:
    """Confidence scores of a graph's logit nodes, per position then over positions:
    logit_mass (mean total probability of a position's attributed logits), top_logit_prob
    (the lowest top probability: the least certain prediction) and logit_entropy (the
    highest entropy of a position's renormalised probabilities). With one position they
    are that position's values."""
    mass, top, entropy = [], [], []
    for p in np.unique(pos):
        probs_p = probs[torch.from_numpy(pos == p)]
        p_norm = probs_p / probs_p.sum()
        mass.append(float(probs_p.sum()))
        top.append(float(probs_p.max()))
        entropy.append(float(-(p_norm * torch.log(p_norm.clamp_min(1e-300))).sum()))
    return {
        "logit_mass": float(np.mean(mass)),
        "top_logit_prob": min(top),
        "logit_entropy": max(entropy),
    }


def attribute_trace(
    adapter: ArchAdapter,
    tset: TranscoderSet,
    input_ids: Sequence[int] | torch.Tensor,
    positions: Sequence[Explained],
    cfg: GraphsConfig,
    trace_id: str = "",
    steps: Sequence[int] | None = None,
) -> list[StepAttribution]:
    """Unpruned graphs of the steps explained at `positions`, from one forward pass."""
    return TraceAttributor(adapter, tset, input_ids, positions, cfg).attribute_steps(
        positions, steps, trace_id
    )


def trace_graphs(
    adapter: ArchAdapter,
    tset: TranscoderSet,
    input_ids: Sequence[int] | torch.Tensor,
    positions: Sequence[Explained],
    cfg: GraphsConfig,
    trace_id: str = "",
    steps: Sequence[int] | None = None,
) -> list[StepGraph]:
    """Pruned `StepGraph`s of the steps explained at `positions`, from one forward pass."""
    return [
        att.pruned(cfg.node_threshold, cfg.edge_threshold)
        for att in attribute_trace(adapter, tset, input_ids, positions, cfg, trace_id, steps)
    ]
