"""crv-tiny: the embedded default subject model, trained here from scratch on a CPU.

Why a model of our own: attribution costs roughly one backward pass per graph row, so a
benchmark of thousands of step graphs on a CPU needs a subject of about a million parameters.
Pretrained models that small do not exist offline, so crv ships one: a
4-layer Llama trained only on *correct* canonical traces of the two synthetic tasks. It learns
the format well but neither the arithmetic nor the copying of long expressions perfectly, so its
greedy traces contain incorrect steps at a rate that grows with the problem size - exactly what
the verifier needs to learn from (`crv_tiny_eval.json` beside the weights has the measured rates).

Choices that make it learn fast enough on two CPU cores:
- a 33-token vocabulary of the pieces the tasks use (digits are single tokens), so a trace is
  short and every token carries signal; `<pad>` is id 0 and `<bos>` is not (circuit-tracer
  silently skips a bos of id 0);
- loss only on completion tokens (the prompt is random and unpredictable);
- every batch holds one task and one complexity (no padding waste), sized to a token budget;
- a curriculum from small problems, and a high peak learning rate with warmup and cosine decay;
- the boolean task gets 30% of the batches: it is learned much faster than
  arithmetic, and a subject that never errs on a task gives the verifier nothing to learn.

The shipped checkpoint was trained in three stages (`RECIPE`: 8M tokens from scratch with a
curriculum, then 8M and 8M more at lower learning rates on fresh problems; the first stage
alone still miscopied most expressions). `train_recipe` reproduces it (the `subject` stage
with `subject.retrain=true`, or `python -m crv.models.tiny --recipe --out DIR`); evaluate a
checkpoint with `python -m crv.models.tiny --eval data/crv-tiny`. Bit-exact reproduction
needs the same torch thread counts (`threads`).

crv-tiny-bugs (`data/crv-tiny-bugs`, model card there) is trained like crv-tiny, all three
stages (24M tokens, one thread), on traces in which the planted rules of `crv.tasks.bugs` are
applied from the first token (`planted=True` in every stage), so that it never learns a true
rule that a planted one must later override and is as sure of the rules as of the rest;
`--eval-rules DIR` measures how a model treats the rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from crv.generation import generate_greedy, token_cap
from crv.io import atomic_write_json
from crv.options import field_docs

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Ids 0..3, in this order: pad first so that bos is never id 0."""
PIECES = ("Q: Evaluate ", "Step ", ", so ", "Answer: ", "True", "False", " and ", " or ", "not ")
"""Multi-character pieces of the canonical format; they win over single characters."""
CHARACTERS = tuple("0123456789+-*()=: \n,")
"""Single-character tokens; anything else encodes as `<unk>`."""
TASKS = ("arithmetic", "boolean")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The crv-tiny tokenizer: word-level over `PIECES` and `CHARACTERS`, bos prepended.

    Decoding concatenates the pieces, so `decode(encode(text))` reproduces any text made of
    the vocabulary exactly.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + PIECES + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join(re.escape(p) for p in PIECES) + r"|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


