"""Splicing transcoders into the subject model, reading and editing their features.

Inside `splice(adapter, tset)` a forward hook on each selected layer's MLP replaces the
MLP output y by the transcoder's reconstruction y^ = W_dec^T f + b_dec of the MLP input.
With `add_error=True` the error term e = y - y^ (a constant for autograd) is added back:
the output value is y again, so the model's logits are the clean ones, while its gradient
flows through the transcoder's features - the replacement model of attribution graphs.

Interventions act on features: a `FeatureIntervention` sets feature f's activation a at
chosen positions to 0 ("zero"), a * value ("scale") or value ("clamp", which can also
switch on a feature TopK did not select). The MLP output then changes by exactly
(a_new - a_old) * W_dec[f] and nothing else; TopK is not re-run, so other features keep
their values. With the error added back, an edit is therefore a precise perturbation of
the clean model.

Positions are absolute: position p is the p-th token the model has seen in this sequence,
prompt and generated tokens alike, padding included (it is the index into the full
`input_ids`). During generation with a KV cache each forward pass only sees the new
tokens, so the offset of the first of them is read from the cache in a pre-hook on the
first decoder block: `cache.get_seq_length()` before block 0 writes into it is the number
of tokens already processed (the `cache` / `past_key_values` keyword transformers passes to
every block). Without a cache the offset is 0. RoPE `position_ids` are not used: under left
padding they are shifted per row.

Position 0 (BOS) keeps its clean MLP output by default (`keep_bos=True`): transcoders are
never trained on it (its activations are outliers), and attribution graphs leave it out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from crv.transcoders.module import TranscoderSet

Action = Literal["zero", "scale", "clamp"]


@dataclass(frozen=True)
class FeatureIntervention:
    """Set feature `feature` of layer `layer` at `positions` (None = every position) of the
    batch rows `rows` (None = every row: one batch can then run several interventions side
    by side, one per row).

    action "zero": a -> 0; "scale": a -> a * value; "clamp": a -> value.
    """

    layer: int
    feature: int
    positions: Sequence[int] | None = None
    action: Action = "zero"
    value: float = 0.0
    rows: Sequence[int] | None = None

    def new_acts(self, old_BT: torch.Tensor) -> torch.Tensor:
        if self.action == "zero":
            return torch.zeros_like(old_BT)
        if self.action == "scale":
            return old_BT * self.value
        if self.action == "clamp":
            return torch.full_like(old_BT, self.value)
        raise ValueError(f"unknown intervention action {self.action!r}")


@dataclass
class LayerRecord:
    """What one forward pass saw at one layer (detached, float32)."""

    positions_T: torch.Tensor
    """Absolute positions of the T tokens of this pass."""
    acts_BTK: torch.Tensor
    """The k kept activations per token, before interventions."""
    idx_BTK: torch.Tensor
    """Their feature indices."""
    error_BTD: torch.Tensor
    """MLP out minus the transcoder's reconstruction."""


class _PositionTracker:
    """Absolute position of the first token of the current forward pass (see module doc)."""

    def __init__(self, first_block: nn.Module) -> None:
        self.offset = 0
        self._handle = first_block.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.offset = int(cache.get_seq_length()) if cache is not None else 0

    def positions(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + n_tokens, device=device)

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class Splice:
    """Handle of installed splice hooks; `remove()` restores the model.

    `records[layer]` holds one `LayerRecord` per forward pass when recording.
    """

    layers: list[int]
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _intervention_delta(
    interventions: Sequence[FeatureIntervention],
    acts_BTK: torch.Tensor,
    idx_BTK: torch.Tensor,
    positions_T: torch.Tensor,
    W_dec_FD: torch.Tensor,
) -> torch.Tensor | None:
    """sum over interventions of (a_new - a_old) * W_dec[f] at their positions; [B, T, D]."""
    delta_BTD = None
    for iv in interventions:
        old_BT = (acts_BTK * (idx_BTK == iv.feature)).sum(-1)
        change_BT = iv.new_acts(old_BT) - old_BT
        if iv.positions is not None:
            wanted = torch.as_tensor(list(iv.positions), device=positions_T.device)
            change_BT = change_BT * torch.isin(positions_T, wanted)
        if iv.rows is not None:
            in_rows_B = torch.zeros(change_BT.shape[0], dtype=torch.bool, device=change_BT.device)
            in_rows_B[list(iv.rows)] = True
            change_BT = change_BT * in_rows_B[:, None]
        term_BTD = change_BT.unsqueeze(-1) * W_dec_FD[iv.feature]
        delta_BTD = term_BTD if delta_BTD is None else delta_BTD + term_BTD
    return delta_BTD


