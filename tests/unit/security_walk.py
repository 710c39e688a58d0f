"""Walks every RPC of every Tessera gRPC service, found through the generated descriptors, so
a new RPC (or a new service) is covered by the security tests without anyone listing it.

Used by `tests/unit/test_security_walk.py` (in-process servers over in-memory fakes) and
`tests/e2e/test_security_walk.py` (the six running services).

- `all_methods()`: every method of every service declared in `protos/` (the `tessera.*` and
  `inference` packages), plus the standard health service the hosts add.
- `build_request()`: a minimal request built from the input descriptor alone: ids are filled
  from a `Fill` (a real dataset and slide), subjects name someone other than the caller (so
  "check/list someone else's permissions" is what is asked), enums take their first real
  value, timestamps lie a day ahead, nested messages are filled the same way, and of a oneof
  only the first member is set (the upload header, not a chunk).
- `forged_tokens()`: expired, not yet valid, tampered, foreign-key, alg=none, HS256
  key-confusion, wrong issuer and wrong audience tokens, plus malformed headers.
- `call()`: one call of any cardinality with raw metadata; returns the status code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2

from services.cli.client import status_lost
from services.shared.auth import generate_keypair

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# RPCs reachable without any token: probes (kubelet, load balancers, the stack's own
# readiness check). Reviewed: they reveal SERVING/NOT_SERVING per service name only.
# Value: (the status a tokenless call gets, the reason it is public).
PUBLIC: dict[str, tuple[grpc.StatusCode, str]] = {
    f"/{HEALTH}/Check": (grpc.StatusCode.OK, "health probe; reveals only SERVING/NOT_SERVING"),
    f"/{HEALTH}/Watch": (grpc.StatusCode.OK, "health probe (streaming form of Check)"),
    f"/{HEALTH}/List": (
        grpc.StatusCode.UNIMPLEMENTED,
        "health probe; grpcio-health-checking's aio servicer does not implement it",
    ),
}

# RPCs that any authenticated caller may use, with the reason (reviewed). Everything else
# must answer PERMISSION_DENIED to a valid token that holds no role and no grant.
OPEN_TO_AUTHENTICATED: dict[str, str] = {
    "/inference.GRPCInferenceService/ServerLive": "liveness of the inference server (OIP v2)",
    "/inference.GRPCInferenceService/ServerReady": "readiness of the inference server (OIP v2)",
    "/inference.GRPCInferenceService/ServerMetadata": "server name and version only",
    "/inference.GRPCInferenceService/ModelReady": "whether a named model is loaded",
    "/inference.GRPCInferenceService/ModelMetadata": "tensor names/shapes of a model; no data",
    "/inference.GRPCInferenceService/ModelInfer": (
        "runs the model on tensors the caller sends; reads no slide, record or stored result "
        "(slide inference is InferSlide, which checks the dataset grant)"
    ),
    "/tessera.serving.v1.SlideInferenceService/ListModels": (
        "the model catalogue (name, version, digest); no slide data"
    ),
}


@dataclass(frozen=True)
class Rpc:
    service: str  # full service name
    method: _d.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def id(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method.name}"


def _pb2_modules() -> Iterator[Any]:
    for pkg_name in ("tessera", "inference"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            if info.name.endswith("_pb2") and not info.name.endswith("_grpc_pb2"):
                yield importlib.import_module(info.name)
    yield health_pb2


def all_services() -> list[_d.ServiceDescriptor]:
    seen: dict[str, _d.ServiceDescriptor] = {}
    for mod in _pb2_modules():
        for svc in mod.DESCRIPTOR.services_by_name.values():
            seen[svc.full_name] = svc
    return [seen[k] for k in sorted(seen)]


def all_methods() -> list[Rpc]:
    return [Rpc(s.full_name, m) for s in all_services() for m in s.methods]


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fill:
    dataset_id: str
    slide_id: str
    other_subject: str  # a subject that is not the caller
    sha256: str = "0" * 64


def _message_class(desc: _d.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def _fill(msg: Message, fill: Fill, depth: int = 0) -> None:
    if depth > 4:
        return
    done_oneofs: set[str] = set()
    for field in msg.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in done_oneofs:
                continue
            done_oneofs.add(oneof.name)
        if field.is_repeated:
            continue  # minimal: empty lists (inputs, maps, outputs)
        name = field.name
        if field.type == field.TYPE_MESSAGE:
            sub = getattr(msg, name)
            if field.message_type.full_name == "google.protobuf.Timestamp":
                sub.FromDatetime(datetime.now(UTC) + timedelta(days=1))
            else:
                _fill(sub, fill, depth + 1)
                sub.SetInParent()
        elif field.type == field.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values if v.number != 0]
            if values:
                setattr(msg, name, values[0])
        elif field.type == field.TYPE_STRING:
            setattr(msg, name, _string_for(name, fill))
        elif field.type in (field.TYPE_INT64, field.TYPE_UINT64) and name == "size_bytes":
            setattr(msg, name, 1024)


def _string_for(name: str, fill: Fill) -> str:
    if name == "dataset_id":
        return fill.dataset_id
    if name == "slide_id":
        return fill.slide_id
    if name == "subject":
        return fill.other_subject
    if name == "sha256":
        return fill.sha256
    if name in ("filename",):
        return "walk.svs"
    if name in ("model_name", "model_version", "version", "name", "page_token", "service"):
        return ""
    return "walk"


def build_request(rpc: Rpc, fill: Fill) -> Message:
    msg = _message_class(rpc.method.input_type)()
    _fill(msg, fill)
    return msg


# --- tokens --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(subject: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "roles": [],
        "iss": "tessera",
        "aud": "tessera",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def forged_tokens(private_pem: bytes, public_pem: bytes, subject: str) -> dict[str, str]:
    """Authorization header values that must all be refused with UNAUTHENTICATED.
    `private_pem` is the real signing key: the forgeries differ from a valid token in one way
    each, so a refusal is about exactly that."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    other, _ = generate_keypair()
    other_key = serialization.load_pem_private_key(other, password=None)
    now = int(time.time())

    def signed(claims: dict[str, Any], k: Any = key) -> str:
        return jwt.encode(claims, k, algorithm="EdDSA")

    valid = signed(_claims(subject))
    head, payload, sig = valid.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["roles"] = ["admin"]
    escalated = f"{head}.{_b64(json.dumps(body).encode())}.{sig}"
    flipped_sig = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    none_head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    hs_head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    hs_body = _b64(json.dumps(_claims(subject, roles=["admin"])).encode())
    hs_sig = _b64(hmac.new(public_pem, f"{hs_head}.{hs_body}".encode(), hashlib.sha256).digest())
    tokens = {
        "expired": signed(_claims(subject, iat=now - 7200, exp=now - 3600)),
        "not_yet_valid": signed(_claims(subject, nbf=now + 3600)),
        "payload_tampered": escalated,
        "signature_tampered": f"{head}.{payload}.{flipped_sig}",
        "signature_stripped": f"{head}.{payload}.",
        "foreign_key": signed(_claims(subject), other_key),
        "alg_none": f"{none_head}.{_b64(json.dumps(_claims(subject)).encode())}.",
        "alg_hs256_public_key": f"{hs_head}.{hs_body}.{hs_sig}",
        "wrong_issuer": signed(_claims(subject, iss="evil-idp")),
        "wrong_audience": signed(_claims(subject, aud="another-service")),
        "no_expiry": signed(_claims(subject, exp=None)),
        "no_subject": signed(_claims(subject, sub=None)),
        "garbage": "not-a-jwt",
    }
    headers = {name: f"Bearer {tok}" for name, tok in tokens.items()}
    headers["basic_scheme"] = f"Basic {_b64(b'alice:secret')}"
    headers["empty_bearer"] = "Bearer "
    return headers