@dataclass
class TinyConfig:
    """How crv-tiny is built and trained; the defaults are stage 1 of the shipped checkpoint."""

    layers: int = 4
    """Decoder layers."""
    hidden: int = 128
    """Residual stream width (d_model)."""
    heads: int = 4
    """Attention heads (head dim = hidden / heads)."""
    intermediate: int = 512
    """MLP width."""
    context: int = 1024
    """Maximum sequence length (max_position_embeddings)."""
    tokens: int = 8_000_000
    """Training budget in (non-padding) tokens; the schedules are fractions of it."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    warmup: float = 0.02
    """Fraction of the budget spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of the peak (cosine decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_tokens: int = 3072
    """Tokens per batch (approximate); the batch size in sequences follows the trace length."""
    curriculum: float = 0.3
    """Fraction of the budget over which the largest trained complexity grows to the maximum."""
    max_complexity: int = 10
    """Largest complexity (operators) trained on; complexities are drawn uniformly up to it."""
    boolean_share: float = 0.3
    """Fraction of batches drawn from the boolean task (the rest is arithmetic)."""
    seed: int = 0
    """Seed of the weights, the batch order and the training problems."""
    threads: int = 1
    """torch CPU threads (results depend on it in the last bits)."""
    checkpoint_every: int = 1_000_000
    """Save the model every this many tokens, so a stopped run still leaves a model."""
    init: str = ""
    """Model directory whose weights start the training (empty: random init from `seed`)."""
    planted: bool = False
    """Train on traces with crv.tasks.bugs's planted rules applied (crv-tiny-bugs)."""
    rule_share: float = 0.0
    """With `planted`: at least this share of each batch's problems exercise a rule (drawn
    from 8x as many problems), so the rules are seen more often than their natural share."""


def build_model(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama of the configured shape."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).float()


def encode_trace(
    tokenizer: PreTrainedTokenizerFast, prompt: str, completion: str
) -> tuple[list[int], int]:
    """`<bos> prompt completion <eos>` as ids, and the number of prompt ids (incl. bos)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _training_solution(cfg: TinyConfig) -> Callable[[Any], str]:
    """The completion a training problem is written with: correct, or with the planted rules."""
    if cfg.planted:
        from crv.tasks.bugs import buggy_solution

        return buggy_solution
    return lambda problem: problem.solution()


class _Batches:
    """Deterministic stream of training batches: one task and one complexity per batch."""

    def __init__(self, cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> None:
        from crv.tasks import generate_problems

        self.cfg, self.tokenizer, self.generate = cfg, tokenizer, generate_problems
        self.solution = _training_solution(cfg)
        self.rng = random.Random(f"crv-tiny-batches-{cfg.seed}")
        self.mean_len = {}
        for task in TASKS:
            for n in range(1, cfg.max_complexity + 1):
                probe = generate_problems(task, n, 16, seed=-1 - cfg.seed)
                lens = [len(encode_trace(tokenizer, p.prompt, self.solution(p))[0]) for p in probe]
                self.mean_len[task, n] = sum(lens) / len(lens)
        self.count = 0

    def max_complexity(self, progress: float) -> int:
        """Largest complexity allowed at this fraction of the budget."""
        if self.cfg.curriculum <= 0:
            return self.cfg.max_complexity
        ramp = min(1.0, progress / self.cfg.curriculum)
        return max(
            1, min(self.cfg.max_complexity, 1 + math.ceil(ramp * (self.cfg.max_complexity - 1)))
        )

    def next(self, progress: float) -> tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(task, complexity, input_ids, attention_mask, labels) of the next batch."""
        task = "boolean" if self.rng.random() < self.cfg.boolean_share else "arithmetic"
        n = self.rng.randint(1, self.max_complexity(progress))
        size = max(1, round(self.cfg.batch_tokens / self.mean_len[task, n]))
        seed = self.cfg.seed * 1_000_003 + self.count
        self.count += 1
        if self.cfg.planted and self.cfg.rule_share > 0:
            problems = self._rule_rich(task, n, size, seed)
        else:
            problems = self.generate(task, n, size, seed=seed)
        encoded = [encode_trace(self.tokenizer, p.prompt, self.solution(p)) for p in problems]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (ids, n_prompt) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        return task, n, input_ids, mask, labels

    def _rule_rich(self, task: str, n: int, size: int, seed: int) -> list[Any]:
        """`size` problems, `rule_share` of them (as far as 4x as many draws hold them)
        exercising a planted rule, the rest drawn as usual."""
        from crv.tasks.bugs import planted_rules

        pool = self.generate(task, n, 8 * size, seed=seed)
        with_rule = [p for p in pool if any(planted_rules(p))]
        take = with_rule[: round(self.cfg.rule_share * size)]
        rest = [p for p in pool if not any(planted_rules(p))]
        return take + rest[: size - len(take)]


def _lr_factor(cfg: TinyConfig, progress: float) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`."""
    if progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    t = min(1.0, (progress - cfg.warmup) / max(1e-9, 1.0 - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def save_model_dir(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path, info: dict[str, Any]
) -> None:
    """Write an HF model dir into a temporary sibling, then swap it into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "crv_tiny.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def train_tiny(cfg: TinyConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train crv-tiny from scratch on correct canonical traces and save it to `out_dir`.

    Deterministic given `cfg` (seed and thread count). Returns training statistics, which are
    also saved as `crv_tiny.json` beside the weights.
    """
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer()
    if cfg.init:
        model = LlamaForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
    else:
        model = build_model(cfg, tokenizer)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    batches = _Batches(cfg, tokenizer)
    seen, trained, step, next_ckpt = 0, 0, 0, cfg.checkpoint_every
    ema: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(
        total=cfg.tokens,
        unit="tok",
        unit_scale=True,
        desc="crv-tiny",
        mininterval=5.0,
        disable=not progress,
    )

    def info(finished: bool) -> dict[str, Any]:
        seconds = time.perf_counter() - start
        return {
            "config": asdict(cfg),
            "finished": finished,
            "steps": step,
            "tokens": seen,
            "loss_tokens": trained,
            "seconds": round(seconds, 1),
            "tokens_per_second": round(seen / max(seconds, 1e-9), 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss_ema": {k: round(v, 4) for k, v in ema.items()},
        }

    while seen < cfg.tokens:
        frac = seen / cfg.tokens
        task, _, input_ids, mask, labels = batches.next(frac)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(cfg, frac)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        n_tokens = int(mask.sum())
        seen += n_tokens
        trained += int((labels != -100).sum())
        ema[task] = loss.item() if task not in ema else 0.98 * ema[task] + 0.02 * loss.item()
        bar.update(n_tokens)
        bar.set_postfix(
            {f"loss_{k[:4]}": f"{v:.3f}" for k, v in sorted(ema.items())}
            | {
                "tok/s": f"{seen / (time.perf_counter() - start):.0f}",
                "nmax": batches.max_complexity(frac),
            }
        )
        if seen >= next_ckpt and seen < cfg.tokens:
            save_model_dir(model, tokenizer, Path(out_dir), info(False))
            next_ckpt += cfg.checkpoint_every
    bar.close()
    stats = info(True)
    save_model_dir(model, tokenizer, Path(out_dir), stats)
    return stats


RECIPE: tuple[dict[str, Any], ...] = (
    {},
    {"seed": 1, "tokens": 8_000_000, "lr": 2e-3, "warmup": 0.05, "curriculum": 0.0, "threads": 2},
    {"seed": 2, "tokens": 8_000_000, "lr": 1.5e-3, "warmup": 0.05, "curriculum": 0.0, "threads": 2},
)
"""Stages of the shipped checkpoint: TinyConfig overrides, each continuing the previous stage."""

RECIPES: dict[str, tuple[dict[str, Any], ...]] = {
    "crv-tiny": RECIPE,
    "crv-tiny-bugs": (
        {**RECIPE[0], "planted": True},
        {**RECIPE[1], "threads": 1, "planted": True},
        {**RECIPE[2], "threads": 1, "planted": True},
    ),
}
"""Every shipped model's recipe, by subject name."""


def train_recipe(
    out_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    name: str = "crv-tiny",
    first_stage: int = 1,
    init: str = "",
) -> list[dict[str, Any]]:
    """Train the stages of `RECIPES[name]` into `out_dir` (stage seeds += `seed`).

    `first_stage > 1` resumes the recipe: `init` is then the model the earlier stages made
    (to go on from a stage's checkpoint).
    """
    if name not in RECIPES:
        raise ValueError(f"no recipe for {name!r}; expected one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if not 1 <= first_stage <= len(recipe) or (first_stage > 1) != bool(init):
        raise ValueError(
            f"first_stage={first_stage} of {len(recipe)} needs init exactly when it is > 1"
        )
    stats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="crv-tiny-") as tmp:
        previous = init
        for i in range(first_stage - 1, len(recipe)):
            last = i == len(recipe) - 1
            target = Path(out_dir) if last else Path(tmp) / f"stage{i + 1}"
            cfg = dataclasses.replace(TinyConfig(), **recipe[i], init=previous)
            cfg.seed += seed
            stats.append(train_tiny(cfg, target, progress=progress))
            previous = str(target)
    return stats


def completion_cap(tokenizer: PreTrainedTokenizerFast, problem: Any) -> int:
    """New-token cap for a problem: 1.5x its canonical completion plus slack.

    Runaway generations (no `Answer:` line) would otherwise dominate generation time.
    """
    return token_cap(tokenizer, problem.solution())


def evaluate_tiny(
    model_dir: str | Path,
    n_per_complexity: int = 100,
    seed: int = 20_260_000,
    complexities: tuple[int, ...] = (3, 5, 7, 10),
    batch_size: int = 64,
    threads: int = 2,
) -> dict[str, Any]:
    """Greedy traces of the model on fresh problems, checked step by step; prints a table.

    `seed` differs from the training problem seeds (`cfg.seed * 1_000_003 + batch index`, below
    10,000 for the shipped config), so the problems are fresh draws; at small complexities some
    still coincide with training problems by chance, the space of expressions being small.
    Steps count as in the verifier's data (`check_completion`): up to and including the first
    incorrect or unparseable one; a trace is wrong when it has such a step. `reasons` counts
    the checker's verdicts on those first bad steps, per task.
    """
    from crv.tasks import check_completion, generate_problems

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = [
        p
        for task in TASKS
        for n in complexities
        for p in generate_problems(task, n, n_per_complexity, seed=seed)
    ]
    caps = {p.prompt: completion_cap(tokenizer, p) for p in problems}
    start = time.perf_counter()
    results = generate_greedy(
        model, tokenizer, [p.prompt for p in problems], caps.__getitem__, batch_size
    )
    gen_seconds = time.perf_counter() - start
    rows: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    reasons: dict[str, Counter[str]] = {task: Counter() for task in TASKS}
    for p, r in zip(problems, results, strict=True):
        checked = check_completion(p, r.completion)
        reasons[p.task].update(s.reason for s in checked.steps if not s.label)
        row = rows[p.task, p.complexity]
        row["traces"] += 1
        row["steps"] += len(checked.steps)
        row["incorrect_steps"] += sum(1 for s in checked.steps if s.parsed and s.label is False)
        row["unparsed_steps"] += sum(1 for s in checked.steps if not s.parsed)
        row["wrong_traces"] += any(not s.parsed or s.label is False for s in checked.steps)
        row["final_correct"] += bool(checked.final_correct)
        row["no_answer"] += not r.stopped_at_eos
    table = []
    for (task, n), row in sorted(rows.items()):
        table.append({"task": task, "complexity": n} | {k: int(v) for k, v in row.items()})
    for task in TASKS:
        total: dict[str, Any] = {"task": task, "complexity": "all"}
        for r in table:
            if r["task"] == task:
                for k, v in r.items():
                    if k not in ("task", "complexity"):
                        total[k] = total.get(k, 0) + v
        table.append(total)
    print(
        "task        n    traces  steps  incorrect  unparsed  well-formed"
        "  wrong traces      final acc  no eos"
    )
    for r in table:
        print(
            f"{r['task']:<11} {r['complexity']!s:<4} {r['traces']:>6} {r['steps']:>6} "
            f"{r['incorrect_steps']:>10} {r['unparsed_steps']:>9} "
            f"{1 - r['unparsed_steps'] / max(1, r['steps']):>11.1%} "
            f"{r['wrong_traces']:>6} ({r['wrong_traces'] / r['traces']:6.1%}) "
            f"{r['final_correct'] / r['traces']:>9.1%} {r['no_answer']:>7}"
        )
    for task, counts in reasons.items():
        print(f"{task} first bad steps: {dict(counts.most_common())}")
    print(f"generation: {len(problems)} traces in {gen_seconds:.1f} s")
    return {
        "model_dir": str(model_dir),
        "seed": seed,
        "generation_seconds": gen_seconds,
        "table": table,
        "reasons": {task: dict(counts) for task, counts in reasons.items()},
    }


def evaluate_rules(
    model_dir: str | Path,
    n_per_complexity: int = 100,
    seed: int = 20_260_000,
    complexities: tuple[int, ...] = (3, 5, 7, 10),
    threads: int = 1,
) -> dict[str, Any]:
    """How a model treats the planted rules (`crv.tasks.bugs`) on fresh problems; prints a table.

    One forward pass per problem over its correct canonical completion, up to and including
    the first step that exercises a rule (later steps are never labelled in the benchmark).
    On a rule step the *decisive token* is the first token where the rule's line and the
    true line differ; the model `applies` the rule when its greedy choice there is the rule's
    token, writes the `truth` when it is the true token, and `other` otherwise or when it
    already departs from the line before it. `confidence` is the step's mean top-token
    probability over its tokens (1 - the `maxprob` baseline score); `decisive_top_prob` the
    top-token probability at the decisive token; `maxprob_auroc` how well 1 - confidence
    separates the steps where the model applies the rule from the task's rule-free steps.
    """
    from sklearn.metrics import roc_auc_score

    from crv.tasks import generate_problems
    from crv.tasks.bugs import buggy_solution, planted_rules

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    all_steps: Counter[str] = Counter()
    for task in TASKS:
        for n in complexities:
            for problem in generate_problems(task, n, n_per_complexity, seed=seed):
                rules = planted_rules(problem)
                all_steps.update(f"{task}/{rule or '-'}" for rule in rules)
                true_lines = problem.solution().splitlines(keepends=True)
                bug_lines = buggy_solution(problem).splitlines(keepends=True)
                n_steps = next((i + 1 for i, r in enumerate(rules) if r), len(rules))
                line_ids = [encode(line) for line in true_lines[:n_steps]]
                ids = tokenizer(problem.prompt)["input_ids"]
                starts = []
                for line in line_ids:
                    starts.append(len(ids))
                    ids = ids + line
                with torch.inference_mode():
                    logits = model(input_ids=torch.tensor([ids])).logits[0]
                probs_TV = torch.softmax(logits.float(), dim=-1)
                top_T, argmax_T = probs_TV.max(dim=-1)
                for i, (start, line) in enumerate(zip(starts, line_ids, strict=True)):
                    pos = range(start, start + len(line))  # predicted from position t - 1
                    row = stats[f"{task}/{rules[i] or '-'}"]
                    row["confidence"].append(float(top_T[pos.start - 1 : pos.stop - 1].mean()))
                    if not rules[i]:
                        continue
                    bug = encode(bug_lines[i])
                    k = next(j for j, (a, b) in enumerate(zip(line, bug, strict=False)) if a != b)
                    on_line = all(int(argmax_T[t - 1]) == ids[t] for t in pos[:k])
                    choice = int(argmax_T[pos[k] - 1])
                    row["applies"].append(on_line and choice == bug[k])
                    row["truth"].append(on_line and choice == line[k])
                    row["decisive_top_prob"].append(float(top_T[pos[k] - 1]))
                    if row["applies"][-1]:
                        row["applied_confidence"].append(row["confidence"][-1])
    table = []
    for key in sorted(stats):
        task, rule = key.split("/")
        entry: dict[str, Any] = {
            "task": task,
            "rule": rule if rule != "-" else "",
            "share_of_steps": round(
                all_steps[key] / sum(v for k, v in all_steps.items() if k.startswith(task + "/")), 4
            ),
            "labelled_steps": len(stats[key]["confidence"]),
        }
        entry |= {k: round(sum(v) / len(v), 4) for k, v in stats[key].items() if v}
        if stats[key]["applied_confidence"]:
            clean = stats[f"{task}/-"]["confidence"]
            applied = stats[key]["applied_confidence"]
            y = [0] * len(clean) + [1] * len(applied)
            entry["maxprob_auroc"] = round(
                float(roc_auc_score(y, [1 - c for c in clean + applied])), 4
            )
        table.append(entry)
    print(
        "task        rule            share   steps  confidence  applies   truth  decisive p"
        "  maxprob AUROC"
    )
    for r in table:
        print(
            f"{r['task']:<11} {r['rule'] or '-':<15} {r['share_of_steps']:>6.1%} "
            f"{r['labelled_steps']:>6} {r['confidence']:>11.4f} "
            f"{r.get('applies', float('nan')):>8.1%} {r.get('truth', float('nan')):>7.1%} "
            f"{r.get('decisive_top_prob', float('nan')):>11.4f} "
            f"{r.get('maxprob_auroc', float('nan')):>14.3f}"
        )
    return {"model_dir": str(model_dir), "seed": seed, "table": table}


def _flag(text: str) -> bool:
    """A boolean command-line value: true/false (bool("false") would be True)."""
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv: list[str] | None = None) -> None:
    """`python -m crv.models.tiny --out DIR [--field value ...]` or `--eval DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m crv.models.tiny", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, help="train and write the model directory here")
    parser.add_argument("--eval", type=Path, help="evaluate this model directory instead")
    parser.add_argument(
        "--eval-rules", type=Path, help="measure how this model treats the planted rules"
    )
    parser.add_argument(
        "--recipe",
        nargs="?",
        const="crv-tiny",
        choices=sorted(RECIPES),
        help="train the stages of this shipped model's recipe (default crv-tiny)",
    )
    parser.add_argument(
        "--first-stage",
        type=int,
        default=1,
        help="recipe: resume at this stage (1-based); --init is the earlier stages' model",
    )
    parser.add_argument(
        "--n-per-complexity", type=int, default=100, help="eval: problems per task and complexity"
    )
    parser.add_argument(
        "--eval-seed", type=int, default=20_260_000, help="eval: problem seed (held out)"
    )
    parser.add_argument("--eval-json", type=Path, help="eval: also write the table here")
    helps = field_docs(TinyConfig)
    for f in dataclasses.fields(TinyConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=_flag if isinstance(f.default, bool) else type(f.default),
            default=f.default,
            help=helps.get(f.name),
        )
    args = parser.parse_args(argv)
    if args.eval_rules is not None:
        result = evaluate_rules(args.eval_rules, args.n_per_complexity, args.eval_seed)
        if args.eval_json is not None:
            atomic_write_json(args.eval_json, result)
        return
    if args.eval is not None:
        result = evaluate_tiny(
            args.eval, args.n_per_complexity, args.eval_seed, threads=args.threads
        )
        if args.eval_json is not None:
            atomic_write_json(args.eval_json, result)
        return
    if args.out is None:
        parser.error("give --out (train) or --eval (evaluate)")
    if args.recipe:
        stats = train_recipe(
            args.out, args.seed, name=args.recipe, first_stage=args.first_stage, init=args.init
        )
        print(json.dumps(stats, indent=2))
        return
    cfg = TinyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyConfig)})
    print(json.dumps(train_tiny(cfg, args.out), indent=2))


if __name__ == "__main__":
    main()
