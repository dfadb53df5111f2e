"""Training text: the Python standard library (default), stdlib + site-packages, local files and folders, or a `datasets` name.

Named sources: "stdlib" is the running interpreter's library source (tests, IDLE and installed
packages left out) plus each pydoc topic; "python" is exactly those documents, under the same keys
(so a stdlib val document stays val), plus the source (.py) and docs (.md, .rst, .txt) of the
installed pure-Python packages (`sysconfig.get_paths()["purelib"]`, the venv's site-packages),
keyed "site-packages/<relative path>"; tests folders, __pycache__, *.dist-info / *.egg-info and this
project's own package (an editable install's files included) are left out. Both list documents in
sorted key order and read them lazily.

A `Corpus` is a list of documents (strings) split into train and val **by document** (a file, a
pydoc topic, a jsonl row), using a stable hash of the document's key, so adding files never moves
an existing file from one split to the other. The `max_chars` cap is filled by taking documents in
a seeded hash order, so a small cap samples the whole library instead of the files starting with
"a"; train gets `(1 - val_fraction) * max_chars` of it and val `val_fraction * max_chars`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_understudy.config import DataConfig
from moe_understudy.data.hub import hub_access
from moe_understudy.errors import UserError

# A document not yet read: (stable key, loader). Keys drive the split; loaders are called lazily
# so a small `max_chars` does not read the whole library.
LazyDoc = tuple[str, Callable[[], str]]

# Folders of the stdlib that are not library source: tests, the IDLE app (its prose is the
# domain-shift text), installed packages and build configuration.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"}
# Site-packages folders that are not package source or docs, and the suffixes read there.
_SITE_SKIP_DIRS = {"test", "tests", "__pycache__"}
_SITE_SUFFIXES = {".py", ".md", ".rst", ".txt"}
_OWN_PACKAGE = __name__.split(".")[0]  # this project's package: never its own training text
_TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".js",
    ".html",
    ".css",
    ".tex",
    ".csv",
    ".toml",
}
_ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
# Field pairs joined into one text when a jsonl row has no `text_field` (instruction data as plain text).
_JOINABLE_FIELDS = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("instruction", "response"),
    ("instruction", "output"),
)


@dataclass(frozen=True)
class Corpus:
    """Documents as strings, already split into train and val."""

    name: str
    train: list[str]
    val: list[str]

    def chars(self) -> tuple[int, int]:
        """(train characters, val characters)."""
        return sum(map(len, self.train)), sum(map(len, self.val))


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus named by `cfg.source`: "stdlib", a file, a folder, or a `datasets` name ("name[:config]")."""
    source = cfg.source.strip()
    if source == "stdlib":
        return _split_and_cap("stdlib", stdlib_documents(), cfg)
    if source == "python":
        return _split_and_cap("python", python_documents(), cfg)
    path = Path(source).expanduser()
    if path.is_dir():
        return _split_and_cap(path.name or source, _folder_documents(path, cfg.text_field), cfg)
    if path.is_file():
        return _split_and_cap(path.name, _file_documents(path, cfg.text_field, key_prefix=""), cfg)
    if _looks_like_path(source):
        raise UserError(f"Corpus path {source} does not exist; pass an existing file or folder, or 'stdlib'.")
    return _split_and_cap(source, _dataset_documents(source, cfg.text_field), cfg)


# ---- the standard library --------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[LazyDoc]:
    """Every library *.py file (sorted relative paths) plus each pydoc topic as its own document."""
    root = stdlib_root()
    docs: list[LazyDoc] = [(rel, _file_reader(root / rel)) for rel in _stdlib_source_files(root)]
    docs += [
        (f"pydoc_data/topics.py::{name}", _constant(text)) for name, text in sorted(_pydoc_topics().items())
    ]
    return docs


def _stdlib_source_files(root: Path) -> list[str]:
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into skipped folders; a folder named config-*
        # holds the interpreter's build files, not library source.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != "pydoc_data/topics.py":  # added topic by topic instead
                rels.append(rel)
    return sorted(rels)


def python_documents(site_root: str | Path | None = None) -> list[LazyDoc]:
    """`stdlib_documents()` unchanged, then the pure-Python packages' source and docs ("site-packages/<rel>")."""
    return stdlib_documents() + site_packages_documents(site_root)


