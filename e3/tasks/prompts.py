"""How a question becomes the token ids a model is sampled on: one function, used everywhere.

Every path that shows a question to a model (the generation replicas, the
warm-start, `e3 eval`, `e3 inspect`) calls `render_prompt_ids`, so the
trainer learns on exactly the prompt vLLM sampled from and the evaluation
sees what training saw.

A question becomes chat messages first (`chat_messages`): a dataset's own
messages as they are, or its plain-text prompt as one user message. The
prompt template (`data.prompt_template`, e.g. the paper's "reason step by
step ... \\boxed{}" instruction) is applied to the text of the last user
message either way. Then:
- a tokenizer with a chat template renders the messages with it and the
  generation prompt (`apply_chat_template(..., add_generation_prompt=True)`),
  which adds whatever special tokens the template writes (BOS included);
- a tokenizer without one (a completion model such as the character-level
  arithmetic Llama) takes the single user message's text with its own
  special tokens; several messages are an error, since nothing says how to
  join them.
"""

from __future__ import annotations

from typing import Any, Sequence

from e3.tasks.question import Question

# What the R1-Distill models were tuned to follow and the \boxed{} answer the math verifier reads.
PAPER_MATH_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
PLAIN_TEMPLATE = "{prompt}"
# The template each task uses when data.prompt_template is not set.
TASK_TEMPLATES = {"arithmetic": PLAIN_TEMPLATE, "math": PAPER_MATH_TEMPLATE}

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A question cannot be rendered for this tokenizer; the message names the question."""


def check_template(template: str) -> str:
    """The template if it has exactly one {prompt} field and formats; ValueError naming the problem otherwise."""
    if template.count("{prompt}") != 1:
        raise ValueError(f"a prompt template needs exactly one {{prompt}} placeholder, got {template!r}")
    try:
        template.format(prompt="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"prompt template {template!r} does not format: {exc!r} (write literal braces as {{{{ }}}})") from exc
    return template


def check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    """Chat messages as a tuple of {"role", "content"} dicts, with the last user turn present; else ValueError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: chat messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} needs string fields role and content, got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {message['role']!r}; expected one of {ROLES}")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where}: chat messages have no user message")
    return tuple(out)


def chat_messages(question: Question, template: str = PLAIN_TEMPLATE) -> list[dict[str, str]]:
    """The messages a model is shown for `question`, the template applied to the last user message."""
    messages = [dict(m) for m in (question.messages or ({"role": "user", "content": question.prompt},))]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"])
    return messages


def render_messages_ids(tokenizer, messages: Sequence[dict[str, str]], where: str = "prompt") -> list[int]:
    """Token ids of `messages` for `tokenizer`, ready to sample a reply from."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding-like mapping; 4.x a plain list.
        ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
        return [int(t) for t in ids]
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise PromptError(
            f"{where}: the tokenizer has no chat template, so only a single user message can be rendered, "
            f"got roles {[m['role'] for m in messages]}"
        )
    return [int(t) for t in tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]]


def render_prompt_ids(tokenizer, question: Question, template: str = PLAIN_TEMPLATE) -> list[int]:
    """The prompt token ids of `question` for `tokenizer` (see the module docstring)."""
    return render_messages_ids(tokenizer, chat_messages(question, template), where=f"question {question.id!r}")


def task_template(task: str, configured: str | None) -> str:
    """data.prompt_template when set, else the task's default."""
    if configured is not None:
        return check_template(configured)
    return TASK_TEMPLATES.get(task, PLAIN_TEMPLATE)
