"""`crv.graphs.attribute`: one attribution graph from plain values, for notebooks and scripts.

The stage and crv-verify attribute many steps of a trace from one forward pass
(`TraceAttributor`); a user with a model, a transcoder set and a token sequence wants one
graph without building a `GraphsConfig`. This is that call, on the same machinery.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crv.graphs.attribute import TraceAttributor, span_of
from crv.graphs.config import GraphsConfig, Position
from crv.graphs.graph import StepGraph
from crv.models.adapter import ArchAdapter
from crv.transcoders.module import TranscoderSet

_DEFAULTS = GraphsConfig()


def attribute(
    model: torch.nn.Module,
    transcoders: TranscoderSet,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    position: int | Sequence[int],
    max_feature_nodes: int = _DEFAULTS.max_feature_nodes,
    max_logits: int = _DEFAULTS.max_logits,
    logit_cum_prob: float = _DEFAULTS.logit_cum_prob,
    contrast: tuple[int, int] | str | None = None,
    surprise_weights: bool = False,
    node_threshold: float = _DEFAULTS.node_threshold,
    edge_threshold: float = _DEFAULTS.edge_threshold,
    batch_size: int = _DEFAULTS.batch_size,
    trace_id: str = "",
) -> StepGraph:
    """The pruned attribution graph of the prediction(s) of `model` at `position` of
    `input_ids` (tokens 0..position are read; position >= 1).

    `position`: one token position (its next-token logits), or several (one whole-step
    graph whose logit nodes are each position's top logits; each position weighs 1/n, or
    with `surprise_weights` in proportion to 1 - p of the token that follows it in
    `input_ids`). `contrast`: `(token, baseline)` explains logit(token) - logit(baseline)
    at the one `position` instead; `"margin"` the top-1 minus top-2 logit there.
    """
    span = span_of(position)
    if contrast is not None and len(span) != 1:
        raise ValueError(f"a contrastive graph explains one position, got {list(span)}")
    cfg = GraphsConfig(
        max_logits=max_logits,
        logit_cum_prob=logit_cum_prob,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        position=Position.step_surprise if surprise_weights else Position.step,
    )
    explained = span if len(span) > 1 else span[0]
    attributor = TraceAttributor(
        ArchAdapter.for_model(model), transcoders, input_ids, [explained], cfg
    )
    if contrast is None:
        att = attributor.attribute_step(explained, 0, trace_id)
    elif contrast == "margin":
        att = attributor.attribute([attributor.margin_node(span[0])], 0, trace_id)
    elif isinstance(contrast, str):
        raise ValueError(f"contrast must be (token, baseline), 'margin' or None, not {contrast!r}")
    else:
        token, baseline = contrast
        att = attributor.attribute(
            [attributor.contrast_node(span[0], token, baseline)], 0, trace_id
        )
    return att.pruned(node_threshold, edge_threshold)
