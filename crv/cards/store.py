"""Feature cards, the `cards` stage's artifact: saving, loading and reading them (the stage
itself, which computes them, is `crv/cards/stage.py`).

crv names features by number (`L3/F1630`), which tells a person nothing. A feature card
says when the feature fires and what it does to the output:

- `frequency`: the share of tokens (of the configured traces, BOS left out) on which the
  feature is active (in its layer's top k with a non-zero activation);
- `top_contexts`: its `n_contexts` strongest activations, each with the activating token
  and the text around it, found in one streaming pass over the traces with a per-feature
  top-n (`StreamingTopK`), so memory stays at features x n whatever the corpus size;
- `promotes` / `suppresses`: the output tokens its decoder direction raises and lowers
  most, `W_dec[f] @ W_U.T` through the architecture adapter's unembedding. This is the
  direct path only and ignores the final norm's scale (and any logit soft-capping): it
  ranks tokens as the unembedding reads the direction, not by the exact logit change.

`label(layer, feature)` condenses a card to a few words (`on "7" 6/8 → "8"`: the most
common activating token among the top contexts, with its share when not all, and the most
promoted token), used in report.md, crv-verify's `top_features` and exports.

Artifact: `cards.safetensors` (per layer `count`, `top_value`, `top_row`, `top_pos`,
`top_window` [F, n, W] token ids with -1 padding, `promote_id`, `promote_value`,
`suppress_id`, `suppress_value`) and `cards.json` (layers, token count, window shape, the
token strings of every id used, the trace ids of the rows, the config). Public loader:
`load_feature_cards(dir) -> FeatureCards`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from crv.cards.config import CardsConfig
from crv.io import atomic_write, atomic_write_json, read_json

TENSOR_FILE = "cards.safetensors"


META_FILE = "cards.json"


FORMAT = "crv-feature-cards/1"


@dataclasses.dataclass
class CardArrays:
    """The cards of one layer as arrays over its F features."""

    count: np.ndarray  # int64 [F]: tokens on which the feature was active
    top_value: np.ndarray  # float32 [F, n]: activations, best first (-inf: empty slot)
    top_row: np.ndarray  # int32 [F, n]: trace row of each context (-1: empty)
    top_pos: np.ndarray  # int32 [F, n]: token position in that trace
    top_window: np.ndarray  # int [F, n, W]: token ids around it (-1: outside the trace)
    promote_id: np.ndarray  # int [F, m] (token ids: int16 for vocabularies that fit, else int32)
    promote_value: np.ndarray  # float32 [F, m]
    suppress_id: np.ndarray  # int [F, m]
    suppress_value: np.ndarray  # float32 [F, m]


def save_cards(
    out: str | Path,
    cards: dict[int, CardArrays],
    n_tokens: int,
    tokenizer: Any,
    trace_ids: Sequence[str],
    cfg: CardsConfig,
) -> None:
    """Write `cards.safetensors` and `cards.json` (written last) into `out`."""
    out = Path(out)
    tensors = {
        f"{name}.{layer}": np.ascontiguousarray(getattr(arr, name))
        for layer, arr in cards.items()
        for name in (f.name for f in dataclasses.fields(CardArrays))
    }
    used = set()
    for arr in cards.values():
        for ids in (arr.top_window, arr.promote_id, arr.suppress_id):
            used.update(np.unique(ids[ids >= 0]).tolist())
    strings = {str(i): tokenizer.decode([i]) for i in sorted(used)}
    atomic_write(out / TENSOR_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write_json(
        out / META_FILE,
        {
            "format": FORMAT,
            "layers": sorted(cards),
            "n_latents": {str(layer): len(arr.count) for layer, arr in cards.items()},
            "n_tokens": n_tokens,
            "context_before": cfg.context_before,
            "context_after": cfg.context_after,
            "token_strings": strings,
            "trace_ids": list(trace_ids),
            "config": dataclasses.asdict(cfg),
        },
    )


def _quote(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


class FeatureCards:
    """The feature cards of a `cards` artifact (see the module docstring)."""

    def __init__(self, meta: dict[str, Any], cards: dict[int, CardArrays]) -> None:
        self.meta, self._cards = meta, cards
        self.layers: list[int] = sorted(cards)
        self.n_tokens = int(meta["n_tokens"])
        self._strings = {int(k): v for k, v in meta["token_strings"].items()}
        self._before = int(meta["context_before"])
        self._trace_ids: list[str] = list(meta["trace_ids"])

    def _arrays(self, layer: int, feature: int) -> CardArrays:
        arr = self._cards.get(layer)
        if arr is None:
            raise KeyError(f"no feature cards for layer {layer}; layers: {self.layers}")
        if not 0 <= feature < len(arr.count):
            raise KeyError(f"feature {feature} out of range for layer {layer} ({len(arr.count)})")
        return arr

    def token(self, token_id: int) -> str:
        return self._strings.get(int(token_id), f"<{int(token_id)}>")

    def frequency(self, layer: int, feature: int) -> float:
        """Share of the read tokens on which the feature was active."""
        return float(self._arrays(layer, feature).count[feature]) / max(self.n_tokens, 1)

    def top_contexts(self, layer: int, feature: int) -> list[dict[str, Any]]:
        """Strongest activations first: text around the token, the token, its activation,
        where the token starts in the text, and the trace and position it came from."""
        arr = self._arrays(layer, feature)
        out = []
        for slot in np.flatnonzero(np.isfinite(arr.top_value[feature])):
            window = arr.top_window[feature, slot]
            left = "".join(self.token(i) for i in window[: self._before] if i >= 0)
            tok = self.token(window[self._before])
            right = "".join(self.token(i) for i in window[self._before + 1 :] if i >= 0)
            out.append(
                {
                    "text": left + tok + right,
                    "token": tok,
                    "token_start": len(left),
                    "activation": float(arr.top_value[feature, slot]),
                    "trace_id": self._trace_ids[int(arr.top_row[feature, slot])],
                    "position": int(arr.top_pos[feature, slot]),
                }
            )
        return out

    def top_tokens(self, layer: int, feature: int) -> list[str]:
        """The activating token of each top context, strongest first."""
        arr = self._arrays(layer, feature)
        valid = np.isfinite(arr.top_value[feature])
        return [self.token(i) for i in arr.top_window[feature, valid, self._before]]

    def _logit_list(self, ids: np.ndarray, values: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"token": self.token(i), "value": float(v)} for i, v in zip(ids, values, strict=True)
        ]

    def card(self, layer: int, feature: int) -> dict[str, Any]:
        """`frequency`, `top_contexts`, `promotes`, `suppresses` and the `label`."""
        arr = self._arrays(layer, feature)
        return {
            "layer": layer,
            "feature": feature,
            "label": self.label(layer, feature),
            "frequency": self.frequency(layer, feature),
            "top_contexts": self.top_contexts(layer, feature),
            "promotes": self._logit_list(arr.promote_id[feature], arr.promote_value[feature]),
            "suppresses": self._logit_list(arr.suppress_id[feature], arr.suppress_value[feature]),
        }

    def label(self, layer: int, feature: int) -> str:
        """A few words: `on "7" 6/8 → "8"` (most common activating token of the top
        contexts, its share when not all, the most promoted token); `never active → "8"`
        for a feature with no context."""
        arr = self._arrays(layer, feature)
        promoted = f" → {_quote(self.token(arr.promote_id[feature, 0]))}"
        tokens = self.top_tokens(layer, feature)
        if not tokens:
            return "never active" + promoted
        (common, n), *_ = Counter(tokens).most_common(1)
        share = "" if n == len(tokens) else f" {n}/{len(tokens)}"
        return f"on {_quote(common)}{share}{promoted}"


def load_feature_cards(path: str | Path) -> FeatureCards:
    """The feature cards of a `cards` artifact (or a bundle's copy of one)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"no feature cards at {path}: {META_FILE} is missing")
    meta = read_json(meta_file)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(path / TENSOR_FILE))
    names = [f.name for f in dataclasses.fields(CardArrays)]
    cards = {}
    for layer in meta["layers"]:
        missing = [n for n in names if f"{n}.{layer}" not in tensors]
        if missing:
            raise ValueError(f"{path / TENSOR_FILE}: layer {layer} lacks {missing}")
        cards[int(layer)] = CardArrays(**{n: tensors[f"{n}.{layer}"] for n in names})
    return FeatureCards(meta, cards)


def copy_cards(src: str | Path, dest: str | Path) -> None:
    """Copy the card files of a `cards` artifact into `dest` (created), e.g. a bundle."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (TENSOR_FILE, META_FILE):
        atomic_write(dest / name, lambda p, name=name: shutil.copyfile(Path(src) / name, p))
