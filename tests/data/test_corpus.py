import json

import pytest

from moe_understudy.config import DataConfig
from moe_understudy.data import domain_shift_texts, load_corpus, stable_fraction, stdlib_documents
from moe_understudy.errors import UserError


def _write_files(folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.txt").write_text(f"document {name}\n" * 5)


def _doc_names(texts):
    return {t.split()[1] for t in texts}


def test_stdlib_corpus_is_deterministic_disjoint_and_capped():
    cfg = DataConfig(max_chars=300_000, val_fraction=0.1)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a == b
    assert a.train and a.val
    assert not set(a.train) & set(a.val)
    train_chars, val_chars = a.chars()
    assert train_chars + val_chars <= cfg.max_chars
    assert val_chars <= cfg.max_chars * cfg.val_fraction


def test_stdlib_cap_samples_across_the_whole_library():
    keys = [key for key, _ in stdlib_documents()]
    # The cap takes documents in seeded-hash order: the first 50 span many initial letters.
    first = sorted(keys, key=lambda k: stable_fraction(f"0:{k}"))[:50]
    assert len({k.split("/")[-1][0].lower() for k in first}) > 8


def test_stdlib_documents_exclude_tests_idle_and_site_packages_and_include_pydoc_topics():
    keys = [key for key, _ in stdlib_documents()]
    paths = [k for k in keys if "::" not in k]
    assert paths == sorted(paths)
    assert "argparse.py" in paths and "json/decoder.py" in paths
    for banned in ("test/", "tests/", "idlelib/", "site-packages/", "__pycache__/"):
        assert not any(k.startswith(banned) or f"/{banned}" in k for k in paths), banned
    assert any(k.startswith("pydoc_data/topics.py::") for k in keys)


def test_split_is_by_file_and_stable_when_files_are_added(tmp_path):
    folder = tmp_path / "docs"
    _write_files(folder, [f"f{i:03d}" for i in range(60)])
    cfg = DataConfig(source=str(folder), val_fraction=0.2)
    before = load_corpus(cfg)
    val_before = _doc_names(before.val)
    assert val_before and not val_before & _doc_names(before.train)

    _write_files(folder, [f"g{i:03d}" for i in range(60)])
    after = load_corpus(cfg)
    assert {n for n in _doc_names(after.val) if n.startswith("f")} == val_before
    # The split follows each file's path hash, not its position.
    assert val_before == {f"f{i:03d}" for i in range(60) if stable_fraction(f"f{i:03d}.txt") < 0.2}


def test_max_chars_takes_files_from_the_whole_folder_not_the_first_names(tmp_path):
    folder = tmp_path / "docs"
    names = [f"{c}{i}" for c in "abcdefghij" for i in range(10)]
    _write_files(folder, names)
    cfg = DataConfig(source=str(folder), max_chars=2_000, val_fraction=0.1)
    corpus = load_corpus(cfg)
    assert sum(corpus.chars()) <= 2_000
    assert len({n[0] for n in _doc_names(corpus.train)}) >= 5


def test_single_text_file_is_split_by_characters(tmp_path):
    path = tmp_path / "book.md"
    text = "".join(f"line {i} of the only document\n" for i in range(200))
    path.write_text(text)
    corpus = load_corpus(DataConfig(source=str(path), val_fraction=0.1))
    assert len(corpus.train) == 1 and len(corpus.val) == 1
    assert corpus.train[0] + corpus.val[0] == text
    assert 0.05 < len(corpus.val[0]) / len(text) < 0.2


def test_jsonl_reads_the_text_field_or_joins_prompt_and_response(tmp_path):
    rows = [{"text": f"row {i} text"} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(DataConfig(source=str(tmp_path / "a.jsonl")))
    assert sorted(corpus.train + corpus.val) == sorted(r["text"] for r in rows)

    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "Q?", "response": "A."}) + "\n")
    corpus = load_corpus(DataConfig(source=str(tmp_path / "b.jsonl")))
    assert corpus.train[0] + corpus.val[0] == "Q?\n\nA."


def test_jsonl_without_text_field_names_the_fields(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(UserError, match=r"no text field 'text' \(fields: body, id\).*--text-field"):
        load_corpus(DataConfig(source=str(tmp_path / "c.jsonl")))


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(UserError, match=f"Corpus path {missing} does not exist"):
        load_corpus(DataConfig(source=str(missing)))


@pytest.mark.parametrize("content", ["", "   \n\n  "])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="is empty"):
        load_corpus(DataConfig(source=str(path)))


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no documents"):
        load_corpus(DataConfig(source=str(tmp_path)))


def test_unloadable_dataset_name_says_offline_and_suggests_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not be loaded.*offline.*pass a local file or folder path"):
        load_corpus(DataConfig(source="made-up-user-zz/no-such-dataset-qq"))


def test_dataset_name_reads_rows_of_every_split(monkeypatch):
    import datasets

    from moe_understudy.data import corpus as corpus_module

    loaded = {}

    def fake_load(name, config=None, split=None):
        loaded["args"] = (name, config, split)
        rows = {"text": [f"row {i} of the set" for i in range(40)], "n": list(range(40))}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})

    monkeypatch.setattr(corpus_module, "load_hf_dataset", fake_load)
    corpus = load_corpus(DataConfig(source="someone/set:small", val_fraction=0.2))
    assert loaded["args"] == ("someone/set", "small", None)
    assert sorted(corpus.train + corpus.val) == sorted(f"row {i} of the set" for i in range(40))
    assert corpus.train and corpus.val


def test_domain_shift_text_is_capped_and_not_in_the_default_training_text():
    shift = domain_shift_texts(max_chars=60_000)
    assert shift and sum(map(len, shift)) <= 60_000
    training = "\x00".join(load_corpus(DataConfig()).train)
    assert min(map(len, shift)) >= 100
    for text in shift:
        assert text.strip()[:200] not in training


def test_python_corpus_is_the_stdlib_documents_under_the_same_keys_plus_site_packages():
    from moe_understudy.data.corpus import document_splits, python_documents

    stdlib_keys = [key for key, _ in stdlib_documents()]
    python_keys = [key for key, _ in python_documents()]
    assert python_keys[: len(stdlib_keys)] == stdlib_keys
    site = python_keys[len(stdlib_keys) :]
    assert site and site == sorted(site) and all(k.startswith("site-packages/") for k in site)
    assert not set(site) & set(stdlib_keys)
    assert "site-packages/typer/__init__.py" in site
    for banned in ("/tests/", "/test/", "__pycache__", ".dist-info/", "moe_understudy"):
        assert not any(banned in k for k in site), banned
    # The split is a function of the key: every stdlib document keeps its split.
    on_stdlib = document_splits(stdlib_keys, 0.05)
    on_python = document_splits(python_keys, 0.05)
    assert {k: on_python[k] for k in stdlib_keys} == on_stdlib
    assert any(on_stdlib.values())


def test_python_corpus_is_capped_keeps_stdlib_splits_and_takes_site_packages_docs():
    from moe_understudy.data.corpus import document_splits, pick_documents, python_documents

    cfg = DataConfig(source="python", max_chars=200_000, val_fraction=0.1)
    train, val = pick_documents(python_documents(), cfg)
    assert sum(len(t) for _, t in train + val) <= cfg.max_chars
    assert any(k.startswith("site-packages/") for k, _ in train)
    stdlib_val = {k for k, v in document_splits((k for k, _ in stdlib_documents()), 0.1).items() if v}
    picked_stdlib = [(k, k in dict(val)) for k, _ in train + val if not k.startswith("site-packages/")]
    assert picked_stdlib and all(is_val == (k in stdlib_val) for k, is_val in picked_stdlib)
    corpus = load_corpus(cfg)
    assert corpus.name == "python"
    assert corpus.train == [t for _, t in train] and corpus.val == [t for _, t in val]
    assert sum(corpus.chars()) <= cfg.max_chars


def test_site_packages_documents_skip_tests_caches_metadata_and_this_project(tmp_path):
    from moe_understudy.data.corpus import site_packages_documents

    files = {
        "pkg/__init__.py": "x = 1\n",
        "pkg/README.md": "# pkg\n",
        "pkg/sub/docs.rst": "Docs\n====\n",
        "pkg/NOTES.txt": "notes\n",
        "pkg/data.bin": "binary-ish\n",
        "pkg/tests/test_x.py": "def test(): pass\n",
        "pkg/test/helper.py": "y = 2\n",
        "pkg/__pycache__/a.py": "z = 3\n",
        "pkg-1.0.dist-info/METADATA.txt": "Name: pkg\n",
        "moe_understudy/cli.py": "print()\n",
        "__editable___moe_understudy_0_1_0_finder.py": "MAPPING = {}\n",
        "single.py": "w = 4\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    docs = site_packages_documents(tmp_path)
    assert [k for k, _ in docs] == [
        "site-packages/pkg/NOTES.txt",
        "site-packages/pkg/README.md",
        "site-packages/pkg/__init__.py",
        "site-packages/pkg/sub/docs.rst",
        "site-packages/single.py",
    ]
    assert dict(docs)["site-packages/pkg/README.md"]() == "# pkg\n"
