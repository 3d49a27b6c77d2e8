"""Domain registry parsing, local loading through `datasets`, and its errors."""

import json

import pytest

from dive_ds.data.registry import iter_documents, load_registry


def _write(tmp_path, obj, name="reg.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i} " * 20}) for i in range(5)))
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"line one of {i}\nline two\n")
    reg = _write(
        tmp_path,
        "version: 1\ndomains:\n  js: {family: f1, source: {type: local, files: a.jsonl, text_field: body}}\n"
        "  tx: {source: {type: local, files: ['txt/*.txt']}}\n",
        "reg.yaml",
    )
    r = load_registry(reg)
    assert list(r.domains) == ["js", "tx"] and r.domains["js"].family == "f1"
    docs = list(iter_documents(r.domains["js"]))
    assert len(docs) == 5 and docs[0].startswith("doc 0")
    txt = list(iter_documents(r.domains["tx"]))
    assert len(txt) == 3 and txt[0] == "line one of 0\nline two\n"  # one document per file
    assert (
        len(list(iter_documents(r.domains["js"], max_chars=250))) == 3
    )  # 120-char docs: stops once 250 is passed


@pytest.mark.parametrize(
    "content,msg",
    [
        ("", "file is empty"),
        ({"domains": {}, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
        (
            {"domains": {"a": {"source": {"type": "local", "files": "x.jsonl"}, "colour": "red"}}},
            r"unknown key\(s\) \['colour'\]",
        ),
        ({"domains": {"a": {"source": {"type": "ftp"}}}}, "source.type` must be one of"),
        (
            {"domains": {"a": {"source": {"type": "local", "files": "missing.jsonl"}}}},
            "no file matches 'missing.jsonl'",
        ),
        ({"domains": {"a": {"source": {"type": "hub"}}}}, "hub source needs `id`"),
        (
            {"domains": {"a": {"source": {"type": "demo", "name": "klingon"}}}},
            "unknown demo domain 'klingon'",
        ),
    ],
)
def test_registry_errors(tmp_path, content, msg):
    with pytest.raises(ValueError, match=msg):
        load_registry(_write(tmp_path, content))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_registry(tmp_path / "nope.yaml")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_registry(
            _write(tmp_path, {"domains": {"a": {"source": {"type": "local", "files": "empty.jsonl"}}}})
        )


def test_wrong_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    r = load_registry(_write(tmp_path, {"domains": {"a": {"source": {"type": "local", "files": "a.jsonl"}}}}))
    with pytest.raises(ValueError, match="no field 'text'.*set `text_field`"):
        list(iter_documents(r.domains["a"]))


def test_unknown_domain_selection(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    r = load_registry(_write(tmp_path, {"domains": {"a": {"source": {"type": "local", "files": "a.jsonl"}}}}))
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['b'\]"):
        r.select(["b"])
