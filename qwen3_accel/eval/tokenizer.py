"""A small byte-level BPE tokenizer trained here, so random-weight models can run text tasks offline."""

import json

from transformers import PreTrainedTokenizerFast

from . import TASKS_DIR


def train_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) trained on the bundled task texts; `<|endoftext|>` is eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for path in sorted(TASKS_DIR.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            texts.extend(v for v in record.values() if isinstance(v, str))
            texts.extend(c for v in record.values() if isinstance(v, list) for c in v if isinstance(c, str))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
