"""Build small byte-level BPE tokenizers as HF tokenizer directories (demo and tests).

Nothing is downloaded: the BPE is trained with the `tokenizers` library on the given texts
and saved with a ChatML chat template, Qwen-style special tokens and eos = `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for tests: 0123456789.",
    "Instruction: add the numbers. Input: 12 + 30. Output: 42.",
    "user assistant system observation function tool answer question",
    "Über café naïve 你好，世界 🙂 — unicode round trips.",
    "def add(a, b):\n    return a + b\n",
]


def build_bpe_tokenizer(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    chat_template: str = CHATML_TEMPLATE,
    split_digits: bool = False,
):
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``; return the HF tokenizer.

    ``split_digits`` makes every digit its own token (as Llama/Qwen tokenizers do), which
    small models need to learn arithmetic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) if texts is not None else DEFAULT_CORPUS * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf
