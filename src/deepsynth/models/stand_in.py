"""Offline stand-ins for released checkpoints: the real architecture with seeded random weights and a
tokenizer of the real vocabulary size, so the backends' `random-*` presets (the bases that
`deepsynth check-real-size` trains) build without a hub."""

from __future__ import annotations

import torch


def stand_in_tokenizer(vocab_size: int, image_token_id: int):
    """A character tokenizer (deepsynth.models.tokenizer) padded to the real vocabulary size, with
    `<image>` at the real image-token id: built offline, it gives the embedding table and lm_head their
    real sizes. <bos>=0 and <eos>=1 as in the released config."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deepsynth.models.tokenizer import CHARACTERS

    if not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id={image_token_id} must be in [0, vocab_size={vocab_size})")
    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    tokens = [None] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
    tokens[image_token_id] = "<image>"
    vocab = {tok or f"<unused_{i}>": i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials + ["<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   clean_up_tokenization_spaces=False)


def random_weights(model_class, config, seed: int = 0) -> torch.nn.Module:
    """`model_class` built from `config` with seeded random weights, directly in bf16 (a float32
    build of the 3.4B models would need twice the memory for a moment)."""
    torch.manual_seed(seed)
    return model_class._from_config(config, dtype=torch.bfloat16)