def site_packages_documents(root: str | Path | None = None) -> list[LazyDoc]:
    """The .py / .md / .rst / .txt files under `root` (default: purelib), sorted, keyed "site-packages/<rel>".

    Left out: tests folders, __pycache__, *.dist-info / *.egg-info, hidden folders, and this
    project's own package (its folder, or an editable install's `__editable__*` finder and .pth).
    """
    root = Path(root if root is not None else sysconfig.get_paths()["purelib"])
    rels: list[str] = []
    # os.path string operations, not Path objects: a site-packages with torch holds ~100k files.
    for dirpath, dirnames, filenames in os.walk(root):
        top = dirpath == str(root)
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _SITE_SKIP_DIRS
            and not d.startswith(".")
            and not d.endswith((".dist-info", ".egg-info"))
            and not (top and (d == _OWN_PACKAGE or d.startswith("__editable__")))
        ]
        for name in filenames:
            if os.path.splitext(name)[1] not in _SITE_SUFFIXES or (top and name.startswith("__editable__")):
                continue
            rels.append(name if top else f"{rel_dir}/{name}")
    return [(f"site-packages/{rel}", _file_reader(f"{root}/{rel}")) for rel in sorted(rels)]


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics  # the interpreter's own help texts (English prose + examples)
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return dict(topics)


# ---- files, folders, jsonl, datasets ---------------------------------------------------------


def _folder_documents(folder: Path, text_field: str) -> list[LazyDoc]:
    docs: list[LazyDoc] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts):
            continue
        if rel.endswith(_ROW_SUFFIXES):
            docs += _file_documents(path, text_field, key_prefix=rel)
        elif path.suffix.lower() in _TEXT_SUFFIXES or (path.suffix == "" and _is_text_file(path)):
            docs.append((rel, _file_reader(path)))
    return docs


def _file_documents(path: Path, text_field: str, key_prefix: str) -> list[LazyDoc]:
    """One document per jsonl/json row, or the whole file as one document."""
    if not path.name.endswith(_ROW_SUFFIXES):
        if not _is_text_file(path):
            raise UserError(f"{path} is not a text file; pass a UTF-8 text, .jsonl or .json file.")
        return [(key_prefix or path.name, _file_reader(path))]
    docs = []
    for i, row in enumerate(read_rows(path)):
        text = _row_text(row, text_field, where=f"{path} row {i + 1}")
        docs.append((f"{key_prefix}#{i}", _constant(text)))
    return docs


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl / .jsonl.gz (one object a line) or .json / .json.gz (a list of objects) file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                rows = [json.loads(line) for line in fh if line.strip()]
            else:
                rows = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserError(
            f"Could not parse {path} ({exc}); pass a valid UTF-8 JSON Lines or JSON file."
        ) from exc
    if isinstance(rows, dict):  # {"data": [...]} style JSON
        lists = [v for v in rows.values() if isinstance(v, list)]
        rows = lists[0] if len(lists) == 1 else rows
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} must hold JSON objects (one per line, or a JSON list of objects).")
    return rows


def _row_text(row: dict, text_field: str, where: str) -> str:
    value = row.get(text_field)
    if isinstance(value, str):
        return value
    for a, b in _JOINABLE_FIELDS:
        if isinstance(row.get(a), str) and isinstance(row.get(b), str):
            return f"{row[a]}\n\n{row[b]}"
    raise UserError(
        f"{where} has no text field '{text_field}' (fields: {', '.join(sorted(row)) or 'none'}); "
        f"pass --text-field with the field that holds the text."
    )


def _dataset_documents(source: str, text_field: str) -> list[LazyDoc]:
    """Rows of every split of a Hugging Face dataset "name" or "name:config", re-split by row like any corpus."""
    name, _, config = source.partition(":")
    splits = load_hf_dataset(name, config or None)
    if not hasattr(splits, "keys"):  # a single split came back
        splits = {"train": splits}
    docs: list[LazyDoc] = []
    for split_name in sorted(splits):
        rows = splits[split_name]
        # Rows are read only when the cap reaches them (Arrow gives cheap random access).
        docs += [
            (
                f"{split_name}#{i}",
                _row_reader(rows, i, text_field, f"dataset {source} split {split_name} row {i}"),
            )
            for i in range(len(rows))
        ]
    return docs


def _row_reader(rows, index: int, text_field: str, where: str) -> Callable[[], str]:
    return lambda: _row_text(rows[index], text_field, where)


def load_hf_dataset(name: str, config: str | None = None, split: str | None = None):
    """`datasets.load_dataset`, turning any failure (offline, unknown name) into one UserError."""
    import datasets

    with hub_access() as offline:
        try:
            return datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # offline, unknown, gated, or a missing config: all mean "use a local file"
            reason = (
                "offline and not in the local cache"
                if offline
                else f"unknown or unavailable: {type(exc).__name__}"
            )
            raise UserError(
                f"The dataset '{name}' could not be loaded ({reason}) and no local path has that name; "
                f"pass a local file or folder path instead."
            ) from exc


