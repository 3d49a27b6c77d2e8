"""Wikitext to plain prose: the demo pack's reader of a Wikipedia XML dump (templates, tables, links,
references and tail sections removed)."""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

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


def read_wiki_dump(path: Path) -> Iterator[str]:
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
