"""Baseline step scores and probe inputs from one forward pass of the subject (library).

Each trace (prompt + completion, exactly the tokens the model saw) goes through one plain
forward pass with hidden states. A step owns the tokens after the previous step's last
token (after the prompt for the first step) up to and including its own last token, so
text between steps (a newline, an `Answer:` line) counts towards the following step. Token
t of a step is predicted by the logits z at position t - 1, with p = softmax(z). Per-token
quantities are averaged over the step's tokens, and every score is oriented so that
**higher = more likely incorrect**:

- `maxprob` = 1 - mean_t max_v p_t(v): one minus the mean maximum softmax probability
  (Hendrycks & Gimpel 2017).
- `perplexity` = exp(mean_t -log p_t(x_t)) of the tokens actually generated.
- `entropy` = mean_t H(p_t) = mean_t -sum_v p_t(v) log p_t(v) (nats).
- `temperature` = 1 - mean_t max_v softmax(z_t / T*): MaxProb after temperature scaling
  (Guo et al. 2017). With greedy decoding the generated token is always the argmax, so the
  usual token-NLL objective would drive T to 0; instead T* is the temperature, from the
  grid `temperature_grid`, whose step confidence mean_t max_v softmax(z_t / T) best
  predicts step *correctness* (lowest binary cross-entropy) on the labelled steps of the
  training split. Scaling changes the ranking because the mean over tokens is not
  invariant to T.
- `energy` = mean_t -logsumexp_v z_t(v): the free energy E = -T log sum exp(z / T) at
  T = 1 (Liu et al. 2020); low energy marks confident, in-distribution inputs.
- `coe_r`, `coe_c`: Chain-of-Embedding (Wang et al. 2024, "Latent space chain-of-embedding
  enables output-free LLM self-evaluation"). The step's hidden states averaged over its
  tokens form a chain h_0 .. h_L over the model's hidden-state outputs (embedding output,
  then every block). With magnitude changes m_l = ||h_{l+1} - h_l|| / ||h_L - h_0|| and
  angle changes a_l = arccos(cos(h_{l+1}, h_l)) / arccos(cos(h_L, h_0)), the paper's
  scores are CoE-R = mean_l m_l - mean_l a_l and CoE-C = |mean_l m_l exp(i a_l)|; both are
  larger for correct answers there, so crv stores their negatives. (The two normalisers
  are floored at 1e-12 so a chain that ends where it starts gives large, finite scores.)

Probe inputs, pooled over the step's own tokens (first .. last) in three ways (`POOLINGS`:
the mean, the last token of the step, the maximum per dimension):

- the hidden states of every layer (the embedding output and each block's residual
  output; evenly spaced layers when all do not fit `probe_max_bytes`), float16
  [steps, poolings, layers, D] (`hidden_states.safetensors`);
- the transcoders' latent activations on the MLP inputs of the same forward pass (each
  layer's `encode`; inactive latents are 0), a sparse row per step whose columns are laid
  out by `LatentLayout` (`latents.safetensors`, CSR);
- and, for the older `lr_probe` / `mlp_probe`, the mean-pooled hidden state at
  `probe_layer` (`hidden.npy`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix

from crv.baselines.config import BaselinesConfig
from crv.io import read_json

if TYPE_CHECKING:  # torch is imported where it is used: the loaders below do not need it
    import torch

    from crv.transcoders.module import TranscoderSet

SCORE_COLUMNS = ("maxprob", "perplexity", "entropy", "temperature", "energy", "coe_r", "coe_c")
"""Score columns of the baseline table (CoE ones only when `coe` is on)."""

POOLINGS = ("mean", "last", "max")
"""How a step's positions are pooled into one probe input."""

TABLE_FILE = "baselines.parquet"
HIDDEN_FILE = "hidden.npy"
META_FILE = "baselines.json"
HIDDEN_STATES_FILE = "hidden_states.safetensors"
LATENTS_FILE = "latents.safetensors"
HIDDEN_BYTES_PER_VALUE = 2  # float16


