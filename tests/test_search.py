"""Search over the ingested sample corpus: the right document ranks first, in English and
Korean, in every mode that can answer."""

from __future__ import annotations

import pytest

from flows.ingest import run_ingest
from tasks.errors import TableError
from tasks.search import search
from tasks.settings import IngestParams
from tasks.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    from .conftest import SAMPLES

    db = tmp_path_factory.mktemp("search") / "db"
    run_ingest(
        IngestParams.model_validate({"source": {"uri": str(SAMPLES)}, "store": {"uri": str(db)}})
    )
    return Store(str(db))


@pytest.mark.parametrize(
    ("query", "expected", "modes"),
    [
        (
            "how many vacation days do I get",
            "reports/vacation-policy.html",
            ("vector", "fts", "hybrid"),
        ),
        ("what to do when the API returns 429", "guides/troubleshooting.md", ("vector", "hybrid")),
        ("hotel cost limit on business trips", "reports/expenses.pdf", ("vector", "hybrid")),
        ("descale the coffee machine", "guides/coffee.txt", ("vector", "fts", "hybrid")),
        ("비밀번호 변경 주기", "ko/security.txt", ("fts", "hybrid")),
        ("회사 식당 점심 시간", "ko/onboarding.md", ("fts", "hybrid")),
        ("재택근무 가능 일수", "ko/remote-work.docx", ("fts", "hybrid")),
    ],
)
def test_right_document_ranks_first(sample_store, query, expected, modes):
    for mode in modes:
        hits = search(sample_store, query, mode=mode, k=3)
        assert hits and hits[0].doc_id == expected, (mode, [h.doc_id for h in hits])


def test_empty_table_and_empty_query_are_clear_errors(tmp_path, sample_store):
    with pytest.raises(TableError, match="lanceflow ingest"):
        search(Store(str(tmp_path / "none")), "anything")
    from tasks.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        search(sample_store, "   ")
