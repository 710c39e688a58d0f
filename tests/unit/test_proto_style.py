"""The protocol follows the buf style rules the project chose (tessera.* packages only; the
Open Inference Protocol keeps its upstream names for wire compatibility)."""

from __future__ import annotations

import importlib
from pathlib import Path

from google.protobuf.descriptor import FileDescriptor

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def _files() -> list[FileDescriptor]:
    out = []
    for proto in sorted((PROTOS / "tessera").rglob("*.proto")):
        rel = proto.relative_to(PROTOS).with_suffix("")
        module = importlib.import_module(".".join(rel.parts) + "_pb2")
        out.append(module.DESCRIPTOR)
    return out


def test_every_file_is_versioned_by_folder() -> None:
    files = _files()
    assert len(files) >= 8
    for fd in files:
        folder = ".".join(Path(fd.name).parent.parts)
        assert fd.package == folder, fd.name
        assert fd.package.startswith("tessera.") and fd.package.split(".")[-1] == "v1"


def test_enum_zero_values_are_unspecified() -> None:
    for fd in _files():
        enums = list(fd.enum_types_by_name.values())
        for msg in fd.message_types_by_name.values():
            enums += list(msg.enum_types)
        for enum in enums:
            zero = enum.values_by_number[0].name
            assert zero.endswith("_UNSPECIFIED"), (fd.name, enum.name)


def test_services_and_rpcs_are_named_buf_style() -> None:
    seen = 0
    for fd in _files():
        for svc in fd.services_by_name.values():
            assert svc.name.endswith("Service"), svc.full_name
            for m in svc.methods:
                seen += 1
                assert m.input_type.name == f"{m.name}Request", m.full_name
                assert m.output_type.name == f"{m.name}Response", m.full_name
    assert seen >= 15


def test_open_inference_protocol_keeps_upstream_names() -> None:
    from inference import grpc_predict_v2_pb2 as oip

    svc = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert oip.DESCRIPTOR.package == "inference"
    assert {m.name for m in svc.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ModelMetadata",
        "ModelInfer",
    }
    # field numbers clients depend on
    req = oip.ModelInferRequest.DESCRIPTOR
    assert req.fields_by_name["raw_input_contents"].number == 7
    assert oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
