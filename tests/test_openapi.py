"""/openapi.json describes exactly the routes the app has, every status the error
table can answer, and the answers of the access check (issue 10)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from nurseryd.http.errors import ERROR_TABLE
from nurseryd.http.openapi import ACCESS_ANSWERS, document
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    async with run_daemon(make_settings(database_url, state_dir)) as running:
        yield running


def app_operations(daemon: InProcessDaemon) -> set[tuple[str, str]]:
    app = daemon_app(daemon)
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) & METHODS:
            found.add((path, method.lower()))
    return found


def daemon_app(daemon: InProcessDaemon) -> Any:
    from nurseryd.features import FEATURES
    from nurseryd.http.app import create_app

    return create_app(daemon.services, FEATURES)


def documented(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, operations in spec["paths"].items()
            for method in operations}


async def test_the_document_and_the_routes_agree(daemon: InProcessDaemon) -> None:
    served = await daemon.client.get("/openapi.json")
    assert served.status_code == 200
    spec = served.json()
    assert spec["openapi"].startswith("3.1")
    in_app, in_spec = app_operations(daemon), documented(spec)
    assert in_app - in_spec == set(), "routes missing from the OpenAPI document"
    assert in_spec - in_app == set(), "documented operations the app does not have"


def test_every_status_of_the_error_table_is_documented() -> None:
    spec = document()
    statuses = {status for operations in spec["paths"].values()
                for operation in operations.values() for status in operation["responses"]}
    table = {str(status) for status, _ in ERROR_TABLE.values()}
    assert table - statuses == set()


def test_every_protected_operation_lists_the_access_answers() -> None:
    spec = document()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "500" in responses
            if path in ("/healthz", "/readyz"):
                assert operation["security"] == [] and "401" not in responses
                continue
            assert set(ACCESS_ANSWERS) <= set(responses), (path, method)
            if method == "post" and path != "/migration/excel":
                assert "415" in responses, (path, method)


def test_operation_ids_are_unique() -> None:
    ids = [operation["operationId"] for operations in document()["paths"].values()
           for operation in operations.values()]
    assert len(ids) == len(set(ids))
