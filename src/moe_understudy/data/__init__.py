"""Data layer: corpora, instruction formats, tokenizer and packing (see each module's docstring)."""

from moe_understudy.data.corpus import Corpus, load_corpus, stable_fraction, stdlib_documents
from moe_understudy.data.domain_shift import domain_shift_texts
from moe_understudy.data.instructions import (
    FORMATS,
    Example,
    cued_prompt,
    detect_format,
    examples_from_rows,
    instruction_prompt,
    load_hf_instructions,
    load_instructions,
    shuffled,
    split_by_task,
    train_val_test,
)
from moe_understudy.data.packing import (
    IGNORE_INDEX,
    collate_instructions,
    encode_instruction,
    pack_blocks,
    prompt_ids_batch,
    response_ids,
)
from moe_understudy.data.tokenizer import EOS, PAD, get_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "EOS",
    "FORMATS",
    "IGNORE_INDEX",
    "PAD",
    "Corpus",
    "Example",
    "collate_instructions",
    "cued_prompt",
    "detect_format",
    "domain_shift_texts",
    "encode_instruction",
    "examples_from_rows",
    "get_tokenizer",
    "instruction_prompt",
    "load_corpus",
    "load_hf_instructions",
    "load_instructions",
    "load_tokenizer",
    "pack_blocks",
    "prompt_ids_batch",
    "response_ids",
    "shuffled",
    "split_by_task",
    "stable_fraction",
    "stdlib_documents",
    "train_bpe",
    "train_val_test",
]
