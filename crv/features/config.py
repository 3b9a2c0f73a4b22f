"""Configuration of the `features` stage (`features` section); field docstrings are the help."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FeaturesConfig:
    """How graph features are computed from the pruned step graphs (`features` section)."""

    n_layers: int | None = None
    """Layers of the subject model (one histogram bin each); default: read from the logit
    nodes of the graphs (their `layer` is n_layers)."""

    betweenness_exact_max_nodes: int = 64
    """Graphs with at most this many nodes get exact betweenness centrality; larger ones
    use the k-source sampling estimate (Brandes & Pich 2007) with `betweenness_k` sources."""

    betweenness_k: int = 32
    """Number of sampled source nodes for approximate betweenness on large graphs."""

    identity: bool = False
    """Add the feature-identity family: which (layer, feature) nodes and which layers'
    error nodes carry influence in the step's graph, influence-weighted and sparse
    (`id_L<l>_F<f>`, `err_L<l>`). Off by default: it showed no evidence of a gain on crv-tiny
    and multiplies the features stage's time and the verifier's inputs (README.md, "Figures
    behind the code")."""

    def __post_init__(self) -> None:
        if self.n_layers is not None and self.n_layers < 1:
            raise ValueError(f"features.n_layers must be >= 1 or None, got {self.n_layers}")
        for name in ("betweenness_exact_max_nodes", "betweenness_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"features.{name} must be >= 1, got {getattr(self, name)}")