# --- calls ---------------------------------------------------------------------------------


async def call(
    channel: aio.Channel,
    rpc: Rpc,
    request: Message,
    authorization: str | None,
    timeout: float = 15.0,
    attempt: int = 1,
) -> tuple[grpc.StatusCode, str]:
    """One call of `rpc` with exactly this authorization header; (code, reason trailer)."""
    out_cls = _message_class(rpc.method.output_type)
    metadata = (("authorization", authorization),) if authorization is not None else None
    m = rpc.method
    ser, de = type(request).SerializeToString, out_cls.FromString
    try:
        if m.client_streaming:

            async def one() -> AsyncIterator[Message]:
                yield request

            if m.server_streaming:
                ss = channel.stream_stream(
                    rpc.path, request_serializer=ser, response_deserializer=de
                )(one(), metadata=metadata, timeout=timeout)
                async for _ in ss:
                    break
                ss.cancel()
            else:
                await channel.stream_unary(
                    rpc.path, request_serializer=ser, response_deserializer=de
                )(one(), metadata=metadata, timeout=timeout)
        elif m.server_streaming:
            us = channel.unary_stream(rpc.path, request_serializer=ser, response_deserializer=de)(
                request, metadata=metadata, timeout=timeout
            )
            async for _ in us:
                break
            us.cancel()
        else:
            await channel.unary_unary(rpc.path, request_serializer=ser, response_deserializer=de)(
                request, metadata=metadata, timeout=timeout
            )
    except aio.AioRpcError as exc:
        if m.client_streaming and status_lost(exc) and attempt < 3:
            # the refusal raced the request's write in grpcio (grpc/grpc#36066): ask again
            return await call(channel, rpc, request, authorization, timeout, attempt + 1)
        reason = dict(exc.trailing_metadata() or ()).get("tessera-reason", "")
        return exc.code(), str(reason)
    return grpc.StatusCode.OK, ""
