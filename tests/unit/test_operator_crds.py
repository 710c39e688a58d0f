"""The CRDs are generated from the pydantic models, and the committed YAML is current."""

from __future__ import annotations

from typing import Any

import yaml

from services.operator import crds
from services.operator.schema import CRDS


def walk(node: Any) -> list[dict[str, Any]]:
    out = []
    if isinstance(node, dict):
        out.append(node)
        for v in node.values():
            out.extend(walk(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(walk(v))
    return out


def test_committed_crds_are_current() -> None:
    assert crds.main(["--check", "--crds-only"]) == 0


def test_schemas_are_structural() -> None:
    for info in CRDS:
        schema = crds.build_crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for node in walk(schema):
            assert "$ref" not in node and "anyOf" not in node and "$defs" not in node
            assert "additionalProperties" not in node
            if "properties" in node and isinstance(node["properties"], dict):
                assert node.get("type") == "object"


def test_tesseranode_schema_fields() -> None:
    (node,) = [i for i in CRDS if i.kind == "TesseraNode"]
    crd = crds.build_crd(node)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(spec["required"]) == {"site", "image", "kafka", "s3", "mongo", "auth"}
    kafka = spec["properties"]["kafka"]["properties"]
    assert kafka["partitions"]["minimum"] == 1 and kafka["partitions"]["default"] == 3
    services = spec["properties"]["services"]["properties"]
    assert set(services) == {"access", "ingestion", "deid", "tiling", "metadata", "serving"}
    assert services["deid"]["properties"]["image"]["nullable"] is True
    assert spec["properties"]["cleanupPolicy"]["enum"] == ["Retain", "Delete"]


def test_rendered_yaml_round_trips() -> None:
    for info in CRDS:
        assert yaml.safe_load(crds.render(info)) == crds.build_crd(info)
