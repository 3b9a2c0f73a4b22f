"""Prompts of the traces stage: plain `Q:` text for crv-tiny, chat turns for chat models.

crv-tiny was trained on bare `Q: Evaluate ...` lines and continues them. A pretrained chat
model writes the step format far more reliably when it is asked in the form it was tuned
on: a system instruction that states the format, solved examples as earlier user/assistant
turns, then the problem as the last user turn, rendered by the tokenizer's own chat
template (`prompt_style=chat`; `auto` picks it when the tokenizer has a template).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crv.tasks.format import ANSWER_PREFIX, PROMPT_PREFIX

PROMPT_STYLES = ("auto", "plain", "chat")

SYSTEM = {
    "synthetic": (
        "Evaluate the expression one operation at a time. Write one step per line, exactly "
        "in the form `Step k: <operation>=<value>, so <the whole remaining expression, with "
        "that operation replaced by its value>`, with no other text. After the last step, "
        f"write `{ANSWER_PREFIX} <value>` on its own line and stop."
    ),
    "gsm8k": (
        "Solve the problem step by step, one short sentence per line, writing every "
        "calculation as `a op b = c`. End with a line `#### <number>` that gives the final "
        "answer, and stop."
    ),
}


def resolve_style(style: str, tokenizer: Any) -> str:
    """`plain` or `chat`: `auto` is chat when the tokenizer has a chat template."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"traces.prompt_style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "traces.prompt_style=chat, but the subject's tokenizer has no chat template"
        )
    return style


def question_text(task: str, problem: str) -> str:
    """What the user asks: `Evaluate <expression>` or the word problem itself."""
    return problem if task == "gsm8k" else PROMPT_PREFIX.removeprefix("Q: ") + problem


def build_prompt(
    tokenizer: Any,
    style: str,
    task: str,
    problem: str,
    shots: Sequence[tuple[str, str]] = (),
) -> str:
    """The prompt text for one problem; `shots` are solved `(problem, solution)` pairs.

    plain: each shot as `Q: <question>\\n<solution>`, then `Q: <question>\\n`.
    chat: the task's system instruction, each shot as a user and an assistant turn, the
    question as the last user turn, rendered with the generation prompt appended.
    """
    if style == "plain":
        lines = [f"Q: {question_text(task, p)}\n{s}" for p, s in shots]
        return "".join(lines) + f"Q: {question_text(task, problem)}\n"
    messages = [{"role": "system", "content": SYSTEM["gsm8k" if task == "gsm8k" else "synthetic"]}]
    for p, s in shots:
        messages.append({"role": "user", "content": question_text(task, p)})
        messages.append({"role": "assistant", "content": s.rstrip("\n")})
    messages.append({"role": "user", "content": question_text(task, problem)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
