"""A small byte-level BPE tokenizer trained in milliseconds on the job's own texts (for tiny presets).

Real recipes load the tokenizer that ships with the pretrained weights; the tiny preset has no weights to
match, so we train one on the training split and save it next to the model like any HF tokenizer.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, SEP, MASK = "[PAD]", "[UNK]", "[BOS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, BOS, SEP, MASK]  # ids 0..4 in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()  # radiology text: case carries no meaning, halves the vocab
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        sep_token=SEP,
        eos_token=SEP,
        mask_token=MASK,
        cls_token=BOS,
    )
