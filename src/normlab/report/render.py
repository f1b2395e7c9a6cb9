"""One document, two renderings: Markdown (images by relative path) and self-contained HTML (images
inlined as base64). Each renderer escapes every string for its own format -- class names, file names and config
values come from users: HTML's entities in the HTML; in the Markdown only what would change its meaning, so it reads as written."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


@dataclass(frozen=True)
class Swatch:
    """A table cell naming a variant with its figure colour and marker, so tables and figures agree."""
    text: str
    color: str
    glyph: str

    def __str__(self) -> str:
        return f"{self.glyph} {self.text}"


MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, path: Path | None, caption: str) -> None:
        if path is not None and Path(path).is_file():
            self.blocks.append(("img", Path(path), caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def fold(self, summary: str) -> None:
        """Everything up to ``end_fold`` is folded away in HTML (``<details>``)."""
        self.blocks.append(("fold", summary))

    def end_fold(self) -> None:
        self.blocks.append(("end_fold",))

    def findings(self, items: list[str]) -> None:
        self.blocks.append(("findings", items))


_MD_BACKSLASH = re.compile(r"\\(?=[!-/:-@\[-`{-~])")  # a backslash that would escape the next character
_MD_TAG = re.compile(r"<(?=[A-Za-z/!?])")  # would open a tag, comment or autolink: Markdown passes raw HTML through
_MD_ENTITY = re.compile(r"&(?=#?[A-Za-z0-9]+;)")  # would be read as an entity
_MD_LINK = re.compile(r"\](?=\()")  # the "](" of a link or image
_MD_ALT = re.compile(r"[\[\]]")  # inside an image's [alt text]: every bracket


def _md_text(text: str, cell: bool = False, alt: bool = False) -> str:
    """Markdown's own escapes, only where the text would change meaning, so it reads as written (``p<0.001``,
    ``|Δ|``): a ``<`` that could open a tag, comment or autolink becomes ``&lt;`` and an ``&`` before an entity
    ``&amp;`` (the way every Markdown dialect writes a literal ``<`` there; not all take ``\\<``); a backslash
    before punctuation and the ``](`` of a link get a backslash; in table cells ``|`` and line breaks, in an
    image's alt text every bracket."""
    out = _MD_BACKSLASH.sub(r"\\\\", str(text))
    out = _MD_ENTITY.sub("&amp;", out)
    out = _MD_TAG.sub("&lt;", out)
    out = (_MD_ALT if alt else _MD_LINK).sub(lambda m: "\\" + m.group(0), out)
    if cell:
        out = out.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_markdown(doc: Doc, base: Path) -> str:
    out = [f"# {_md_text(doc.title)}", ""]
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out += [f"{'#' * block[1]} {_md_text(block[2])}", ""]
        elif kind == "p":
            out += [_md_text(block[1]), ""]
        elif kind == "code":
            out += ["```", block[1].replace("```", "'''"), "```", ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_text(h, cell=True) for h in headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(_md_text(c, cell=True) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "img":
            rel = block[1].resolve().relative_to(base.resolve()).as_posix()
            out += [f"![{_md_text(block[2], alt=True)}]({quote(rel)})", f"*{_md_text(block[2])}*", ""]
        elif kind == "fold":
            out += [f"**{_md_text(block[1])}**", ""]
        elif kind == "findings":
            out += [f"- {_md_text(item)}" for item in block[1]] + [""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd}h2{border-bottom:1px solid #eee;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left;white-space:nowrap}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:0.9em}
pre{background:#f6f8fa;padding:0.8em;overflow-x:auto}nav ul{columns:3;font-size:0.9em}
.findings{background:#f3f7fb;border-left:4px solid #0072B2;padding:0.6em 1.2em;margin:1em 0}
.findings li{margin:0.35em 0}details{margin:1em 0}summary{cursor:pointer;font-weight:600}
.sw{font-size:1.05em}
"""


def _cell(c) -> str:
    if isinstance(c, Swatch):
        return f'<span class="sw" style="color:{html.escape(c.color)}">{html.escape(c.glyph)}</span> {html.escape(c.text)}'
    return html.escape(str(c))


def to_html(doc: Doc) -> str:
    esc = html.escape
    toc = [f'<li><a href="#{_slug(b[2])}">{esc(b[2])}</a></li>' for b in doc.blocks if b[0] == "h" and b[1] == 2]
    body = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            body.append(f'<h{block[1]} id="{_slug(block[2])}">{esc(block[2])}</h{block[1]}>')
        elif kind == "p":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "code":
            body.append(f"<pre>{esc(block[1])}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{_cell(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[1].read_bytes()).decode("ascii")
            mime = MIME.get(block[1].suffix.lower(), "image/png")
            body.append(f'<figure><img src="data:{mime};base64,{data}" alt="{esc(block[2])}">'
                        f"<figcaption>{esc(block[2])}</figcaption></figure>")
        elif kind == "fold":
            body.append(f"<details><summary>{esc(block[1])}</summary>")
        elif kind == "end_fold":
            body.append("</details>")
        elif kind == "findings":
            body.append('<ul class="findings">' + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(doc.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(doc.title)}</h1><nav><ul>{''.join(toc)}</ul></nav>{''.join(body)}</body></html>\n")
