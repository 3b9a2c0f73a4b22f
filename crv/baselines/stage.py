"""Baseline step scores from the subject model's own forward pass (the `baselines` stage).

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

The probes (logistic regression and MLP, fit in the `verifier` stage) read the step's
hidden state at `probe_layer` averaged over the step's tokens; those averages are stored in
`hidden.npy` (float32, row i = row i of the table, saved without pickle).

Each trace's scores go to a file of the scratch directory first (`crv.executor`: in this
process, or sharded over Ray workers), so a killed run resumes with the traces it has not
scored; the temperature is fitted once all are there.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from crv.baselines.config import BaselinesConfig
from crv.features.stage import KEY_COLUMNS, step_key_table
from crv.io import atomic_write, atomic_write_json, read_json
from crv.pipeline import StageContext

SCORE_COLUMNS = ("maxprob", "perplexity", "entropy", "temperature", "energy", "coe_r", "coe_c")
"""Score columns of the baseline table (CoE ones only when `coe` is on)."""

TABLE_FILE = "baselines.parquet"
HIDDEN_FILE = "hidden.npy"
META_FILE = "baselines.json"

if TYPE_CHECKING:  # torch is imported where it is used: the loaders below do not need it
    import torch


def resolve_probe_layer(probe_layer: int | None, n_hidden: int) -> int:
    """Index into the L + 1 hidden-state outputs; None = the middle block L // 2."""
    n_layers = n_hidden - 1
    layer = n_layers // 2 if probe_layer is None else probe_layer
    if not -n_hidden <= layer < n_hidden:
        raise ValueError(f"probe_layer {probe_layer} out of range for {n_layers} layers")
    return layer % n_hidden


