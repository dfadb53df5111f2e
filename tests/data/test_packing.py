import pytest
import torch

from moe_understudy.data import (
    IGNORE_INDEX,
    Example,
    collate_instructions,
    encode_instruction,
    pack_blocks,
    prompt_ids_batch,
    response_ids,
)
from moe_understudy.errors import UserError

DOCS = ["def add(a, b):\n    return a + b\n", "The quick brown fox.", "class Point:\n    pass\n"] * 7


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pack_blocks_concatenates_documents_with_eos_and_drops_the_tail(toy_tokenizer):
    eos = toy_tokenizer.eos_token_id
    stream = [t for doc in DOCS for t in [*_ids(toy_tokenizer, doc), eos]]
    blocks = pack_blocks(DOCS, toy_tokenizer, block_size=16)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert (blocks == eos).sum() == stream[: blocks.numel()].count(eos) > 0


def test_pack_blocks_max_blocks_keeps_the_first_blocks(toy_tokenizer):
    full = pack_blocks(DOCS, toy_tokenizer, block_size=8)
    first = pack_blocks(DOCS, toy_tokenizer, block_size=8, max_blocks=3)
    assert torch.equal(first, full[:3])


def test_pack_blocks_refuses_text_shorter_than_one_block(toy_tokenizer):
    with pytest.raises(UserError, match="fewer than one block of 512"):
        pack_blocks(["tiny"], toy_tokenizer, block_size=512)


def test_instruction_labels_mask_exactly_the_prompt(toy_tokenizer):
    ex = Example(prompt="Instruction: say hello\n\nResponse:", response="hello world")
    ids, labels = encode_instruction(ex, toy_tokenizer)
    prompt = _ids(toy_tokenizer, ex.prompt)
    answer = _ids(toy_tokenizer, " hello world") + [toy_tokenizer.eos_token_id]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert toy_tokenizer.decode(answer[:-1]) == " hello world"


def test_long_prompt_is_cut_from_the_left_and_total_from_the_right(toy_tokenizer):
    ex = Example(prompt="The quick brown fox. " * 30 + "Response:", response="hello world " * 30)
    prompt = _ids(toy_tokenizer, ex.prompt)
    ids, labels = encode_instruction(ex, toy_tokenizer, max_prompt=10, max_total=25)
    assert len(ids) == len(labels) == 25
    assert ids[:10] == prompt[-10:]  # the end of the prompt ("Response:") survives
    assert labels[:10] == [IGNORE_INDEX] * 10
    assert labels[10:] == response_ids(ex.response, toy_tokenizer)[:15]


def test_encode_instruction_refuses_a_prompt_limit_leaving_no_room(toy_tokenizer):
    with pytest.raises(UserError, match="max_prompt < max_total"):
        encode_instruction(Example("p", "r"), toy_tokenizer, max_prompt=8, max_total=8)


def test_collate_right_pads_ids_labels_and_mask():
    batch = [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    out = collate_instructions(batch, pad_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_prompt_batch_is_left_padded_and_left_truncated(toy_tokenizer):
    prompts = ["say hello", "The quick brown fox jumps over the lazy dog."]
    long_ids = _ids(toy_tokenizer, prompts[1])
    ids, mask = prompt_ids_batch(prompts, toy_tokenizer, max_prompt=6)
    short = _ids(toy_tokenizer, prompts[0])
    width = min(6, max(len(short), len(long_ids)))
    assert ids.shape == mask.shape == (2, width)
    assert ids[1].tolist() == long_ids[-width:]
    assert ids[0, width - len(short) :].tolist() == short
    assert (ids[0, : width - len(short)] == toy_tokenizer.pad_token_id).all()
    assert mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
