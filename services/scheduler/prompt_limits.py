"""How long a prompt may be, and the check of a whole data set against it before a run starts.

The model holds `generation.max_model_len` tokens (or, when that is unset,
the `max_position_embeddings` of the base model's config.json); a prompt
must leave `training.max_tokens` of them for the response. A question whose
prompt is longer would be leased, refused by every replica and re-leased
until it is marked failed, so the scheduler refuses the run at start
instead, naming the questions.

Counting a prompt's tokens needs the model's tokenizer. The scheduler renders
prompts as e3.tasks.prompts does: with `transformers` when the tokenizer
has a chat template, else with the `tokenizers` library from tokenizer.json
(a single user message with the tokenizer's special tokens, which is what
transformers does for such a tokenizer, and loads in a fraction of the time).
Where neither library is installed (the slim scheduler image) or the run names
no base model, the check is skipped with a warning; replicas then report a
prompt that does not fit (ReportTaskFailure, prompt_too_long) and the task
ends on the failed-task list.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from e3.config import E3Config
from e3.tasks.prompts import chat_messages, render_messages_ids
from e3.tasks.question import Question

log = logging.getLogger("scheduler")
MAX_NAMED = 5  # questions named in the error; the count says how many more


class PromptTooLong(ValueError):
    """Questions whose prompt leaves no room for the response; the message names them."""


def context_length(config: E3Config) -> int | None:
    """Prompt + response tokens the model holds, or None when the scheduler cannot tell."""
    if config.generation.max_model_len is not None:
        return config.generation.max_model_len
    if not config.base_model:
        return None
    path = Path(config.base_model) / "config.json"
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def prompt_renderer(model_dir: str | Path) -> Callable[[Sequence[dict]], list[int]] | None:
    """A function from chat messages to prompt token ids for the model in `model_dir`, or None if none can be built here."""
    model_dir = Path(model_dir)
    try:
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tokenizer_config = {}
    if tokenizer_config.get("chat_template") or (model_dir / "chat_template.jinja").exists():
        try:
            from transformers import AutoTokenizer
        except ImportError:
            return None
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return lambda messages: render_messages_ids(tokenizer, messages)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    if not (model_dir / "tokenizer.json").exists():
        return None
    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def render(messages: Sequence[dict]) -> list[int]:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ValueError(f"the tokenizer has no chat template, so only a single user message can be rendered, "
                             f"got roles {[m['role'] for m in messages]}")
        return fast.encode(messages[0]["content"], add_special_tokens=True).ids

    return render


def check_prompt_lengths(questions: Sequence[Question], template: str, render: Callable[[Sequence[dict]], list[int]],
                         limit: int, where: str) -> None:
    """Raise PromptTooLong naming the questions of `where` whose rendered prompt has more than `limit` tokens."""
    over = []
    for q in questions:
        length = len(render(chat_messages(q, template)))
        if length > limit:
            over.append((q.id, length))
    if over:
        named = ", ".join(f"{qid!r} ({n} tokens)" for qid, n in over[:MAX_NAMED])
        more = f" and {len(over) - MAX_NAMED} more" if len(over) > MAX_NAMED else ""
        raise PromptTooLong(
            f"{len(over)} {where} question(s) have prompts longer than {limit} tokens (the model's context minus "
            f"training.max_tokens), so no replica could sample them: {named}{more}")


def check_dataset(config: E3Config, splits: dict[str, Sequence[Question]]) -> None:
    """Refuse the run (PromptTooLong) if a question of any split cannot fit the model; warn if that cannot be checked."""
    context = context_length(config)
    if context is None or not config.base_model:
        log.warning("prompt lengths not checked at start: no base_model or context length known here")
        return
    limit = context - config.training.max_tokens
    if limit < 1:
        raise PromptTooLong(f"the model's context ({context} tokens) leaves no room for a prompt beside "
                            f"training.max_tokens ({config.training.max_tokens})")
    render = prompt_renderer(config.base_model)
    if render is None:
        log.warning("prompt lengths not checked at start: neither transformers nor tokenizers can load the "
                    "tokenizer of %s here; replicas report prompts that do not fit", config.base_model)
        return
    template = config.data.template()
    for name, questions in splits.items():
        check_prompt_lengths(questions, template, render, limit, name)