def trace_step_scores(
    model: torch.nn.Module,
    input_ids: list[int],
    spans: list[tuple[int, int]],
    cfg: BaselinesConfig,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Scores of the steps of one trace from one forward pass.

    `spans` holds each step's first and last token index (inclusive; first >= 1).
    Returns (score columns except `temperature`, each [S]; probe inputs [S, D];
    step confidence at each grid temperature [S, G])."""
    import torch

    ids = torch.tensor([input_ids], device=device)
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
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
    hidden = torch.stack([h[0].float() for h in out.hidden_states])  # [L + 1, T, D]
    probe_layer = resolve_probe_layer(cfg.probe_layer, hidden.shape[0])

    cols: dict[str, list[float]] = {
        k: [] for k in [*per_token, *(["coe_r", "coe_c"] if cfg.coe else [])]
    }
    probe_rows, conf_rows = [], []
    for first, last in spans:
        tok = slice(first - 1 - offset, last - offset)  # predictions of tokens first..last
        for k, v in per_token.items():
            cols[k].append(float(v[tok].mean()))
        chain = hidden[:, first : last + 1].mean(dim=1)  # [L + 1, D]
        probe_rows.append(chain[probe_layer].cpu().numpy())
        conf_rows.append(conf[tok].mean(dim=0).cpu().numpy())
        if cfg.coe:
            for k, v in zip(("coe_r", "coe_c"), coe_scores(chain), strict=True):
                cols[k].append(v)
    cols["perplexity"] = [math.exp(v) for v in cols["perplexity"]]
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    return scores, np.stack(probe_rows).astype(np.float32), np.stack(conf_rows)


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


TraceScores = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]
"""One trace's `trace_step_scores`: (score columns, probe inputs [S, D], confidences [S, G])."""


def step_spans(traces) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """The steps of each trace (its rows of the step key table, by trace id) and, for each
    trace with steps, in order, `{id, input_ids, spans}`: what `trace_step_scores` reads."""
    keys = step_key_table(traces)
    by_trace = dict(tuple(keys.groupby("trace_id", sort=False)))
    items = []
    for tr in traces.select_columns(["id", "input_ids"]):
        steps = by_trace.get(tr["id"])
        if steps is None:
            continue
        prev, last = steps["prev_last_token"].tolist(), steps["last_token"].tolist()
        spans = [(min(p + 1, t), t) for p, t in zip(prev, last, strict=True)]
        items.append({"id": tr["id"], "input_ids": tr["input_ids"], "spans": spans})
    return by_trace, items


def baseline_table(
    model: torch.nn.Module, traces, cfg: BaselinesConfig, device: str = "cpu"
) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Scores of every step of every trace: (table of `KEY_COLUMNS` + score columns, probe
    inputs [n_steps, D] aligned with the table, metadata incl. the fitted temperature)."""
    by_trace, items = step_spans(traces)
    scores = [trace_step_scores(model, it["input_ids"], it["spans"], cfg, device) for it in items]
    n_hidden = model.config.num_hidden_layers + 1
    return merge_scores([by_trace[it["id"]] for it in items], scores, cfg, n_hidden)


def merge_scores(
    steps: list[pd.DataFrame], scores: list[TraceScores], cfg: BaselinesConfig, n_hidden: int
) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """`baseline_table`'s result from each trace's steps and scores, in trace order: the
    temperature is fitted on all of them."""
    parts = [
        s[list(KEY_COLUMNS)].assign(**cols) for s, (cols, _, _) in zip(steps, scores, strict=True)
    ]
    table = pd.concat(parts, ignore_index=True)
    conf = np.concatenate([c for _, _, c in scores])
    train = ((table["split"] == "train") & (table["label"] >= 0)).to_numpy()
    correct = 1 - table["label"].to_numpy()[train]
    t_star, bce = fit_temperature(conf[train], correct, cfg.temperature_grid)
    best = cfg.temperature_grid.index(t_star)
    table.insert(table.columns.get_loc("energy"), "temperature", 1 - conf[:, best])
    meta = {
        "score_columns": [c for c in SCORE_COLUMNS if c in table.columns],
        "probe_layer": resolve_probe_layer(cfg.probe_layer, n_hidden),
        "temperature": t_star,
        "temperature_bce": bce,
    }
    return table, np.concatenate([p for _, p, _ in scores]), meta


def score_traces(
    subject_dir: Path, device: str, cfg: BaselinesConfig, items: list[tuple[dict, Path]]
) -> None:
    """Load the subject once, then write each trace's `trace_step_scores` to its file
    (safetensors: `score.<column>`, `probe`, `conf`; the model's hidden-state count as
    metadata): the work of one executor shard."""
    from safetensors.numpy import save_file

    from crv.models.loading import load_subject

    model, _ = load_subject(subject_dir, device)
    n_hidden = str(model.config.num_hidden_layers + 1)
    for item, file in items:
        cols, probe, conf = trace_step_scores(model, item["input_ids"], item["spans"], cfg, device)
        tensors = {f"score.{k}": v for k, v in cols.items()} | {"probe": probe, "conf": conf}
        atomic_write(file, lambda p, t=tensors: save_file(t, str(p), {"n_hidden": n_hidden}))


def read_scores(file: Path) -> tuple[TraceScores, int]:
    """A trace's scores as `score_traces` wrote them, and the model's hidden-state count."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(file)
    with safe_open(str(file), "np") as f:
        n_hidden = int(f.metadata()["n_hidden"])
    cols = {k.removeprefix("score."): v for k, v in tensors.items() if k.startswith("score.")}
    order = [c for c in SCORE_COLUMNS if c in cols]  # the column order trace_step_scores gives
    return ({c: cols[c] for c in order}, tensors["probe"], tensors["conf"]), n_hidden


def run_stage(ctx: StageContext[BaselinesConfig]) -> dict[str, Any]:
    """`baselines` stage: one row of baseline scores (+ probe inputs) per step. Traces are
    scored by `crv.executor` (in this process or sharded over Ray workers), one file per
    trace in the scratch directory, then merged in trace order."""
    from urllib.parse import quote

    from crv.executor import run_sharded
    from crv.traces.stage import load_traces

    t0 = time.perf_counter()
    by_trace, items = step_spans(load_traces(ctx.inputs["traces"]))
    files = [ctx.scratch / "scores" / f"{quote(it['id'], safe='')}.safetensors" for it in items]
    work = partial(score_traces, ctx.inputs["subject"], ctx.device, ctx.cfg)
    n_resumed = run_sharded(items, files, work, ctx.runtime, ctx.device)
    read = [read_scores(f) for f in files]
    table, hidden, meta = merge_scores(
        [by_trace[it["id"]] for it in items], [r for r, _ in read], ctx.cfg, read[0][1]
    )
    atomic_write(ctx.out / TABLE_FILE, lambda p: table.to_parquet(p, index=False))
    atomic_write(ctx.out / HIDDEN_FILE, lambda p: _save_npy(p, hidden))
    atomic_write_json(ctx.out / META_FILE, meta)
    ctx.log.info(
        "baselines: %d steps, T* = %.3g, %.1f s",
        len(table),
        meta["temperature"],
        time.perf_counter() - t0,
    )
    return {
        "n_steps": len(table),
        "hidden_dim": int(hidden.shape[1]),
        "n_resumed_traces": n_resumed,
        **meta,
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_baseline_table(path: str | Path) -> pd.DataFrame:
    """The baseline table: `KEY_COLUMNS` + one score column per baseline."""
    return pd.read_parquet(Path(path) / TABLE_FILE)


def load_probe_inputs(path: str | Path) -> np.ndarray:
    """Step-averaged hidden states [n_steps, D] for the probes, rows aligned with the table."""
    return np.load(Path(path) / HIDDEN_FILE, allow_pickle=False)


def load_baseline_meta(path: str | Path) -> dict:
    """Score columns, probe layer and fitted temperature of a `baselines` artifact."""
    return read_json(Path(path) / META_FILE)
