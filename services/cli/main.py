"""`tessera`: the command-line client for partner systems and operators.

Authentication: a bearer token in $TESSERA_TOKEN (or --token / --token-file). On the local
stack, `tessera token --subject alice --role admin` mints one with the stack's signing key.
Endpoints: $TESSERA_ENDPOINT_<SERVICE> (default: the local stack's ports).
Every subcommand takes --json for machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from grpc import aio

from services.cli.client import TesseraClient
from services.shared.grpc.interceptors import REASON_KEY
from services.shared.wsi import bundle
from tessera.access.v1 import access_pb2
from tessera.common.v1 import common_pb2
from tessera.deid.v1 import deid_pb2
from tessera.metadata.v1 import metadata_pb2
from tessera.serving.v1 import serving_pb2
from tessera.tiling.v1 import tiling_pb2

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SIGNING_KEY = REPO / ".tessera" / "stack" / "app" / "keys" / "issuer.pem"
ROLES = {r.removeprefix("ROLE_").lower(): v for r, v in access_pb2.Role.items() if v}
STATUSES = {
    s.removeprefix("SLIDE_STATUS_").lower(): v for s, v in common_pb2.SlideStatus.items() if v
}


EXIT_REJECTED = 3
EXIT_TIMEOUT = 4
EXIT_NEEDS_REVIEW = 5

MACRO_POLICIES = {
    "remove": deid_pb2.MACRO_POLICY_REMOVE,
    "keep-label-blanked": deid_pb2.MACRO_POLICY_KEEP_LABEL_BLANKED,
}
DATE_POLICIES = {"remove": deid_pb2.DATE_POLICY_REMOVE, "year-only": deid_pb2.DATE_POLICY_YEAR_ONLY}


class ExitCode(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True)


class Output:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def emit(self, data: dict[str, Any], text: str) -> None:
        print(json.dumps(data, indent=2, sort_keys=True) if self.json else text)


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    token = os.environ.get("TESSERA_TOKEN", "")
    if not token:
        raise SystemExit(
            "error: no token: set TESSERA_TOKEN or pass --token/--token-file "
            "(local stack: export TESSERA_TOKEN=$(tessera token --subject you "
            "--role admin))"
        )
    return token


def slide_text(s: metadata_pb2.Slide) -> str:
    lines = [
        f"slide     {s.slide_id}",
        f"dataset   {s.dataset_id}",
        f"status    {common_pb2.SlideStatus.Name(s.status).removeprefix('SLIDE_STATUS_')}",
        f"format    {common_pb2.SlideFormat.Name(s.format).removeprefix('SLIDE_FORMAT_')}",
    ]
    if s.geometry.width:
        lines.append(
            f"size      {s.geometry.width} x {s.geometry.height} px, "
            f"{len(s.geometry.levels)} levels, mpp {s.geometry.mpp_x:.4g}"
        )
    for t in s.timeline:
        status = common_pb2.SlideStatus.Name(t.status).removeprefix("SLIDE_STATUS_")
        extra = f" ({t.reason})" if t.reason else ""
        lines.append(
            f"  {t.at.ToDatetime().isoformat(timespec='milliseconds')}  "
            f"{status:<13} {t.stage}{extra}"
        )
    if s.rejection_reason:
        lines.append(f"rejected  {s.rejection_reason}: {s.rejection_detail}")
    if s.deid.removed:
        removed = ", ".join(f"{k} x{v}" for k, v in sorted(s.deid.removed.items()))
        lines.append(f"removed   {removed}")
    if s.pyramid.descriptor_key:
        lines.append(f"pyramid   {s.pyramid.level_count} levels, {s.pyramid.tile_count} tiles")
    for r in s.inference:
        lines.append(
            f"inference {r.model_name} v{r.model_version}: tissue fraction {r.tissue_fraction:.3f}"
        )
    return "\n".join(lines)


async def cmd_upload(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    md = common_pb2.ClinicalMetadata(
        stain=a.stain or "",
        organ=a.organ or "",
        species=a.species or "",
        case_id=a.case_id or "",
        patient_id=a.patient_id or "",
        specimen_id=a.specimen_id or "",
        block_id=a.block_id or "",
    )
    members = bundle.upload_files([Path(f) for f in a.file])
    if members is None:
        res = await c.upload(Path(a.file[0]), a.dataset, md)
    else:
        # a multi-file slide travels as one ZIP bundle; it is built deterministically, so an
        # interrupted upload resumes (same checksum) when the command is run again
        with tempfile.TemporaryDirectory(prefix="tessera-bundle-") as tmp:
            zipped = Path(tmp) / "slide.zip"
            await asyncio.to_thread(bundle.pack, zipped, members)
            res = await c.upload(zipped, a.dataset, md)
    data: dict[str, Any] = {
        "slide_id": res.slide_id,
        "upload_id": res.upload_id,
        "duplicate": res.duplicate,
    }
    text = res.slide_id
    if res.duplicate:
        text += "  (this file was uploaded before: existing slide, metadata unchanged)"
    if a.wait:
        slide = await c.wait(res.slide_id, a.timeout)
        data["slide"] = _dict(slide)
        text = slide_text(slide)
        if slide.status == common_pb2.SLIDE_STATUS_REJECTED:
            out.emit(data, text)
            raise ExitCode(EXIT_REJECTED)
        if slide.status == common_pb2.SLIDE_STATUS_NEEDS_REVIEW:
            text += "\n" + await _held_text(c, res.slide_id)
            out.emit(data, text + "\nheld for a data steward's review (tessera review list)")
            raise ExitCode(EXIT_NEEDS_REVIEW)
        if slide.status != common_pb2.SLIDE_STATUS_READY:
            data["timed_out"] = True
            out.emit(data, text + f"\nnot finished after {a.timeout:g} s (still processing)")
            raise ExitCode(EXIT_TIMEOUT)
    out.emit(data, text)


async def _held_text(c: TesseraClient, slide_id: str) -> str:
    r = await c.deid.GetDeidentificationReport(
        deid_pb2.GetDeidentificationReportRequest(slide_id=slide_id)
    )
    return "\n".join(f"held      {i.key}  ({i.reason}, {i.where})" for i in r.review_items)


async def cmd_status(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    s = (await c.metadata.GetSlide(metadata_pb2.GetSlideRequest(slide_id=a.slide))).slide
    text = slide_text(s)
    if s.status == common_pb2.SLIDE_STATUS_NEEDS_REVIEW:
        held = await _held_text(c, s.slide_id)
        text += ("\n" + held) if held else ""
    out.emit(_dict(s), text)


def _ts_text(ts: Any) -> str:
    return ts.ToDatetime().isoformat(timespec="seconds") + "Z"


def _review_text(r: deid_pb2.Review) -> str:
    lines = [f"{r.slide_id}  {r.dataset_id}  held {_ts_text(r.held_at)}  round {r.round}"]
    lines += [f"    {i.key}  ({i.reason}, {i.where})" for i in r.items]
    return "\n".join(lines)


async def cmd_review_list(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.deid.ListReviews(
        deid_pb2.ListReviewsRequest(dataset_id=a.dataset or "", page_size=a.limit)
    )
    text = "\n".join(_review_text(x) for x in r.reviews) or "no slide is held for review"
    out.emit(_dict(r), text)


async def cmd_review_approve(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    rules = [deid_pb2.Rule(key=k, action=deid_pb2.RULE_ACTION_REMOVE) for k in a.remove or []]
    rules += [deid_pb2.Rule(key=k, action=deid_pb2.RULE_ACTION_KEEP) for k in a.keep or []]
    if not rules:
        raise SystemExit("error: name a rule for every held key: --remove KEY / --keep KEY")
    r = await c.deid.ApproveSlide(deid_pb2.ApproveSlideRequest(slide_id=a.slide, rules=rules))
    outcome = deid_pb2.DeidOutcome.Name(r.outcome).removeprefix("DEID_OUTCOME_")
    text = f"{r.slide_id}  {outcome}" + (f"  {r.reason}: {r.detail}" if r.reason else "")
    text += "".join(f"\n    {i.key}  ({i.reason}, {i.where})" for i in r.review_items)
    out.emit(_dict(r), text)
    if r.outcome == deid_pb2.DEID_OUTCOME_REJECTED:
        raise ExitCode(EXIT_REJECTED)
    if r.outcome == deid_pb2.DEID_OUTCOME_NEEDS_REVIEW:
        raise ExitCode(EXIT_NEEDS_REVIEW)


async def cmd_review_reject(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.deid.RejectSlide(deid_pb2.RejectSlideRequest(slide_id=a.slide))
    erased = _ts_text(r.quarantine_erased_at) if r.HasField("quarantine_erased_at") else "pending"
    out.emit(_dict(r), f"{r.slide_id}  REJECTED; raw copy erased {erased}")


async def cmd_review_show(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.deid.GetDeidentificationReport(
        deid_pb2.GetDeidentificationReportRequest(slide_id=a.slide)
    )
    lines = [
        f"slide     {r.slide_id}",
        f"outcome   {deid_pb2.DeidOutcome.Name(r.outcome).removeprefix('DEID_OUTCOME_')}",
    ]
    if r.reason:
        lines.append(f"reason    {r.reason}: {r.detail}")
    lines += [f"held      {i.key}  ({i.reason}, {i.where})" for i in r.review_items]
    if r.HasField("quarantine_erased_at"):
        lines.append(
            f"raw copy  erased {_ts_text(r.quarantine_erased_at)} ({r.quarantine_erasure_reason})"
        )
    elif r.HasField("quarantine_erase_after"):
        lines.append(f"raw copy  in quarantine until {_ts_text(r.quarantine_erase_after)}")
    else:
        lines.append("raw copy  in quarantine until a decision")
    if r.summary.removed:
        removed = ", ".join(f"{k} x{v}" for k, v in sorted(r.summary.removed.items()))
        lines.append(f"removed   {removed}")
    out.emit(_dict(r), "\n".join(lines))


def _policy_text(p: deid_pb2.DatasetPolicy) -> str:
    macro = deid_pb2.MacroPolicy.Name(p.macro).removeprefix("MACRO_POLICY_")
    dates = deid_pb2.DatePolicy.Name(p.dates).removeprefix("DATE_POLICY_")
    lines = [
        f"dataset   {p.dataset_id}",
        f"macro     {macro}",
        f"dates     {dates}",
        f"retention {p.quarantine_retention_hours} h"
        + (" (raw copy erased at once)" if not p.quarantine_retention_hours else ""),
    ]
    for r in p.rules:
        action = deid_pb2.RuleAction.Name(r.action).removeprefix("RULE_ACTION_")
        lines.append(
            f"rule      {r.key} -> {action}  (by {r.approved_by}, {_ts_text(r.approved_at)})"
        )
    return "\n".join(lines)


def _policy_request(
    a: argparse.Namespace, dataset_id: str
) -> deid_pb2.SetDatasetPolicyRequest | None:
    if a.macro is None and a.dates is None and a.retention_hours is None:
        return None
    req = deid_pb2.SetDatasetPolicyRequest(
        dataset_id=dataset_id,
        macro=MACRO_POLICIES.get(a.macro or "", 0),  # type: ignore[arg-type]
        dates=DATE_POLICIES.get(a.dates or "", 0),  # type: ignore[arg-type]
    )
    if a.retention_hours is not None:
        req.quarantine_retention_hours = a.retention_hours
    return req


async def cmd_policy(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    req = _policy_request(a, a.dataset)
    if req is None:
        get = deid_pb2.GetDatasetPolicyRequest(dataset_id=a.dataset)
        policy = (await c.deid.GetDatasetPolicy(get)).policy
    else:
        policy = (await c.deid.SetDatasetPolicy(req)).policy
    out.emit(_dict(policy), _policy_text(policy))


async def cmd_search(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    req = metadata_pb2.SearchSlidesRequest(
        dataset_id=a.dataset or "",
        stain=a.stain or "",
        organ=a.organ or "",
        species=a.species or "",
        status=STATUSES.get(a.status or "", 0),  # type: ignore[arg-type]
        case_id=a.case_id or "",
        page_size=a.page_size,
        page_token=a.page_token or "",
    )
    resp = await c.metadata.SearchSlides(req)
    rows = [
        f"{s.slide_id}  {s.dataset_id:<20} "
        f"{common_pb2.SlideStatus.Name(s.status).removeprefix('SLIDE_STATUS_'):<12} "
        f"{s.clinical.stain}"
        for s in resp.slides
    ]
    rows.append(
        f"{resp.total_count} matching"
        + (f"; next page: {resp.next_page_token}" if resp.next_page_token else "")
    )
    out.emit(_dict(resp), "\n".join(rows))


async def cmd_fetch(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    size, digest = await c.fetch(a.slide, Path(a.output))
    out.emit(
        {"path": a.output, "size_bytes": size, "sha256": digest},
        f"wrote {a.output} ({size} bytes, sha256 {digest})",
    )


async def cmd_tile(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    t = await c.tiling.GetTile(
        tiling_pb2.GetTileRequest(slide_id=a.slide, level=a.level, col=a.col, row=a.row)
    )
    await asyncio.to_thread(Path(a.output).write_bytes, t.data)
    out.emit(
        {"path": a.output, "size_bytes": len(t.data), "content_type": t.content_type},
        f"wrote {a.output} ({len(t.data)} bytes, {t.content_type})",
    )


async def cmd_dzi(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    d = await c.tiling.GetDeepZoomDescriptor(
        tiling_pb2.GetDeepZoomDescriptorRequest(slide_id=a.slide)
    )
    out.emit(_dict(d), d.http_url)


async def cmd_dataset(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.access.CreateDataset(
        access_pb2.CreateDatasetRequest(
            dataset_id=a.dataset_id, name=a.name or "", description=a.description or ""
        )
    )
    text = f"created dataset {r.dataset.dataset_id}"
    data = _dict(r.dataset)
    req = _policy_request(a, r.dataset.dataset_id)
    if req is not None:
        # the creator holds the steward role on the new dataset, so it may set the policy
        p = (await c.deid.SetDatasetPolicy(req)).policy
        data["deid_policy"] = _dict(p)
        text += "\n" + _policy_text(p)
    out.emit(data, text)


async def cmd_grant(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    g = await c.grant(a.dataset, a.subject, ROLES[a.role], a.days, a.purpose or "")
    out.emit(
        _dict(g),
        f"granted {a.role} on {a.dataset} to {a.subject} until {g.expires_at.ToDatetime().date()}",
    )


async def cmd_revoke(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.access.RevokeRole(
        access_pb2.RevokeRoleRequest(
            dataset_id=a.dataset,
            subject=a.subject,
            role=ROLES.get(a.role or "", 0),  # type: ignore[arg-type]
        )
    )
    out.emit(_dict(r) | {"revoked": r.revoked}, f"revoked {r.revoked} grant(s)")


async def cmd_infer(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.serving.InferSlide(
        serving_pb2.InferSlideRequest(
            slide_id=a.slide, model_name=a.model or "", model_version=a.version or ""
        )
    )
    out.emit(
        _dict(r.result),
        f"{r.result.model_name} v{r.result.model_version}: "
        f"tissue fraction {r.result.tissue_fraction:.3f}",
    )


async def cmd_audit(c: TesseraClient, a: argparse.Namespace, out: Output) -> None:
    r = await c.access.ListAuditRecords(
        access_pb2.ListAuditRecordsRequest(
            subject=a.subject or "",
            dataset_id=a.dataset or "",
            resource=a.resource or "",
            page_size=a.limit,
        )
    )
    rows = [
        f"{x.at.ToDatetime().isoformat(timespec='seconds')} "
        f"{'ALLOW' if x.allowed else 'DENY '} {x.subject} "
        f"{access_pb2.Action.Name(x.action)} {x.resource} ({x.reason})"
        for x in r.records
    ]
    out.emit(_dict(r), "\n".join(rows) or "no records")


def cmd_token(a: argparse.Namespace, out: Output) -> None:
    from services.shared.auth import TokenIssuer

    key = Path(a.signing_key or os.environ.get("TESSERA_SIGNING_KEY", DEFAULT_SIGNING_KEY))
    if not key.exists():
        raise SystemExit(f"error: signing key {key} not found (run `make up` first)")
    if a.ttl <= 0:
        raise SystemExit("error: --ttl must be a positive number of seconds")
    token = TokenIssuer(key.read_bytes()).issue(a.subject, a.role or [], ttl_s=a.ttl)
    out.emit({"token": token, "subject": a.subject, "roles": a.role or []}, token)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--token", help="bearer token (default: $TESSERA_TOKEN)")
    common.add_argument("--token-file", help="file holding the bearer token")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("upload", parents=[common], help="upload a slide")
    s.add_argument(
        "file",
        nargs="+",
        help="a slide file; a .mrxs file (its folder is taken along), a directory holding "
        "one MRXS slide or a DICOM series, or several DICOM files: sent as one ZIP bundle",
    )
    s.add_argument("--dataset", required=True)
    for opt in (
        "--stain",
        "--organ",
        "--species",
        "--case-id",
        "--patient-id",
        "--specimen-id",
        "--block-id",
    ):
        s.add_argument(opt)
    s.add_argument("--wait", action="store_true", help="wait for READY or REJECTED")
    s.add_argument("--timeout", type=float, default=300)
    s.set_defaults(run=cmd_upload)

    s = sub.add_parser("status", parents=[common], help="a slide's catalogue record")
    s.add_argument("slide")
    s.set_defaults(run=cmd_status)

    s = sub.add_parser("search", parents=[common], help="search the catalogue")
    for opt in ("--dataset", "--stain", "--organ", "--species", "--case-id", "--page-token"):
        s.add_argument(opt)
    s.add_argument("--status", choices=sorted(STATUSES))
    s.add_argument("--page-size", type=int, default=50)
    s.set_defaults(run=cmd_search)

    s = sub.add_parser("fetch", parents=[common], help="download the de-identified slide")
    s.add_argument("slide")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(run=cmd_fetch)

    s = sub.add_parser("tile", parents=[common], help="download one Deep Zoom tile")
    s.add_argument("slide")
    s.add_argument("level", type=int)
    s.add_argument("col", type=int)
    s.add_argument("row", type=int)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(run=cmd_tile)

    s = sub.add_parser("dzi", parents=[common], help="Deep Zoom descriptor and its HTTP URL")
    s.add_argument("slide")
    s.set_defaults(run=cmd_dzi)

    def policy_options(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--macro",
            choices=sorted(MACRO_POLICIES),
            help="slide overview: remove (default) or keep with the label end blanked",
        )
        s.add_argument(
            "--dates", choices=sorted(DATE_POLICIES), help="remove (default) or year-only"
        )
        s.add_argument(
            "--retention-hours",
            type=int,
            help="hours the identified original stays in quarantine after the outcome "
            "(default 0: erased at once)",
        )

    s = sub.add_parser("dataset", parents=[common], help="create a dataset (admin)")
    s.add_argument("dataset_id")
    s.add_argument("--name")
    s.add_argument("--description")
    policy_options(s)
    s.set_defaults(run=cmd_dataset)

    s = sub.add_parser(
        "policy", parents=[common], help="show or set a dataset's de-identification policy"
    )
    s.add_argument("dataset")
    policy_options(s)
    s.set_defaults(run=cmd_policy)

    s = sub.add_parser("review", help="slides held for a data steward's review")
    rsub = s.add_subparsers(dest="review_command", required=True)
    r = rsub.add_parser("list", parents=[common], help="held slides of datasets you steward")
    r.add_argument("--dataset")
    r.add_argument("--limit", type=int, default=100)
    r.set_defaults(run=cmd_review_list)
    r = rsub.add_parser(
        "approve",
        parents=[common],
        help="approve a held slide with a rule per held key; the rules stay with the dataset",
    )
    r.add_argument("slide")
    r.add_argument("--remove", action="append", metavar="KEY", help="drop this key (repeatable)")
    r.add_argument("--keep", action="append", metavar="KEY", help="keep this key (repeatable)")
    r.set_defaults(run=cmd_review_approve)
    r = rsub.add_parser("reject", parents=[common], help="reject a held slide (raw copy erased)")
    r.add_argument("slide")
    r.set_defaults(run=cmd_review_reject)
    r = rsub.add_parser("show", parents=[common], help="a slide's de-identification report")
    r.add_argument("slide")
    r.set_defaults(run=cmd_review_show)

    s = sub.add_parser("grant", parents=[common], help="grant a role on a dataset")
    s.add_argument("dataset")
    s.add_argument("subject")
    s.add_argument("role", choices=sorted(ROLES))
    s.add_argument("--days", type=float, default=30)
    s.add_argument("--purpose")
    s.set_defaults(run=cmd_grant)

    s = sub.add_parser("revoke", parents=[common], help="revoke a subject's role(s)")
    s.add_argument("dataset")
    s.add_argument("subject")
    s.add_argument("role", nargs="?", choices=sorted(ROLES))
    s.set_defaults(run=cmd_revoke)

    s = sub.add_parser("infer", parents=[common], help="run a model on a slide")
    s.add_argument("slide")
    s.add_argument("--model")
    s.add_argument("--version")
    s.set_defaults(run=cmd_infer)

    s = sub.add_parser("audit", parents=[common], help="access decisions (steward/admin)")
    for opt in ("--subject", "--dataset", "--resource"):
        s.add_argument(opt)
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(run=cmd_audit)

    s = sub.add_parser("token", parents=[common], help="mint a token (local stack only)")
    s.add_argument("--subject", required=True)
    s.add_argument("--role", action="append", help="global role: admin, service")
    s.add_argument("--ttl", type=int, default=8 * 3600)
    s.add_argument("--signing-key")
    s.set_defaults(run=None)
    return p


async def _run(
    fn: Callable[[TesseraClient, argparse.Namespace, Output], Awaitable[None]],
    args: argparse.Namespace,
    out: Output,
) -> None:
    async with TesseraClient(_token(args)) as client:
        await fn(client, args, out)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Output(args.json)
    if args.command == "token":
        cmd_token(args, out)
        return 0
    try:
        asyncio.run(_run(args.run, args, out))
    except ExitCode as exc:
        return exc.code
    except KeyboardInterrupt:
        print(
            "interrupted; an upload resumes where it stopped when you run the same command again",
            file=sys.stderr,
        )
        return 130
    except aio.AioRpcError as exc:
        reason = dict(exc.trailing_metadata() or ()).get(REASON_KEY, "")
        err = {"error": exc.code().name, "reason": reason, "message": exc.details()}
        if out.json:
            print(json.dumps(err), file=sys.stderr)
        else:
            print(
                f"error: {exc.code().name}"
                f"{' (' + str(reason) + ')' if reason else ''}: {exc.details()}",
                file=sys.stderr,
            )
        return 1
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
