"""Batched greedy generation with left padding, a per-prompt token cap and stop patterns.

Why a loop of our own instead of `model.generate`: the subject models of crv are small, so the
per-step overhead of the generic generation machinery (logits processors, stopping criteria,
cache bookkeeping) costs more than the forward pass itself, and `generate` takes one
`max_new_tokens` for the whole batch. Reasoning traces vary a lot in length with the problem
size, and a runaway generation that never writes its answer would run to the largest cap in
the batch; so each prompt gets its own cap, prompts are batched by (cap, prompt length), and a
batch ends as soon as every sequence has hit eos or its cap.

A pretrained model does not stop after its answer: it goes on with a new `Q:` up to the cap.
Stop patterns (regexes, `re.MULTILINE`, over the decoded completion) end a sequence as soon
as one matches, keeping every token generated so far, so the text still decodes from the
ids (`traces.stop` ends a completion with its `Answer:` line). The stop ids (eos and, for chat
models, the generation config's other end tokens such as `<|im_end|>`) end it as well.

Left padding keeps the newest token of every sequence in the last column, so one forward
step serves the whole batch; position ids are counted over real tokens only, which makes a
padded sequence see exactly the positions it would see alone (tested: batched == unbatched).

`GreedyDecoder` decodes one sequence a token at a time and can cut it back, for generation
that stops at each line to check it (`crv.check.guard`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GenerationResult:
    """One prompt's greedy continuation."""

    prompt: str
    prompt_ids: list[int]
    """Prompt tokens as the model saw them, including bos (no padding)."""
    completion_ids: list[int]
    """Generated tokens, without the eos that ended them and without padding."""
    completion: str
    """`completion_ids` decoded (special tokens skipped)."""
    stopped_at_eos: bool
    """False when the token cap ended the generation (a stop id or pattern counts as eos)."""


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a generation: the tokenizer's eos and the generation config's
    eos ids (chat models end a turn with their own token, e.g. Qwen's `<|im_end|>`)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({i for i in ids if i is not None})


def pattern_stop(
    tokenizer: PreTrainedTokenizerBase, patterns: Sequence[str]
) -> Callable[[list[int]], bool] | None:
    """A test `generated ids -> stop now?` that is true once the decoded completion
    matches one of `patterns`; None for no patterns."""
    if not patterns:
        return None
    compiled = [re.compile(p, re.MULTILINE) for p in patterns]

    def stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return any(p.search(text) for p in compiled)

    return stop


def token_cap(tokenizer: PreTrainedTokenizerBase, reference: str, factor: float = 1.5) -> int:
    """New-token cap for a prompt whose expected completion is `reference`: factor x its
    tokens plus 16 of slack, so a runaway generation (no answer line) stops early."""
    return 16 + int(factor * len(tokenizer(reference, add_special_tokens=False)["input_ids"]))


def greedy_batches(
    prompt_lengths: Sequence[int], caps: Sequence[int], batch_size: int
) -> list[list[int]]:
    """The prompt indices `generate_greedy` decodes together: sorted by (cap, prompt
    length), cut every `batch_size`. Decoding one of these batches alone gives the same
    tokens as decoding it among the others (the traces stage shards them)."""
    order = sorted(range(len(caps)), key=lambda i: (caps[i], prompt_lengths[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int | Callable[[str], int],
    batch_size: int = 64,
    progress: bool | None = None,
    stop_patterns: Sequence[str] = (),
    add_special_tokens: bool = True,
    on_done: Callable[[int], object] | None = None,
) -> list[GenerationResult]:
    """Greedy-decode every prompt; results come back in the order of `prompts`.

    `max_new_tokens` is either one cap for all prompts or a function of the prompt text (for
    example one that grows with the problem's size). `progress=None` shows a bar, moving per
    finished prompt, for more than one prompt; `on_done(n)` is called as n more prompts
    finish (a caller's own bar over several calls). `add_special_tokens=False` for prompts
    that already hold them (a rendered chat template).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token")
    eos_ids = stop_ids(model, tokenizer)
    should_stop = pattern_stop(tokenizer, stop_patterns)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    caps = [max_new_tokens(p) if callable(max_new_tokens) else max_new_tokens for p in prompts]
    batches = greedy_batches([len(e) for e in encoded], caps, batch_size)
    if progress is None:
        progress = len(prompts) > 1
    device = next(model.parameters()).device
    results: list[GenerationResult | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)

    def finished(n: int) -> None:
        bar.update(n)
        if on_done is not None:
            on_done(n)

    try:
        with torch.inference_mode():
            for batch in batches:
                outs = generate_from_ids(
                    model,
                    [encoded[i] for i in batch],
                    [caps[i] for i in batch],
                    eos_ids,
                    pad_id,
                    device,
                    should_stop=should_stop,
                    on_done=finished,
                )
                for i, (ids, stopped) in zip(batch, outs, strict=True):
                    results[i] = GenerationResult(
                        prompt=prompts[i],
                        prompt_ids=list(encoded[i]),
                        completion_ids=ids,
                        completion=tokenizer.decode(ids, skip_special_tokens=True),
                        stopped_at_eos=stopped,
                    )
    finally:
        bar.close()
        model.train(was_training)
    return [r for r in results if r is not None]


def generate_from_ids(
    model: PreTrainedModel,
    prompts: list[list[int]],
    caps: list[int],
    eos_id: int | Sequence[int],
    pad_id: int,
    device: torch.device,
    should_stop: Callable[[list[int]], bool] | None = None,
    on_done: Callable[[int], object] | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy-decode token-id prompts as one left-padded batch with a KV cache.

    Returns, per prompt, the generated ids (up to its cap, without the eos id) and whether
    an eos id or `should_stop` (a test of the ids generated so far, which are all kept)
    ended it. `on_done(n)` is called as n more sequences finish. Used directly where a
    prompt is a token prefix that must not be re-tokenised (regenerating a trace from the
    middle of a step).
    """
    eos_set = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    cap = torch.tensor(caps, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # transformers 5 renamed the forward argument; the cache object is updated in place.
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    eos_t = torch.tensor(sorted(eos_set), device=device)
    generated: list[torch.Tensor] = []
    rows: list[list[int]] = [[] for _ in range(n)]
    done = cap <= 0
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    n_done = int(done.sum())
    if on_done is not None and n_done:
        on_done(n_done)
    step_ids = ids
    for step in range(max(caps)):
        if bool(done.all()):
            break
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
        next_ids = out.logits[:, -1, :].argmax(-1)
        next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        hit_eos = torch.isin(next_ids, eos_t) & ~done
        if should_stop is not None:
            for row, token in enumerate(next_ids.tolist()):
                if not done[row] and not hit_eos[row]:
                    rows[row].append(token)
                    if should_stop(rows[row]):
                        hit_eos[row] = True
        stopped |= hit_eos
        done = done | hit_eos | (cap <= step + 1)
        if on_done is not None and int(done.sum()) > n_done:
            on_done(int(done.sum()) - n_done)
            n_done = int(done.sum())
        generated.append(next_ids)
        step_ids = next_ids[:, None]
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    table = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(n)]
    results = []
    for row in range(n):
        toks = table[row][: caps[row]]
        ends = [i for i, t in enumerate(toks) if t in eos_set]
        if should_stop is not None and stopped[row]:
            ends.append(len(rows[row]))  # a stop pattern: every token up to it is kept
        results.append((toks[: min(ends)] if ends else toks, bool(stopped[row])))
    return results


class GreedyDecoder:
    """One sequence decoded greedily, token by token, with a KV cache that can be cut back.

    For decoding interleaved with other work that may rewrite the sequence from some
    position on (`crv.check.guard`). Each forward pass is the one `generate_from_ids` makes
    for a single prompt (attention mask, position ids, the last logits only), so a decoder
    that is never cut back yields `generate_from_ids`'s tokens exactly (tested). A hook that
    reads absolute positions from the cache (`crv.transcoders.splice`) sees the right ones.
    """

    def __init__(self, model: PreTrainedModel, ids: Sequence[int]) -> None:
        if not ids:
            raise ValueError("a decoder needs at least one token to start from")
        self.model = model
        self.device = next(model.parameters()).device
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        self.cache = DynamicCache()
        self.ids: list[int] = []
        self.logits_V = torch.empty(0)
        """Next-token logits after `ids`."""
        self.feed(ids)

    @torch.inference_mode()
    def feed(self, tokens: Sequence[int]) -> None:
        """Append `tokens`, running the model over them (under whatever hooks are on)."""
        start = len(self.ids)
        self.ids += [int(t) for t in tokens]
        end = len(self.ids)
        out = self.model(
            input_ids=torch.tensor([self.ids[start:]], device=self.device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
            position_ids=torch.arange(start, end, device=self.device)[None],
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: self.cache},
        )
        self.logits_V = out.logits[0, -1]

    def next_token(self) -> tuple[int, float]:
        """The greedy next token and the model's probability of it (not yet fed)."""
        token = int(self.logits_V.argmax())
        return token, self.probability(token)

    def probability(self, token: int) -> float:
        """The model's probability of `token` as the next one."""
        return float(torch.softmax(self.logits_V.double(), -1)[token])

    @torch.inference_mode()
    def truncate(self, n: int, recompute_from: int | None = None) -> None:
        """Keep the first `n` tokens; the model runs again over tokens `recompute_from`
        (default n - 1) .. n - 1, e.g. under an intervention that acts there."""
        start = n - 1 if recompute_from is None else recompute_from
        if not 0 <= start < n <= len(self.ids):
            raise ValueError(f"cannot cut {len(self.ids)} tokens to {n} recomputing from {start}")
        kept = self.ids[start:n]
        self.cache.crop(start - len(self.ids))  # negative: drop that many tokens
        self.ids = self.ids[:start]
        self.feed(kept)
