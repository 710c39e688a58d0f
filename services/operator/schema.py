"""The one source of the custom resources: pydantic models of each spec.

`services.operator.crds` turns them into CustomResourceDefinitions (`make crds`), and the
operator parses every object it receives with the same models, so the schema the API server
enforces and the one the code reads cannot drift apart. Field names are camelCase on the wire
(Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "tessera.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

SERVICE_NAMES = ("access", "ingestion", "deid", "tiling", "metadata", "serving")
SITE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,30}$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the node's namespace."""

    name: str = Field(pattern=DNS_LABEL, max_length=253, description="Secret name")
    key: str = Field(min_length=1, max_length=253, description="key inside the Secret")


class ResourceAmounts(_Model):
    cpu: str = Field(default="100m", pattern=QUANTITY)
    memory: str = Field(default="256Mi", pattern=QUANTITY)


class Resources(_Model):
    requests: ResourceAmounts = ResourceAmounts()
    limits: ResourceAmounts = ResourceAmounts(cpu="1", memory="1Gi")


class ServiceSpec(_Model):
    """One of the six services."""

    replicas: int = Field(default=1, ge=0, le=100, description="replicas (the HPA minimum)")
    max_replicas: int = Field(default=3, ge=1, le=100, description="HPA maximum")
    target_cpu_utilization: int = Field(default=80, ge=10, le=100, description="HPA target, %")
    image: str | None = Field(default=None, description="overrides spec.image for this service")
    resources: Resources = Resources()


class ServicesSpec(_Model):
    access: ServiceSpec = ServiceSpec()
    ingestion: ServiceSpec = ServiceSpec()
    deid: ServiceSpec = ServiceSpec()
    tiling: ServiceSpec = ServiceSpec()
    metadata: ServiceSpec = ServiceSpec()
    serving: ServiceSpec = ServiceSpec()

    def of(self, name: str) -> ServiceSpec:
        spec: ServiceSpec = getattr(self, name)
        return spec


class KafkaSpec(_Model):
    bootstrap_servers: str = Field(min_length=1, description="host:port[,host:port...]")
    topic_prefix: str = Field(
        default="",
        pattern=r"^[a-z0-9._-]{0,40}$",
        description="prefix of every topic (for nodes sharing one Kafka cluster)",
    )
    partitions: int = Field(default=3, ge=1, le=256, description="partitions of each event topic")
    dead_letter_partitions: int = Field(default=1, ge=1, le=256)
    replication_factor: int = Field(default=1, ge=1, le=7)


class BucketsSpec(_Model):
    quarantine: str = Field(default="tessera-quarantine", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    deidentified: str = Field(default="tessera-deidentified", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    tiles: str = Field(default="tessera-tiles", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    models: str = Field(default="tessera-models", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    results: str = Field(default="tessera-results", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")

    def all(self) -> tuple[str, ...]:
        return (self.quarantine, self.deidentified, self.tiles, self.models, self.results)


class S3Spec(_Model):
    endpoint: str = Field(min_length=1, description="host:port of the S3 API")
    secure: bool = False
    region: str = "us-east-1"
    access_key: SecretKeyRef
    secret_key: SecretKeyRef
    buckets: BucketsSpec = BucketsSpec()


class MongoSpec(_Model):
    uri: SecretKeyRef = Field(description="Secret key holding the mongodb:// URI")
    database: str = Field(default="tessera", pattern=r"^[A-Za-z0-9_-]{1,63}$")


class AuthSpec(_Model):
    public_key: SecretKeyRef = Field(description="PEM of the Ed25519 key that verifies tokens")
    service_tokens_secret: str = Field(
        pattern=DNS_LABEL, description="Secret with one key per service (<service>.jwt)"
    )
    pseudonym_key: SecretKeyRef


class PeerRef(_Model):
    """Another TesseraNode (in this cluster) that this node exchanges catalogue records with."""

    name: str = Field(pattern=DNS_LABEL)
    namespace: str = Field(pattern=DNS_LABEL)


class FederationSpec(_Model):
    enabled: bool = True
    peers: list[PeerRef] = Field(default_factory=list, max_length=32)


class TesseraNodeSpec(_Model):
    """A partner node: one site's six services and the infrastructure they use."""

    site: str = Field(pattern=SITE_PATTERN, description="site identity (no identifying data)")
    image: str = Field(min_length=1, description="service image (all six run from it)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    services: ServicesSpec = ServicesSpec()
    kafka: KafkaSpec
    s3: S3Spec
    mongo: MongoSpec
    auth: AuthSpec
    federation: FederationSpec = FederationSpec()
    cleanup_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="Delete: removing the node also deletes its topics, buckets and database",
    )


class ModelStorage(_Model):
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    prefix: str = Field(min_length=1, description="object key prefix of the model version")


class ModelDeploymentSpec(_Model):
    """A model served by a dedicated serving Deployment of a TesseraNode."""

    node: str = Field(pattern=DNS_LABEL, description="TesseraNode (same namespace)")
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    version: str = Field(pattern=r"^[A-Za-z0-9._-]{1,63}$")
    storage: ModelStorage
    replicas: int = Field(default=1, ge=0, le=100)
    resources: Resources = Resources()


class CrdInfo(BaseModel):
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec_model: type[_Model]
    printer_columns: tuple[tuple[str, str, str], ...]  # name, type, jsonPath


CRDS = (
    CrdInfo(
        kind="TesseraNode",
        plural="tesseranodes",
        singular="tesseranode",
        short_names=("tnode",),
        spec_model=TesseraNodeSpec,
        printer_columns=(
            ("Site", "string", ".spec.site"),
            ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
            ("Reason", "string", '.status.conditions[?(@.type=="Ready")].reason'),
        ),
    ),
    CrdInfo(
        kind="ModelDeployment",
        plural="modeldeployments",
        singular="modeldeployment",
        short_names=("tmodel",),
        spec_model=ModelDeploymentSpec,
        printer_columns=(
            ("Model", "string", ".spec.modelName"),
            ("Version", "string", ".spec.version"),
            ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ),
    ),
)