# ---- split and cap ---------------------------------------------------------------------------


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (same on every machine and Python run)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def document_splits(keys: Iterable[str], val_fraction: float) -> dict[str, bool]:
    """key -> whether its document is val: `stable_fraction(key) < val_fraction`, a function of the key alone.

    Both splits need a document; when the hash gives one split nothing, the document whose hash is
    nearest the boundary moves (deterministic, and only happens for tiny corpora).
    """
    is_val = {key: stable_fraction(key) < val_fraction for key in keys}
    if is_val and not any(is_val.values()):
        is_val[min(is_val, key=stable_fraction)] = True
    elif is_val and all(is_val.values()):
        is_val[max(is_val, key=stable_fraction)] = False
    return is_val


def pick_documents(
    docs: list[LazyDoc], cfg: DataConfig
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) lists of (key, text) under the `max_chars` cap, each sorted by key.

    Documents are read in a seeded hash order until each split's budget is spent, so a small cap
    samples the whole source; blank documents are skipped and the last one taken is cut to fit.
    """
    is_val = document_splits((key for key, _ in docs), cfg.val_fraction)
    budget = {
        False: int(cfg.max_chars * (1 - cfg.val_fraction)),
        True: max(1, int(cfg.max_chars * cfg.val_fraction)),
    }
    picked: dict[bool, list[tuple[str, str]]] = {False: [], True: []}
    for key, load in sorted(docs, key=lambda d: stable_fraction(f"{cfg.seed}:{d[0]}")):
        split = is_val[key]
        if budget[split] <= 0:
            if budget[not split] <= 0:
                break
            continue
        text = load()
        if not text.strip():
            continue
        text = _truncate(text, budget[split])
        budget[split] -= len(text)
        picked[split].append((key, text))
    # Keep the corpus order sorted by key, so file order is deterministic and readable.
    return sorted(picked[False]), sorted(picked[True])


def _split_and_cap(name: str, docs: list[LazyDoc], cfg: DataConfig) -> Corpus:
    if not docs:
        raise UserError(f"The corpus '{name}' holds no documents; pass a source with some text in it.")
    if len(docs) == 1:
        return _split_single(name, docs[0][1](), cfg)
    train_docs, val_docs = pick_documents(docs, cfg)
    train = [t for _, t in train_docs]
    val = [t for _, t in val_docs]
    if not train and not val:
        raise UserError(
            f"The corpus '{name}' is empty (only blank documents); pass a source with some text in it."
        )
    if not train or not val:
        return _split_single(name, "\n\n".join(train + val), cfg)
    return Corpus(name=name, train=train, val=val)


def _split_single(name: str, text: str, cfg: DataConfig) -> Corpus:
    """One document: its first (1 - val_fraction) characters train, the rest is val (cut at a line end)."""
    text = _truncate(text, cfg.max_chars)
    if len(text.strip()) < 2:
        raise UserError(f"The corpus '{name}' is empty; pass a source with some text in it.")
    cut = int(len(text) * (1 - cfg.val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > len(text) // 2:  # prefer a line boundary when one is near
        cut = newline + 1
    cut = min(max(cut, 1), len(text) - 1)
    return Corpus(name=name, train=[text[:cut]], val=[text[cut:]])


def _truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at the last line end when there is one."""
    if len(text) <= limit:
        return text
    newline = text.rfind("\n", 0, limit)
    return text[: newline + 1] if newline > 0 else text[:limit]


def take_chars(texts: Iterable[str], max_chars: int, min_piece: int = 1_000) -> Iterator[str]:
    """`texts` in order until `max_chars`; the last one is cut to fit unless that leaves a stub."""
    left = max_chars
    for text in texts:
        if len(text) > left and left < min_piece:
            return
        text = _truncate(text, left)
        left -= len(text)
        yield text


# ---- small helpers ---------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """Whether a missing source was meant as a path rather than a dataset name like "org/name"."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or source.endswith((*_ROW_SUFFIXES, *_TEXT_SUFFIXES))
        or os.sep != "/"
        and os.sep in source
    )


def _is_text_file(path: Path) -> bool:
    head = path.open("rb").read(8192)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a multi-byte character cut by the 8 KiB window
    return True


def read_text(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _file_reader(path: str | Path) -> Callable[[], str]:
    return lambda: read_text(path)


def _constant(text: str) -> Callable[[], str]:
    return lambda: text
