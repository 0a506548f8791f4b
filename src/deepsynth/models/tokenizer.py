"""A character-level tokenizer built offline, for the tiny presets.

Real checkpoints bring their own tokenizer; tiny models need one that exists without a hub.
One token per character keeps the vocabulary small (~100 entries) so that a 200-dim decoder
spends its parameters on reading, not on a 129k-row embedding table.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
# Printable ASCII plus newline and tab; anything else maps to <unk>.
CHARACTERS = tuple(dict.fromkeys(string.printable))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return a `PreTrainedTokenizerFast` with one token per printable ASCII character.

    Special tokens come first so their ids are stable: <pad>=0, <bos>=1, <eos>=2, <unk>=3,
    <image>=4. The result saves and loads with `save_pretrained` / `AutoTokenizer`.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
