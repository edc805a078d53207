"""The bound on refusal audit lines: per client and reason, at most N lines a minute, then one line with the
count left out (at the next minute's first refusal, at eviction, or on shutdown). The clock is the test's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from vila_m3.audit import AuditLog
from vila_m3.refusal_budget import RefusalBudget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))
from lib.audit_refusals import RefusalAuditMiddleware, note_refusal, refusals_per_minute  # noqa: E402

pytestmark = pytest.mark.security


MINUTE = 1_700_000_040.0  # the start of a minute (a multiple of 60 s)


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float = MINUTE + 20.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_three_a_minute_then_the_count_at_the_next_minutes_first_refusal():
    clock = Clock()
    budget = RefusalBudget(per_minute=3, clock=clock)
    results = [budget.admit("10.0.0.1", "token not valid", last=i) for i in range(10)]
    assert [admitted for admitted, _ in results] == [True] * 3 + [False] * 7
    assert all(due == [] for _, due in results)
    # another client and another reason have their own budgets
    assert budget.admit("10.0.0.2", "token not valid")[0] is True
    assert budget.admit("10.0.0.1", "missing role")[0] is True
    clock.now += 60
    admitted, due = budget.admit("10.0.0.1", "token not valid")
    assert admitted is True
    assert [(item.reason, item.count, item.minute_start, item.last) for item in due] == \
        [("token not valid", 7, MINUTE, 9)]
    assert budget.flush() == []  # nothing left out in the new minute, and the old count was handed back once


def test_the_count_is_handed_back_on_flush_and_memory_is_bounded():
    clock = Clock()
    budget = RefusalBudget(per_minute=1, max_clients=3, clock=clock)
    for _ in range(4):
        budget.admit("10.0.0.1", "login required", last="first")
    for address in ("10.0.0.2", "10.0.0.3"):
        budget.admit(address, "login required")
    assert budget.tracked() == 3
    # a fourth client evicts the least recently refused one, whose count comes back then
    admitted, due = budget.admit("10.0.0.4", "login required")
    assert admitted is True and budget.tracked() == 3
    assert [(item.count, item.last) for item in due] == [(3, "first")]
    for _ in range(3):
        budget.admit("10.0.0.4", "login required", last="fourth")
    assert [(item.count, item.last) for item in budget.flush()] == [(3, "fourth")]
    assert budget.tracked() == 0 and budget.flush() == []


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RefusalBudget(per_minute=0)
    assert refusals_per_minute({}) == 60
    assert refusals_per_minute({"audit_refusals_per_minute": "3"}) == 3
    for bad in ("0", "-1", "ten", "1.5"):
        with pytest.raises(ValueError, match="audit_refusals_per_minute"):
            refusals_per_minute({"audit_refusals_per_minute": bad})


def test_the_middleware_writes_three_lines_then_one_suppressed_line(tmp_path: Path):
    """The real middleware and audit log in front of a route refusing every request with 401."""
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl")
    server = FastAPI()

    @server.get("/guarded")
    async def guarded() -> None:
        note_refusal("token not valid")
        raise HTTPException(401, "no")

    server.add_middleware(RefusalAuditMiddleware, log=log, budget=RefusalBudget(per_minute=3, clock=clock))
    client = TestClient(server)

    def lines() -> list[dict]:
        return [json.loads(text) for text in (tmp_path / "audit.jsonl").read_text().splitlines()]

    for _ in range(10):
        assert client.get("/guarded", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    assert [(line["reason"], line["status"], line["route"]) for line in lines()] == \
        [("token not valid", 401, "/guarded")] * 3
    clock.now += 60
    assert client.get("/guarded").status_code == 401
    written = lines()
    assert len(written) == 5, written
    suppressed, fresh = written[3], written[4]
    assert suppressed["reason"].startswith("token not valid: 7 more refusal line(s) from this client suppressed")
    assert "(at most 3 a minute)" in suppressed["reason"]
    assert (suppressed["outcome"], suppressed["status"], suppressed["route"], suppressed["method"]) == \
        ("refused", 401, "/guarded", "GET")
    assert fresh["reason"] == "token not valid"
    # shutdown: the count of the current minute is written by flush
    for _ in range(5):
        client.get("/guarded")
    middleware = server.middleware_stack
    while not isinstance(middleware, RefusalAuditMiddleware):
        middleware = middleware.app
    middleware.flush()
    assert "3 more refusal line(s)" in lines()[-1]["reason"]
    assert len(lines()) == 3 + 1 + 1 + 2 + 1
