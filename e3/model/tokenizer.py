"""A character-level tokenizer for the arithmetic task, built locally.

Every character is one token, so the model sees digits one by one and
"47*12=" costs six tokens. It is a `tokenizers` WordLevel model over single
characters (a regex pre-tokenizer splits the text into characters and a Fuse
decoder glues them back without spaces). A template post-processor prepends
<bos> whenever special tokens are requested, which is what both
`transformers` and vLLM do when they encode a prompt; the model is trained
to end every completion with <eos>.

Saved as tokenizer.json + tokenizer_config.json + special_tokens_map.json,
the directory loads with `transformers.AutoTokenizer.from_pretrained(dir)`
and with vLLM (which uses the same loader).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Digits and operators are all the task needs; a few letters and punctuation
# leave room for other prompt wordings without retraining the vocabulary.
CHARACTERS = "0123456789+-*/=() .,?:abcdefghijklmnopqrstuvwxyz\n"
# Generous for the arithmetic prompts (under 20 tokens) yet small enough that
# the model's position table stays tiny.
MODEL_MAX_LENGTH = 64


def build_tokenizer() -> Tokenizer:
    """The raw `tokenizers` object: ids 0..3 are the special tokens, then one id per character."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "isolated" keeps every matched character as its own piece, spaces included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def vocab_size() -> int:
    """How many token ids the tokenizer can produce (the model's embedding rows)."""
    return len(SPECIAL_TOKENS) + len(CHARACTERS)


def save_tokenizer(directory: Path) -> None:
    """Write the tokenizer files into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    special = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        # The template post-processor already adds <bos>; these flags say so
        # to readers that check them instead of running the post-processor.
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def special_ids() -> dict[str, int]:
    """Ids of <pad>, <bos>, <eos>, <unk> by name ("pad", "bos", "eos", "unk")."""
    return {name.strip("<>"): i for i, name in enumerate(SPECIAL_TOKENS)}
