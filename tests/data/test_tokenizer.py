import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moe_understudy.config import DataConfig
from moe_understudy.data import EOS, PAD, get_tokenizer, load_tokenizer, train_bpe
from moe_understudy.data.tokenizer import bpe_sample
from moe_understudy.errors import UserError

UNICODE_CODE = 'def grüß(name: str) -> str:\n\t"""Say hi → 世界 🙂."""\n    return f"héllo {name}"  \n\n'


def test_bpe_round_trips_code_with_unicode_and_unseen_bytes(toy_tokenizer):
    ids = toy_tokenizer(UNICODE_CODE, add_special_tokens=False)["input_ids"]
    assert toy_tokenizer.decode(ids) == UNICODE_CODE
    assert toy_tokenizer.unk_token_id not in ids


def test_bpe_has_requested_size_special_tokens_and_learnt_merges(toy_tokenizer):
    assert len(toy_tokenizer) == 320
    assert (
        toy_tokenizer.eos_token == EOS and toy_tokenizer.bos_token == EOS and toy_tokenizer.pad_token == PAD
    )
    assert toy_tokenizer.convert_tokens_to_ids([EOS, PAD]) == [0, 1]
    # A frequent training phrase takes fewer tokens than bytes; encoding adds no BOS/EOS by itself.
    phrase = "    return a + b"
    assert len(toy_tokenizer(phrase)["input_ids"]) < len(phrase.encode())
    assert toy_tokenizer(phrase)["input_ids"] == toy_tokenizer(phrase, add_special_tokens=False)["input_ids"]
    assert toy_tokenizer(f"a{EOS}b", add_special_tokens=False)["input_ids"][1] == toy_tokenizer.eos_token_id


def test_saved_bpe_reopens_with_auto_tokenizer_and_encodes_identically(tmp_path, toy_texts):
    trained = train_bpe(toy_texts, vocab_size=300, out_dir=tmp_path / "tok")
    reopened = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reopened(UNICODE_CODE)["input_ids"] == trained(UNICODE_CODE)["input_ids"]
    assert (reopened.eos_token_id, reopened.pad_token_id) == (trained.eos_token_id, trained.pad_token_id)
    assert load_tokenizer(tmp_path / "tok")(UNICODE_CODE)["input_ids"] == trained(UNICODE_CODE)["input_ids"]


def test_bpe_sample_caps_characters_and_spans_all_documents():
    texts = [f"doc{i} " + "x" * 995 for i in range(1000)]  # 1M characters
    sample = bpe_sample(texts, max_chars=50_000)
    assert 45_000 <= sum(map(len, sample)) <= 55_000
    picked = [int(p.split()[0][3:]) for p in sample]
    assert min(picked) < 50 and max(picked) > 950
    assert bpe_sample(texts, 50_000) == sample


def test_small_corpus_is_used_whole_for_bpe():
    assert bpe_sample(["ab", "cd"], 100) == ["ab", "cd"]


def test_get_tokenizer_trains_when_no_tokenizer_is_configured(tmp_path, toy_texts):
    tok = get_tokenizer(DataConfig(vocab_size=300), toy_texts, out_dir=tmp_path / "t")
    assert len(tok) == 300 and (tmp_path / "t" / "tokenizer.json").is_file()


def test_loaded_tokenizer_without_pad_falls_back_to_eos(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id


def test_missing_tokenizer_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="Tokenizer path .*nope does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


def test_unknown_hub_tokenizer_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="neither a local folder nor loadable from the hub.*offline"):
        load_tokenizer("made-up-user-zz/no-such-tokenizer")
