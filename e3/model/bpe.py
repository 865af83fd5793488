"""A byte-level BPE tokenizer the way Qwen2's works, trained locally, with Qwen's chat template.

Built with `tokenizers` and no hub access:
- NFC normalisation, then Qwen2's pre-tokenizer regex, which splits every
  digit into its own piece (`\\p{N}` one at a time), so "9801" is four tokens
  and the model sees arithmetic digit by digit, as Qwen2 does;
- byte-level: every piece is mapped to bytes first, so any text encodes
  (the 256 byte symbols are all in the vocabulary) and decodes back exactly;
- BPE merges learned on a corpus of the arithmetic prompts and answers in
  their chat form and the prompts of the math training set (`corpus`), so
  math prompts cost a sensible number of tokens; VOCAB_SIZE tokens in all;
- special tokens <|endoftext|> (padding), <|im_start|> and <|im_end|> (the
  end of a chat turn, and the tokenizer's eos); no BOS, as in Qwen2;
- the chat template in tokenizer_config.json writes
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and, for a
  generation prompt, `<|im_start|>assistant\\n`.

Training reads the same corpus in the same order and `tokenizers` breaks
ties between merges deterministically, so the same settings give the same
vocabulary (tests/unit/test_bpe_tokenizer.py trains twice and compares).
The corpus needs ../shared/data/e3-math/train.parquet beside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
VOCAB_SIZE = 2048
MIN_FREQUENCY = 2
# Positions of the tiny Qwen2 (rotary, so a long table costs no weights): room for math prompts.
MODEL_MAX_LENGTH = 2048
MATH_TRAIN = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "e3-math" / "train.parquet"
# Qwen2's pre-tokenizer pattern: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def math_prompts(path: Path = MATH_TRAIN) -> list[str]:
    """The user-message texts of the math training set (a parquet file of chat prompts)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE corpus: {path} is missing (the e3-math training set)")
    column = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    texts = [m["content"] for messages in column for m in messages if m.get("role") == "user" and m.get("content")]
    if not texts:
        raise ValueError(f"BPE corpus: {path} has no user messages in its prompt column")
    return texts


def corpus(math_path: Path = MATH_TRAIN) -> list[str]:
    """The training texts: every arithmetic question of every split in chat form with its answer, then the math prompts."""
    from e3.tasks import arithmetic

    texts = []
    for level in arithmetic.LEVELS:
        for split in arithmetic.SPLITS:
            for q in arithmetic.make_questions(split, arithmetic.pool_size(level, split), seed=0, levels=[level]):
                texts.append(f"{IM_START}user\n{q.prompt}{IM_END}\n{IM_START}assistant\n{q.answer}{IM_END}\n")
    return texts + math_prompts(math_path)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`; ids 0..2 are the special tokens."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def settings() -> dict:
    """What decides the trained vocabulary (part of the Qwen2 base model's recipe hash)."""
    return {"kind": "byte-level-bpe", "pattern": QWEN2_PATTERN, "vocab_size": VOCAB_SIZE,
            "min_frequency": MIN_FREQUENCY, "corpus": "arithmetic chat pairs + e3-math train prompts",
            "chat_template": CHAT_TEMPLATE, "model_max_length": MODEL_MAX_LENGTH}


def save_tokenizer(directory: Path, tok: Tokenizer | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json.

    `tok` is trained on `corpus()` when not given.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = tok if tok is not None else train_tokenizer(corpus())
    tok.save(str(directory / "tokenizer.json"))
    special = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        # Qwen2 has no BOS; the chat template writes every special token a prompt needs.
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens by role: "pad" (<|endoftext|>), "im_start", "eos" (<|im_end|>)."""
    return {"pad": tok.token_to_id(ENDOFTEXT), "im_start": tok.token_to_id(IM_START), "eos": tok.token_to_id(IM_END)}