def resolve_probe_layer(probe_layer: int | None, n_hidden: int) -> int:
    """Index into the L + 1 hidden-state outputs; None = the middle block L // 2."""
    n_layers = n_hidden - 1
    layer = n_layers // 2 if probe_layer is None else probe_layer
    if not -n_hidden <= layer < n_hidden:
        raise ValueError(f"probe_layer {probe_layer} out of range for {n_layers} layers")
    return layer % n_hidden


def hidden_layers_within(n_hidden: int, d_model: int, bytes_per_step: float) -> list[int]:
    """Hidden-state outputs kept for the probes: all when their pooled float16 values fit
    `bytes_per_step`, else as many evenly spaced ones (first and last included) as do."""
    per_layer = len(POOLINGS) * d_model * HIDDEN_BYTES_PER_VALUE
    n_keep = max(1, min(n_hidden, int(bytes_per_step // per_layer)))
    if n_keep == 1:
        return [n_hidden - 1]
    return sorted({int(round(v)) for v in np.linspace(0, n_hidden - 1, n_keep)})


@dataclass(frozen=True)
class LatentLayout:
    """Columns of the pooled transcoder latents: column (p * n_layers + i) * n_latents + j
    holds latent j of the i-th transcoder layer (`layers[i]`) pooled by `POOLINGS[p]`."""

    layers: tuple[int, ...]
    n_latents: int

    @property
    def n_columns(self) -> int:
        return len(POOLINGS) * len(self.layers) * self.n_latents

    def column(self, layer: int, latent: int, pooling: str) -> int:
        """The column of one (layer, latent, pooling)."""
        p, i = POOLINGS.index(pooling), self.layers.index(layer)
        return (p * len(self.layers) + i) * self.n_latents + latent

    def describe(self, column: int) -> tuple[int, int, str]:
        """(layer, latent, pooling) of a column."""
        block, latent = divmod(int(column), self.n_latents)
        p, i = divmod(block, len(self.layers))
        return self.layers[i], latent, POOLINGS[p]

    def to_json(self) -> dict:
        return {
            "layers": list(self.layers),
            "n_latents": self.n_latents,
            "poolings": list(POOLINGS),
        }

    @classmethod
    def from_json(cls, d: dict) -> LatentLayout:
        if tuple(d.get("poolings", POOLINGS)) != POOLINGS:
            raise ValueError(f"latent layout pools {d['poolings']}, this crv reads {POOLINGS}")
        return cls(tuple(int(x) for x in d["layers"]), int(d["n_latents"]))


class TraceScores(NamedTuple):
    """One trace's `trace_step_scores`, S steps."""

    scores: dict[str, np.ndarray]
    """Score columns except `temperature`, each [S]."""
    probe: np.ndarray
    """Mean-pooled hidden state at `probe_layer`, float32 [S, D]."""
    conf: np.ndarray
    """Step confidence at each grid temperature [S, G]."""
    hidden: np.ndarray
    """Pooled hidden states, float16 [S, len(POOLINGS), len(hidden_layers), D]."""
    latents: csr_matrix | None
    """Pooled transcoder latents [S, layout.n_columns]; None without transcoders."""


def pool_positions(x_TD: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Mean, last and max of rows first..last of `x_TD` per span: [S, len(POOLINGS), D]."""
    import torch

    rows = []
    for first, last in spans:
        block = x_TD[first : last + 1]
        rows.append(torch.stack([block.mean(0), block[-1], block.max(0).values]))
    return torch.stack(rows)


def trace_step_scores(
    model: torch.nn.Module,
    input_ids: list[int],
    spans: list[tuple[int, int]],
    cfg: BaselinesConfig,
    device: str = "cpu",
    transcoders: TranscoderSet | None = None,
    hidden_layers: list[int] | None = None,
) -> TraceScores:
    """Scores and probe inputs of the steps of one trace from one forward pass.

    `spans` holds each step's first and last token index (inclusive; first >= 1).
    `hidden_layers`: hidden-state outputs kept (default all); `transcoders`: encode the
    MLP inputs of their layers in the same pass (latents left out without them)."""
    import torch

    from crv.models.adapter import ArchAdapter

    ids = torch.tensor([input_ids], device=device)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    if transcoders is not None:
        adapter = ArchAdapter.for_model(model)
        for layer in transcoders.layers:

            def hook(_m, inputs, _out, layer: int = layer) -> None:
                captured[layer] = inputs[0][0]

            handles.append(adapter.mlp(layer).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    # Only the predictions of step tokens are scored: start at the first step (a real
    # model's prompt is most of the trace, and every score below is a vocabulary-wide op).
    offset = min(first for first, _ in spans) - 1
    z = out.logits[0, offset:-1].float()  # z[t - 1 - offset] predicts token t
    targets = ids[0, offset + 1 :]
    logp = torch.log_softmax(z, dim=-1)
    per_token = {
        "maxprob": 1 - logp.max(dim=-1).values.exp(),
        "perplexity": -logp.gather(1, targets[:, None])[:, 0],
        "entropy": -(logp.exp() * logp).sum(dim=-1),
        "energy": -torch.logsumexp(z, dim=-1),
    }
    grid = torch.tensor(cfg.temperature_grid, device=z.device, dtype=z.dtype)
    centred = z - z.max(dim=-1, keepdim=True).values
    conf = torch.stack([1 / torch.exp(centred / t).sum(dim=-1) for t in grid], dim=1)
    hidden_LTD = torch.stack([h[0].float() for h in out.hidden_states])  # [L + 1, T, D]
    probe_layer = resolve_probe_layer(cfg.probe_layer, hidden_LTD.shape[0])
    keep = list(range(hidden_LTD.shape[0])) if hidden_layers is None else hidden_layers

    cols: dict[str, list[float]] = {
        k: [] for k in [*per_token, *(["coe_r", "coe_c"] if cfg.coe else [])]
    }
    probe_rows, conf_rows = [], []
    for first, last in spans:
        tok = slice(first - 1 - offset, last - offset)  # predictions of tokens first..last
        for k, v in per_token.items():
            cols[k].append(float(v[tok].mean()))
        chain = hidden_LTD[:, first : last + 1].mean(dim=1)  # [L + 1, D]
        probe_rows.append(chain[probe_layer].cpu().numpy())
        conf_rows.append(conf[tok].mean(dim=0).cpu().numpy())
        if cfg.coe:
            for k, v in zip(("coe_r", "coe_c"), coe_scores(chain), strict=True):
                cols[k].append(v)
    cols["perplexity"] = [math.exp(v) for v in cols["perplexity"]]
    pooled = torch.stack([pool_positions(hidden_LTD[layer], spans) for layer in keep], dim=2)
    latents = None
    if transcoders is not None:
        latents = pooled_latents(transcoders, captured, spans, offset + 1)
    return TraceScores(
        {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()},
        np.stack(probe_rows).astype(np.float32),
        np.stack(conf_rows),
        pooled.to(torch.float16).cpu().numpy(),
        latents,
    )


def pooled_latents(
    transcoders: TranscoderSet,
    mlp_in: dict[int, torch.Tensor],
    spans: list[tuple[int, int]],
    start: int,
) -> csr_matrix:
    """Each step's transcoder latents pooled over its tokens, one sparse row per step in
    `LatentLayout` order. `mlp_in[layer]` is that layer's MLP input [T, D]; positions
    before `start` (the prompt) are not encoded."""
    import torch

    layout = latent_layout(transcoders)
    rel = [(first - start, last - start) for first, last in spans]
    blocks = []  # per transcoder layer: [S, P, F]
    for layer in layout.layers:
        with torch.inference_mode():
            acts_TK, idx_TK = transcoders[layer].encode(mlp_in[layer][start:])
        dense_TF = torch.zeros(
            acts_TK.shape[0], layout.n_latents, dtype=torch.float32, device=acts_TK.device
        )
        dense_TF.scatter_(1, idx_TK.long(), acts_TK.float())
        blocks.append(pool_positions(dense_TF, rel))
    pooled_SPLF = torch.stack(blocks, dim=2).cpu().numpy()
    return csr_matrix(pooled_SPLF.reshape(len(spans), -1))


def latent_layout(transcoders: TranscoderSet) -> LatentLayout:
    """The column layout of a transcoder set's pooled latents."""
    first = transcoders[transcoders.layers[0]]
    return LatentLayout(tuple(transcoders.layers), int(first.n_latents))


def coe_scores(chain: torch.Tensor) -> tuple[float, float]:
    """(-CoE-R, -CoE-C) of a chain of embeddings [L + 1, D] (higher = more likely incorrect)."""
    import torch

    h = chain.double()
    step = h[1:] - h[:-1]
    mag = step.norm(dim=-1) / (h[-1] - h[0]).norm().clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(h[1:], h[:-1], dim=-1).clamp(-1, 1)
    total = torch.nn.functional.cosine_similarity(h[-1], h[0], dim=0).clamp(-1, 1)
    ang = torch.arccos(cos) / torch.arccos(total).clamp_min(1e-12)
    coe_r = mag.mean() - ang.mean()
    coe_c = torch.sqrt((mag * torch.cos(ang)).mean() ** 2 + (mag * torch.sin(ang)).mean() ** 2)
    return -float(coe_r), -float(coe_c)


def fit_temperature(
    conf: np.ndarray, correct: np.ndarray, grid: list[float]
) -> tuple[float, float]:
    """The grid temperature whose step confidences [S, G] best predict correctness (0/1):
    lowest mean binary cross-entropy. Returns (T*, its cross-entropy); (1.0, nan) without
    labelled steps."""
    if len(correct) == 0:
        return 1.0, float("nan")
    c = np.clip(conf, 1e-7, 1 - 1e-7)
    y = correct[:, None].astype(np.float64)
    bce = -(y * np.log(c) + (1 - y) * np.log(1 - c)).mean(axis=0)
    best = int(np.argmin(bce))
    return float(grid[best]), float(bce[best])


def temperature_scores(conf: np.ndarray, temperature: float, grid: list[float]) -> np.ndarray:
    """The `temperature` column from step confidences [S, G] on `grid` at T* = `temperature`."""
    return 1 - conf[:, list(grid).index(temperature)]


def load_baseline_table(path: str | Path) -> pd.DataFrame:
    """The baseline table: `KEY_COLUMNS` + one score column per baseline."""
    return pd.read_parquet(Path(path) / TABLE_FILE)


def load_probe_inputs(path: str | Path) -> np.ndarray:
    """Step-averaged hidden states [n_steps, D] at `probe_layer`, rows aligned with the table."""
    return np.load(Path(path) / HIDDEN_FILE, allow_pickle=False)


def load_baseline_meta(path: str | Path) -> dict:
    """Score columns, probe layers, latent layout and fitted temperature of a `baselines`
    artifact."""
    return read_json(Path(path) / META_FILE)


def load_hidden_states(path: str | Path) -> tuple[np.ndarray, list[int]] | None:
    """Pooled hidden states float16 [n_steps, len(POOLINGS), n_kept, D] and the kept
    hidden-state indices (0 = embeddings, l = after block l); None for an artifact
    without them."""
    from safetensors import safe_open

    file = Path(path) / HIDDEN_STATES_FILE
    if not file.is_file():
        return None
    with safe_open(str(file), "np") as f:
        layers = json.loads(f.metadata()["layers"])
        return f.get_tensor("hidden"), [int(x) for x in layers]


def save_latents(path: Path, latents: csr_matrix, layout: LatentLayout) -> None:
    """A CSR matrix of pooled latents as safetensors (data, indices, indptr; shape and
    layout as metadata)."""
    from safetensors.numpy import save_file

    tensors = {
        "data": latents.data.astype(np.float32),
        "indices": latents.indices.astype(np.int32),
        "indptr": latents.indptr.astype(np.int64),
    }
    meta = {"shape": json.dumps(list(latents.shape)), "layout": json.dumps(layout.to_json())}
    save_file(tensors, str(path), meta)


def read_latents(file: str | Path) -> tuple[csr_matrix, LatentLayout]:
    """What `save_latents` wrote."""
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        meta = f.metadata()
        shape = tuple(json.loads(meta["shape"]))
        parts = [f.get_tensor(k) for k in ("data", "indices", "indptr")]
    return csr_matrix(tuple(parts), shape=shape), LatentLayout.from_json(json.loads(meta["layout"]))


def load_latents(path: str | Path) -> tuple[csr_matrix, LatentLayout] | None:
    """Pooled transcoder latents [n_steps, layout.n_columns] and their layout; None when
    the artifact was computed without transcoders."""
    file = Path(path) / LATENTS_FILE
    return read_latents(file) if file.is_file() else None
