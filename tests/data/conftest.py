import pytest

from moe_understudy.data import train_bpe

# Enough repeated code and prose for BPE to learn merges; tiny so training takes milliseconds.
TOY_TEXTS = [
    "def add(a, b):\n    return a + b\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "The quick brown fox jumps over the lazy dog. Response: yes\n",
    "Instruction: say hello\n\nResponse: hello world\n",
] * 20


@pytest.fixture(scope="session")
def toy_texts():
    return list(TOY_TEXTS)


@pytest.fixture(scope="session")
def toy_tokenizer():
    return train_bpe(TOY_TEXTS, vocab_size=320)