def add_splice(
    adapter: Any,
    tset: TranscoderSet,
    layers: Sequence[int] | None = None,
    add_error: bool = False,
    interventions: Sequence[FeatureIntervention] = (),
    record: bool = False,
    keep_bos: bool = True,
) -> Splice:
    """Install splice hooks (plain-function form of `splice`); call `.remove()` to undo.

    `adapter` is a `crv.models.adapter.ArchAdapter`; `layers` defaults to every layer of
    `tset`. See the module docstring for `add_error`, interventions, positions and BOS.
    """
    tset.check_compatible(adapter)
    layers = list(tset.layers if layers is None else layers)
    missing = [layer for layer in layers if layer not in tset.transcoders]
    if missing:
        raise ValueError(f"no transcoder for layers {missing} (the set has {tset.layers})")
    unknown = [iv.layer for iv in interventions if iv.layer not in layers]
    if unknown:
        raise ValueError(f"interventions on layers {unknown} that are not spliced ({layers})")
    tracker = _PositionTracker(adapter.layers[0])
    handle = Splice(layers, records={layer: [] for layer in layers} if record else {})
    handle._handles.append(tracker)
    for layer in layers:
        ivs = [iv for iv in interventions if iv.layer == layer]
        hook = _splice_hook(
            tset[layer], tracker, ivs, add_error, keep_bos, handle.records.get(layer)
        )
        handle._handles.append(adapter.mlp(layer).register_forward_hook(hook))
    return handle


def _splice_hook(
    tc: nn.Module,
    tracker: _PositionTracker,
    interventions: list[FeatureIntervention],
    add_error: bool,
    keep_bos: bool,
    records: list[LayerRecord] | None,
) -> Any:
    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], y_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = inputs[0]
        positions_T = tracker.positions(x_BTD.shape[1], x_BTD.device)
        with torch.autocast(device_type=x_BTD.device.type, enabled=False):
            acts_BTK, idx_BTK = tc.encode(x_BTD)
            recon_BTD = tc.reconstruct(x_BTD, acts_BTK, idx_BTK)
            error_BTD = (y_BTD.float() - recon_BTD).detach()
            out_BTD = recon_BTD
            if add_error:
                out_BTD = out_BTD + error_BTD
            elif keep_bos and tracker.offset == 0:
                out_BTD = torch.cat([y_BTD[:, :1].float(), out_BTD[:, 1:]], dim=1)
            delta_BTD = _intervention_delta(interventions, acts_BTK, idx_BTK, positions_T, tc.W_dec)
            if delta_BTD is not None:
                out_BTD = out_BTD + delta_BTD
        if records is not None:
            records.append(LayerRecord(positions_T, acts_BTK.detach(), idx_BTK, error_BTD))
        return out_BTD.to(y_BTD.dtype)

    return hook


@contextlib.contextmanager
def splice(
    adapter: Any,
    tset: TranscoderSet,
    layers: Sequence[int] | None = None,
    add_error: bool = False,
    interventions: Sequence[FeatureIntervention] = (),
    record: bool = False,
    keep_bos: bool = True,
) -> Iterator[Splice]:
    """Context manager form of `add_splice`: the model is restored on exit."""
    handle = add_splice(adapter, tset, layers, add_error, interventions, record, keep_bos)
    try:
        yield handle
    finally:
        handle.remove()


@contextlib.contextmanager
def zero_ablate(adapter: Any, layers: Sequence[int], keep_bos: bool = True) -> Iterator[None]:
    """Replace the MLP outputs of `layers` by zeros (position 0 kept clean if `keep_bos`)."""
    tracker = _PositionTracker(adapter.layers[0])

    def hook(_: nn.Module, __: tuple[torch.Tensor, ...], y_BTD: torch.Tensor) -> torch.Tensor:
        out_BTD = torch.zeros_like(y_BTD)
        if keep_bos and tracker.offset == 0:
            out_BTD[:, 0] = y_BTD[:, 0]
        return out_BTD

    handles = [adapter.mlp(layer).register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        tracker.remove()
