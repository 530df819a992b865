"""Regenerate the PDF and DOCX files of the sample corpus (committed; run only to change them).

python samples/make_binary_samples.py
"""

from pathlib import Path

import docx
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

HERE = Path(__file__).parent / "corpus"


def make_pdf(path: Path) -> None:
    c = canvas.Canvas(str(path), pagesize=A4)
    c.setTitle("Expense reimbursement handbook")
    pages = [
        [
            "Expense reimbursement handbook",
            "",
            "Employees are reimbursed for travel, meals and equipment bought for work.",
            "Keep every receipt and upload it within thirty days of the purchase.",
        ],
        [
            "Travel",
            "",
            "Book trains and flights through the travel desk. Economy class is the default;",
            "business class needs the approval of a director for flights above six hours.",
            "Hotel costs are capped at 180 euros per night in most European cities.",
        ],
    ]
    for lines in pages:
        y = 800
        for line in lines:
            c.drawString(72, y, line)
            y -= 18
        c.showPage()
    c.save()


def make_docx(path: Path) -> None:
    d = docx.Document()
    d.core_properties.title = "원격 근무 지침"
    d.add_heading("원격 근무 지침", level=1)
    d.add_paragraph("모든 직원은 일주일에 최대 이틀까지 재택근무를 할 수 있습니다.")
    d.add_heading("근무 시간", level=2)
    d.add_paragraph(
        "핵심 근무 시간은 오전 열 시부터 오후 네 시까지이며 "
        "이 시간에는 메신저에 접속해 있어야 합니다."
    )
    d.add_heading("장비 지원", level=2)
    d.add_paragraph("회사는 모니터와 키보드를 지원하며 인터넷 요금의 절반을 보조합니다.")
    d.save(str(path))


if __name__ == "__main__":
    make_pdf(HERE / "reports" / "expenses.pdf")
    make_docx(HERE / "ko" / "remote-work.docx")
