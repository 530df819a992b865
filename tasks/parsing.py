"""Turning a document's bytes into text: plain text, Markdown, HTML, PDF and DOCX.

Each parser returns a ParsedDocument or raises ParseError with a reason a person can act on.
Structure is kept as Markdown headings (HTML and DOCX headings become '#' lines) so the
chunker can split on it and record heading paths.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass, field

from tasks.errors import ParseError

log = logging.getLogger(__name__)

MARKDOWN_EXTENSIONS = (".md", ".markdown")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_BLANKS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t\u00a0]+")


@dataclass(slots=True)
class ParsedDocument:
    """A document's text and what we know about it."""

    doc_id: str
    text: str
    title: str = ""
    markdown: bool = False
    #: character offset at which each PDF page starts (page 1 first), else empty
    page_starts: list[int] = field(default_factory=list)


def decode_text(data: bytes) -> str:
    """Decode bytes of unknown encoding; ParseError for binary or undecodable content."""
    if not data.strip():
        raise ParseError("empty file")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    head = data[:8192]
    if b"\x00" in head:
        raise ParseError("binary content under a text extension (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise ParseError("undecodable text: no character encoding fits; convert it to UTF-8")
    text = str(best)
    if len(_CONTROL.findall(text[:8192])) > 0.05 * max(1, len(text[:8192])):
        raise ParseError("binary content under a text extension")
    return text


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def clean_text(text: str) -> str:
    """Normalised newlines and spaces, no control characters, at most one blank line."""
    return _clean(text)


def first_heading(text: str) -> str:
    """A title for a text: its first Markdown heading, else its first line."""
    return _first_heading(text)


def _first_heading(text: str) -> str:
    for line in text.split("\n", 200)[:200]:
        m = re.match(r"#{1,6}\s+(.+)", line)
        if m:
            return m.group(1).strip()
    for line in text.split("\n", 20)[:20]:
        if line.strip():
            return line.strip()[:200]
    return ""


def parse_plain(doc_id: str, data: bytes, markdown: bool = False) -> ParsedDocument:
    text = _clean(decode_text(data))
    if not text:
        raise ParseError("empty document: no text after decoding")
    return ParsedDocument(doc_id, text, _first_heading(text), markdown=markdown)


def parse_html(doc_id: str, data: bytes) -> ParsedDocument:
    import html_text
    import lxml.html
    from lxml.etree import ParserError

    text = _without_xml_declaration(_decode_declared(data))
    try:
        tree = lxml.html.document_fromstring(text)
    except (ParserError, ValueError) as exc:
        raise ParseError(f"not parseable as HTML: {exc}") from exc
    title_el = tree.find(".//title")
    title = (title_el.text_content().strip() if title_el is not None else "") or ""
    for el in tree.xpath("//script|//style|//noscript|//template|//svg|//head"):
        el.drop_tree()
    for el in tree.xpath("//h1|//h2|//h3|//h4|//h5|//h6"):
        level = int(el.tag[1])
        heading = " ".join(el.text_content().split())
        for child in list(el):
            el.remove(child)
        el.text = "#" * level + " " + heading
    body = html_text.extract_text(tree, guess_layout=True)
    body = _clean(body)
    if not body:
        raise ParseError("HTML page has no visible text")
    return ParsedDocument(doc_id, body, title or _first_heading(body), markdown=True)


_XML_DECL = re.compile(rb"^\s*<\?xml[^>]*?encoding=[\"']([A-Za-z0-9._-]+)[\"'][^>]*\?>")


def _decode_declared(data: bytes) -> str:
    """XHTML's `<?xml ... encoding="..."?>` names its encoding: use it; else detect."""
    m = _XML_DECL.match(data[:512])
    if m:
        try:
            return data.decode(m.group(1).decode("ascii"))
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong declaration: detect instead
    return decode_text(data)


def _without_xml_declaration(text: str) -> str:
    # lxml refuses a str that still declares an encoding (the text is decoded already)
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", text, count=1)


#: a DOCX expands its XML parts; anything beyond this is a zip bomb or not a document
MAX_DOCX_UNCOMPRESSED = 512 * 2**20
MAX_DOCX_RATIO = 200


def _check_docx_size(data: bytes) -> None:
    """Refuse a DOCX whose parts would decompress to more than MAX_DOCX_UNCOMPRESSED, or at
    an implausible ratio, before python-docx inflates anything."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ParseError(f"corrupt or non-DOCX file: {exc}") from exc
    if total > MAX_DOCX_UNCOMPRESSED or (total > 32 * 2**20 and total > MAX_DOCX_RATIO * len(data)):
        raise ParseError(
            f"DOCX would expand to {total / 2**20:.0f} MB from {len(data) / 2**20:.1f} MB (a zip "
            "bomb, or a document far too large to index): refused"
        )


#: PDFium is not thread-safe, and the default runner parses batches in two threads
_PDFIUM_LOCK = threading.Lock()


def parse_pdf(doc_id: str, data: bytes) -> ParsedDocument:
    with _PDFIUM_LOCK:
        return _parse_pdf(doc_id, data)


def _parse_pdf(doc_id: str, data: bytes) -> ParsedDocument:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        msg = str(exc).lower()
        if "password" in msg:
            raise ParseError("password-protected PDF: remove the password to index it") from exc
        raise ParseError(f"corrupt or unreadable PDF: {exc}") from exc
    try:
        parts: list[str] = []
        starts: list[int] = []
        pos = 0
        for i in range(len(pdf)):
            page = pdf[i]
            textpage = page.get_textpage()
            page_text = _clean(textpage.get_text_range())
            textpage.close()
            page.close()
            starts.append(pos)
            parts.append(page_text)
            pos += len(page_text) + 2
        meta = pdf.get_metadata_dict()
    except pdfium.PdfiumError as exc:
        raise ParseError(f"corrupt PDF page: {exc}") from exc
    finally:
        pdf.close()
    text = "\n\n".join(parts)
    if not text.strip():
        raise ParseError("PDF has no extractable text (scanned images need OCR first)")
    title = (meta.get("Title") or "").strip() or _first_heading(text)
    return ParsedDocument(doc_id, text, title, markdown=False, page_starts=starts)


def parse_docx(doc_id: str, data: bytes) -> ParsedDocument:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    _check_docx_size(data)
    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, OSError) as exc:
        raise ParseError(f"corrupt or non-DOCX file: {exc}") from exc
    except Exception as exc:  # zipfile.BadZipFile and lxml errors from broken packages
        raise ParseError(f"corrupt DOCX file: {type(exc).__name__}: {exc}") from exc
    lines: list[str] = []
    for block in document.iter_inner_content():
        if hasattr(block, "rows"):  # a table
            for row in block.rows:
                cells = [" ".join(c.text.split()) for c in row.cells]
                lines.append(" | ".join(c for c in cells if c))
            lines.append("")
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name if block.style is not None else "") or ""
        m = re.match(r"Heading (\d)", style)
        if style == "Title":
            lines.append("# " + text)
        elif m:
            lines.append("#" * min(6, int(m.group(1))) + " " + text)
        else:
            lines.append(text)
        lines.append("")
    body = _clean("\n".join(lines))
    if not body:
        raise ParseError("DOCX has no text")
    title = (document.core_properties.title or "").strip() or _first_heading(body)
    return ParsedDocument(doc_id, body, title, markdown=True)


def parse_document(doc_id: str, name: str, data: bytes) -> ParsedDocument:
    """Parse a file's bytes by its extension."""
    lower = name.lower()
    if lower.endswith((".html", ".htm")):
        return parse_html(doc_id, data)
    if lower.endswith(".pdf"):
        return parse_pdf(doc_id, data)
    if lower.endswith(".docx"):
        return parse_docx(doc_id, data)
    return parse_plain(doc_id, data, markdown=lower.endswith(MARKDOWN_EXTENSIONS))


def record_document(doc_id: str, title: str, text: str) -> ParsedDocument:
    """A record's document: the title, a blank line, the text."""
    body = _clean(text)
    if not body and not title:
        raise ParseError("record has neither title nor text")
    full = f"{title}\n\n{body}" if title and body else (title or body)
    return ParsedDocument(doc_id, full, title)
