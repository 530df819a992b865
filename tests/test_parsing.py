"""Pure units: one parser per format, and the bad inputs each must refuse clearly."""

from __future__ import annotations

import io

import pytest

from tasks.errors import ParseError
from tasks.parsing import decode_text, parse_document, record_document

from .conftest import SAMPLES


def test_markdown_keeps_text_and_title():
    doc = parse_document("guides/setup.md", "setup.md", (SAMPLES / "guides/setup.md").read_bytes())
    assert doc.markdown
    assert doc.title == "Setting up the reindex worker"
    assert "## Scheduling" in doc.text


def test_html_visible_text_only():
    data = (SAMPLES / "reports/vacation-policy.html").read_bytes()
    doc = parse_document("v", "vacation-policy.html", data)
    assert doc.title == "Vacation policy"
    assert "twenty-five days" in doc.text
    assert "tracking code" not in doc.text and "console.log" not in doc.text
    assert "font-family" not in doc.text
    assert "# Vacation policy" in doc.text  # headings kept as structure


def test_pdf_text_pages_and_title():
    doc = parse_document("e", "expenses.pdf", (SAMPLES / "reports/expenses.pdf").read_bytes())
    assert doc.title == "Expense reimbursement handbook"
    assert len(doc.page_starts) == 2
    assert doc.text[doc.page_starts[1] :].startswith("Travel")


def test_docx_korean_headings():
    doc = parse_document("r", "remote-work.docx", (SAMPLES / "ko/remote-work.docx").read_bytes())
    assert doc.title == "원격 근무 지침"
    assert "## 근무 시간" in doc.text
    assert "재택근무" in doc.text


@pytest.mark.parametrize("encoding", ["euc-kr", "cp949", "utf-16", "utf-8-sig"])
def test_korean_text_in_legacy_encodings_comes_through(encoding):
    text = "비밀번호는 최소 열두 자 이상이어야 하며 석 달마다 변경해야 합니다. " * 5
    assert decode_text(text.encode(encoding)).strip() == text.strip()


def test_latin1_text_is_decoded_not_refused():
    # single-byte Western encodings are ambiguous (latin-1 vs cp1250 differ in a few letters);
    # the common accented letters must come through and nothing is refused
    text = "Le café coûte deux euros à la cantine, même le déjeuner est bon marché. " * 4
    decoded = decode_text(text.encode("latin-1"))
    assert "café" in decoded and "déjeuner" in decoded and "marché" in decoded


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.txt", b"", "empty"),
        ("blank.md", b"  \n\n \t", "empty"),
        ("binary.txt", b"\x00\x01\x02\x89PNG\r\n" * 100, "binary"),
        ("bad.pdf", b"%PDF-1.4 this is not really a pdf", "PDF"),
        ("bad.docx", b"PK\x03\x04 not a zip", "DOCX"),
        ("page.html", b"<html><script>var x=1;</script></html>", "no visible text"),
    ],
)
def test_bad_input_raises_clear_parse_error(name, data, reason):
    with pytest.raises(ParseError, match=reason):
        parse_document(name, name, data)


def test_password_protected_pdf_is_refused():
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(SAMPLES / "reports/expenses.pdf"))
    writer.encrypt("secret")
    buf = io.BytesIO()
    writer.write(buf)
    with pytest.raises(ParseError, match="password"):
        parse_document("p", "locked.pdf", buf.getvalue())


def test_record_document_joins_title_and_text():
    doc = record_document("42", "A title", "Body text.")
    assert doc.text == "A title\n\nBody text." and doc.title == "A title"
    with pytest.raises(ParseError):
        record_document("43", "", "   ")


def test_xhtml_with_an_encoding_declaration():
    body = (
        '<?xml version="1.0" encoding="EUC-KR"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml"><head><title>보안 규정</title></head>'
        "<body><h1>비밀번호</h1><p>비밀번호는 90일마다 변경합니다.</p></body></html>"
    )
    doc = parse_document("x", "rules.xhtml.html", body.encode("euc-kr"))
    assert doc.title == "보안 규정"
    assert "90일마다 변경" in doc.text and "# 비밀번호" in doc.text
    utf8 = body.replace("EUC-KR", "UTF-8").encode("utf-8")
    assert "90일마다" in parse_document("x", "r.htm", utf8).text


def test_docx_zip_bomb_is_refused_before_inflating():
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        # 600 MB of zeros compress to well under 1 MB
        with zf.open("word/document.xml", "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(600):
                fh.write(block)
    data = buf.getvalue()
    assert len(data) < 2 * 2**20
    with pytest.raises(ParseError, match="zip bomb"):
        parse_document("b", "bomb.docx", data)
