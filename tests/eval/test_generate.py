import pytest
import torch

from moe_understudy.data.tokenizer import train_bpe
from moe_understudy.eval.generate import generate_responses, response_mask
from moe_understudy.kd.common import set_special_tokens
from moe_understudy.moe.presets import build_model, preset_config

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "red blue green yellow"] * 20
PROMPTS = ["the cat", "a dog ran in the park and then", "red", "blue green yellow and the mat"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = train_bpe(TEXTS, vocab_size=280)
    model = build_model(preset_config("quick", len(tokenizer), max_positions=64), seed=0)
    set_special_tokens(model, tokenizer)
    return model, tokenizer


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    new = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    assert response_mask(new, eos_id=1).tolist() == [[True, True, False, False], [True, True, True, True]]


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batched = generate_responses(model, tok, PROMPTS, greedy=True, max_new_tokens=6, batch_size=4)
    single = [
        generate_responses(model, tok, [p], greedy=True, max_new_tokens=6, batch_size=1)[0] for p in PROMPTS
    ]
    assert batched == single


def test_sampling_repeats_under_a_seed_and_changes_across_seeds(model_and_tokenizer):
    model, tok = model_and_tokenizer
    runs = [generate_responses(model, tok, PROMPTS, seed=s, max_new_tokens=8) for s in (10, 10, 20)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_generation_does_not_disturb_the_callers_random_state(model_and_tokenizer):
    model, tok = model_and_tokenizer
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_responses(model, tok, PROMPTS[:1], seed=10, max_new_tokens=3)
    assert torch.equal(torch.rand(3), expected)
