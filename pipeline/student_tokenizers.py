"""Stage `train-tokenizer`: a student tokenizer trained on the data folder's train text, offline, with the
`tokenizers` library (nothing from a hub), saved as a transformers folder that `--student-tokenizer` reads.

Kinds:
    bpe   byte-level BPE (GPT-2's pre-tokenizer and byte alphabet: every text encodes, nothing is unknown) of
          --vocab-size tokens, EOS included
    char  one token per character of the train text (the Text8 use case's character-level decoder), plus an
          unknown token for characters the train text lacks, and EOS

Both read `<data_dir>/train.txt` (the text the data stage's train tokens cover), a block at a time, so the val text
never shapes the student's vocabulary.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import TokenizerConfig, check, to_flags
from pipeline.errors import PipelineError
from pipeline.fsutil import writing
from pipeline.rows import read_meta, require_offsets, text_path
from pipeline.runs import save_config

EOS = "<|endoftext|>"
UNKNOWN = "<unk>"
TEXT_BLOCK_CHARS = 1 << 20  # the train text reaches the trainer in blocks of about this many characters


def _train_text(data_dir: str) -> Iterator[str]:
    with open(text_path(data_dir, "train"), encoding="utf-8", newline="") as f:
        while block := f.read(TEXT_BLOCK_CHARS):
            yield block


def bpe_tokenizer(data_dir: str, vocab_size: int):
    """A byte-level BPE of vocab_size tokens (EOS included) trained on the train text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_train_text(data_dir), trainer=trainer)
    return tokenizer


def char_tokenizer(data_dir: str):
    """One token per character of the train text (in order of first appearance), plus UNKNOWN and EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    characters: dict[str, None] = {}
    for block in _train_text(data_dir):
        characters.update(dict.fromkeys(block))
    vocab = {token: index for index, token in enumerate([EOS, UNKNOWN, *characters])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # each character, newline too
    tokenizer.decoder = decoders.Fuse()  # characters joined as they are, no spaces between
    return tokenizer


def trained_tokenizer(data_dir: str, kind: str, vocab_size: int = 8192):
    """A transformers fast tokenizer of `kind` (bpe, char) trained on the data folder's train text."""
    from transformers import PreTrainedTokenizerFast

    trained = bpe_tokenizer(data_dir, vocab_size) if kind == "bpe" else char_tokenizer(data_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=trained,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=UNKNOWN if kind == "char" else EOS,
        pad_token=EOS,
    )
    if len(tokenizer) < 3:
        raise PipelineError(f"{data_dir}/train.txt holds no text to train a tokenizer on; rebuild the data folder")
    return tokenizer


def train_tokenizer(config: TokenizerConfig) -> Path:
    """Train the tokenizer and save it (tokenizer.json and the transformers files) in config.out_dir."""
    check(config)
    require_offsets(config.data_dir)
    meta = read_meta(config.data_dir)
    out_dir = Path(config.out_dir)
    tokenizer = trained_tokenizer(config.data_dir, config.kind, config.vocab_size)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")  # written whole, then renamed: a kill leaves the old folder
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out_dir, probe=tmp):
        tokenizer.save_pretrained(tmp)
        save_config(tmp, "train-tokenizer", to_flags(config))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    print(
        f"train-tokenizer: wrote {out_dir}: {config.kind}, {len(tokenizer)} tokens, trained on the train text of "
        f"{meta['corpus_name']}"
    )
    return out_dir
