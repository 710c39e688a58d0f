"""A slide held for review on the real stack: a generated Aperio slide with a field no rule
knows is held (NEEDS_REVIEW, raw copy kept), a data steward approves it with a rule, it is
de-identified, tiled and READY, the raw copy is erased, the decision is audited, and the rule
stays with the dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from services.cli.client import TERMINAL, TesseraClient
from services.shared.adapters.s3 import S3ObjectStore
from services.shared.grpc.interceptors import REASON_KEY
from services.shared.settings import BucketSettings
from tessera.access.v1 import access_pb2
from tessera.common.v1 import common_pb2
from tessera.deid.v1 import deid_pb2
from tests.fixtures import wsigen

from .conftest import REPO, S3, role, token

pytestmark = pytest.mark.e2e
BUCKETS = BucketSettings()
FIELD = ("Scanner Mode", "E2E-HIGHRES-7Q4Z")
KEY = "svs:Scanner Mode"


def _reason(exc: aio.AioRpcError) -> str:
    return str(dict(exc.trailing_metadata() or ()).get(REASON_KEY, ""))


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return exc.code(), _reason(exc)
    return grpc.StatusCode.OK, ""


async def test_held_slide_approved_by_a_steward(tmp_path: Path) -> None:
    dataset = f"e2e-review-{uuid.uuid4().hex[:8]}"
    steward = f"e2e-steward-{uuid.uuid4().hex[:6]}"
    reader = f"e2e-reader-{uuid.uuid4().hex[:6]}"
    fx = wsigen.aperio_svs(tmp_path, np.random.default_rng(17), name="held", extra_fields=[FIELD])
    store = S3ObjectStore(S3[0], S3[1], S3[2], secure=False)
    async with (
        TesseraClient(token(steward, ("admin",))) as c,
        TesseraClient(token(reader)) as r,
    ):
        # created by the steward (an administrator), who thus holds the steward role
        await c.create_dataset(dataset, "review e2e")
        await c.grant(dataset, reader, role("researcher"), days=1)
        md = common_pb2.ClinicalMetadata(stain="H&E", case_id="E2E-REVIEW-CASE-5521")
        slide_id = (await c.upload(fx.path, dataset, md)).slide_id

        held = await c.wait(slide_id, timeout_s=120)
        assert held.status == common_pb2.SLIDE_STATUS_NEEDS_REVIEW, held
        steps = [(t.status, t.reason) for t in held.timeline]
        assert (common_pb2.SLIDE_STATUS_NEEDS_REVIEW, "UNKNOWN_SVS_FIELD") in steps
        assert await store.stat(BUCKETS.quarantine, f"slides/{slide_id}") is not None
        report = await c.deid.GetDeidentificationReport(
            deid_pb2.GetDeidentificationReportRequest(slide_id=slide_id)
        )
        assert report.outcome == deid_pb2.DEID_OUTCOME_NEEDS_REVIEW
        assert [i.key for i in report.review_items] == [KEY]
        assert FIELD[1] not in str(report) and not report.HasField("quarantine_erased_at")
        listed = await c.deid.ListReviews(deid_pb2.ListReviewsRequest(dataset_id=dataset))
        assert [x.slide_id for x in listed.reviews] == [slide_id]

        approve = deid_pb2.ApproveSlideRequest(
            slide_id=slide_id, rules=[deid_pb2.Rule(key=KEY, action=deid_pb2.RULE_ACTION_REMOVE)]
        )
        # only a steward; an unknown slide is NOT_FOUND; a missing rule is refused
        assert (await _code(r.deid.ApproveSlide(approve)))[0] == grpc.StatusCode.PERMISSION_DENIED
        assert (await _code(r.deid.RejectSlide(deid_pb2.RejectSlideRequest(slide_id=slide_id))))[
            0
        ] == grpc.StatusCode.PERMISSION_DENIED
        unknown = deid_pb2.ApproveSlideRequest(slide_id=str(uuid.uuid4()), rules=approve.rules)
        assert (await _code(c.deid.ApproveSlide(unknown)))[0] == grpc.StatusCode.NOT_FOUND
        other = deid_pb2.ApproveSlideRequest(
            slide_id=slide_id,
            rules=[deid_pb2.Rule(key="svs:Other", action=deid_pb2.RULE_ACTION_KEEP)],
        )
        assert await _code(c.deid.ApproveSlide(other)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "RULES_INCOMPLETE",
        )

        resp = await c.deid.ApproveSlide(approve)
        assert resp.outcome == deid_pb2.DEID_OUTCOME_DEIDENTIFIED, resp
        ready = await c.wait(slide_id, timeout_s=180, until=frozenset(TERMINAL))
        assert ready.status == common_pb2.SLIDE_STATUS_READY, ready
        order = [t.status for t in sorted(ready.timeline, key=lambda t: t.at.ToDatetime())]
        assert order.index(common_pb2.SLIDE_STATUS_NEEDS_REVIEW) < order.index(
            common_pb2.SLIDE_STATUS_DEIDENTIFIED
        )

        # the raw copy is gone, and the report says when and why
        assert await store.stat(BUCKETS.quarantine, f"slides/{slide_id}") is None
        report = await c.deid.GetDeidentificationReport(
            deid_pb2.GetDeidentificationReportRequest(slide_id=slide_id)
        )
        assert report.outcome == deid_pb2.DEID_OUTCOME_DEIDENTIFIED
        assert report.HasField("quarantine_erased_at")
        assert report.quarantine_erasure_reason == "VERIFIED_COPY_STORED"

        out = tmp_path / "out.svs"
        await c.fetch(slide_id, out)
        data = out.read_bytes()
        assert b"Scanner Mode" not in data and FIELD[1].encode() not in data
        for value in fx.planted_values:
            assert value not in data
        assert b"E2E-REVIEW-CASE-5521" not in data

        # decided: no second decision
        code, reason = await _code(c.deid.ApproveSlide(approve))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_IN_REVIEW")

        # the rule stays with the dataset, and the decisions are in the audit trail
        policy = (
            await c.deid.GetDatasetPolicy(deid_pb2.GetDatasetPolicyRequest(dataset_id=dataset))
        ).policy
        assert [(x.key, x.action, x.approved_by) for x in policy.rules] == [
            (KEY, deid_pb2.RULE_ACTION_REMOVE, steward)
        ]
        audit = await c.access.ListAuditRecords(
            access_pb2.ListAuditRecordsRequest(
                dataset_id=dataset, resource=f"slide/{slide_id}/deid-review/approve"
            )
        )
        decisions = {(a.subject, a.allowed) for a in audit.records}
        assert (steward, True) in decisions and (reader, False) in decisions
        assert all(a.action == access_pb2.ACTION_REVIEW for a in audit.records)

        # a later slide of the dataset with the same field goes straight through
        fx2 = wsigen.aperio_svs(
            tmp_path, np.random.default_rng(18), name="later", extra_fields=[FIELD]
        )
        later = (await c.upload(fx2.path, dataset, md)).slide_id
        done = await c.wait(later, timeout_s=180)
        assert done.status == common_pb2.SLIDE_STATUS_READY, done
        assert common_pb2.SLIDE_STATUS_NEEDS_REVIEW not in [t.status for t in done.timeline]


def _cli(tok: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TESSERA_TOKEN=tok)
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_review_reject_and_policy(tmp_path: Path) -> None:
    """The `tessera` commands a steward uses: a dataset created with a policy, an upload that
    waits and stops at NEEDS_REVIEW (exit 5), review list/show, reject (raw copy erased)."""
    dataset = f"e2e-cli-review-{uuid.uuid4().hex[:8]}"
    tok = token(f"e2e-cli-steward-{uuid.uuid4().hex[:6]}", ("admin",))
    made = _cli(tok, "dataset", dataset, "--dates", "year-only", "--retention-hours", "0")
    assert made.returncode == 0, made.stderr
    assert "dates     YEAR_ONLY" in made.stdout
    shown = _cli(tok, "policy", dataset, "--json")
    assert json.loads(shown.stdout)["dates"] == "DATE_POLICY_YEAR_ONLY", shown.stdout
    fx = wsigen.aperio_svs(tmp_path, np.random.default_rng(23), name="cli", extra_fields=[FIELD])
    up = _cli(tok, "upload", str(fx.path), "--dataset", dataset, "--wait", "--timeout", "120")
    assert up.returncode == 5, (up.stdout, up.stderr)
    assert f"held      {KEY}  (UNKNOWN_SVS_FIELD" in up.stdout
    assert FIELD[1] not in up.stdout
    slide_id = up.stdout.split()[1]
    listed = json.loads(_cli(tok, "review", "list", "--dataset", dataset, "--json").stdout)
    assert [r["slide_id"] for r in listed["reviews"]] == [slide_id]
    status = _cli(tok, "status", slide_id)
    assert "NEEDS_REVIEW" in status.stdout and KEY in status.stdout
    rejected = _cli(tok, "review", "reject", slide_id)
    assert rejected.returncode == 0 and "raw copy erased" in rejected.stdout, rejected.stderr
    show = _cli(tok, "review", "show", slide_id)
    assert "outcome   REJECTED" in show.stdout and "(REVIEW_REJECTED)" in show.stdout
    again = _cli(tok, "review", "reject", slide_id)
    assert again.returncode == 1 and "FAILED_PRECONDITION (NOT_IN_REVIEW)" in again.stderr
