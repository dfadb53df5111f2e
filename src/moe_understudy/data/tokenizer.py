"""Byte-level BPE trained here (so any text round-trips), or an existing tokenizer by path / hub id."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from moe_understudy.config import DataConfig
from moe_understudy.data.hub import hub_access
from moe_understudy.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# BPE merges stop changing much after a few million characters; training on a deterministic
# sample keeps `train_bpe` well under a minute for the 12M-character default corpus.
BPE_TRAIN_CHARS = 3_000_000
_SAMPLE_PIECE = 20_000  # characters per piece when sampling long documents


def train_bpe(
    texts: list[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    max_train_chars: int = BPE_TRAIN_CHARS,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `vocab_size` entries (EOS and PAD included) learnt from `texts`.

    Saved with `save_pretrained(out_dir)` when `out_dir` is given, so `AutoTokenizer.from_pretrained(out_dir)`
    reopens it. EOS doubles as BOS; decoding returns exactly the encoded text.
    """
    if vocab_size < 258:
        raise UserError(f"vocab_size must be at least 258 (256 bytes + EOS + PAD), got {vocab_size}.")
    sample = bpe_sample(texts, max_train_chars)
    if not sample:
        raise UserError("Cannot train a tokenizer on empty text; pass a corpus with some text in it.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    backend.train_from_iterator(sample, trainer=trainer, length=len(sample))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=EOS,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def bpe_sample(texts: list[str], max_chars: int) -> list[str]:
    """At most ~`max_chars` characters of `texts`, taken as evenly spaced pieces across all of them.

    Deterministic: pieces of up to `_SAMPLE_PIECE` characters are cut in order and every n-th is kept,
    so the sample spans the whole corpus rather than its first documents.
    """
    pieces = [t[i : i + _SAMPLE_PIECE] for t in texts for i in range(0, len(t), _SAMPLE_PIECE)]
    pieces = [p for p in pieces if p.strip()]
    total = sum(map(len, pieces))
    if total <= max_chars:
        return pieces
    keep = max(1, round(len(pieces) * max_chars / total))
    step = len(pieces) / keep
    return [pieces[int(i * step)] for i in range(keep)]


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """An existing tokenizer from a local folder or a hub id; PAD falls back to EOS when missing."""
    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise UserError(
                f"No tokenizer could be read from {path} ({type(exc).__name__}); pass a folder written by "
                f"save_pretrained (holding tokenizer.json or tokenizer_config.json)."
            ) from exc
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise UserError(
            f"Tokenizer path {source} does not exist; pass an existing tokenizer folder or a hub id."
        )
    else:
        with hub_access() as offline:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception as exc:
                reason = (
                    "offline and not in the local cache" if offline else f"unknown id: {type(exc).__name__}"
                )
                raise UserError(
                    f"The tokenizer '{source}' is neither a local folder nor loadable from the hub ({reason}); "
                    f"pass a local tokenizer folder instead."
                ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"The tokenizer '{source}' has neither a pad nor an eos token; pass one that has an eos token."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def get_tokenizer(
    cfg: DataConfig, texts: list[str], out_dir: str | Path | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer a run uses: `cfg.tokenizer` when set, else a BPE of `cfg.vocab_size` trained on `texts`.

    A loaded tokenizer is also saved to `out_dir` (when given) so the run folder is self-contained.
    """
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if out_dir is not None:
            tokenizer.save_pretrained(str(out_dir))
        return tokenizer
    return train_bpe(texts, cfg.vocab_size, out_dir)
