"""What every composition root needs: adapters built from settings (or handed in by tests),
the event plumbing over them, and the process host with their start/close lifecycle.

Each service's `bootstrap.py` builds its own core from an `Adapters` and says which gRPC
services, consumers and background loops it runs; nothing else is repeated per service.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.shared import infra
from services.shared.access import AccessChecker, GrpcAccessChecker
from services.shared.auth import TokenVerifier
from services.shared.events import DeadLetterHook, EventEmitter, EventRunner, Handler
from services.shared.grpc.client import use_tls_by_default
from services.shared.grpc.server import Background, Register, ServiceHost
from services.shared.outbox import Outbox
from services.shared.ports.bus import MessageBus, Publisher
from services.shared.ports.documents import DocumentStore
from services.shared.ports.objects import ObjectStore
from services.shared.settings import KafkaSettings, MongoSettings, S3Settings, ServiceSettings


@dataclass
class Adapters:
    name: str
    settings: ServiceSettings
    docs: DocumentStore
    bus: MessageBus
    publisher: Publisher
    objects: ObjectStore | None = None
    access: AccessChecker | None = None
    _background: list[Background] = field(default_factory=list)
    _outboxes: list[Outbox] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        name: str,
        settings: ServiceSettings,
        *,
        kafka: KafkaSettings,
        mongo: MongoSettings,
        s3: S3Settings | None = None,
        with_access: bool = True,
        docs: DocumentStore | None = None,
        bus: MessageBus | None = None,
        objects: ObjectStore | None = None,
        access: AccessChecker | None = None,
    ) -> Adapters:
        """Real adapters from settings, except those handed in (tests hand in fakes)."""
        use_tls_by_default(settings.grpc.tls)  # outgoing channels to other services
        docs = docs or infra.document_store(mongo)
        bus = bus or infra.kafka_bus(kafka, f"tessera-{name}")
        if objects is None and s3 is not None:
            objects = infra.object_store(s3)
        if access is None and with_access:
            token = infra.service_token(settings.auth)
            access = GrpcAccessChecker(settings.endpoints.access, lambda: token)
        return cls(name, settings, docs, bus, bus.publisher(), objects, access)

    def require_objects(self) -> ObjectStore:
        if self.objects is None:
            raise RuntimeError(f"{self.name} was wired without object storage")
        return self.objects

    def require_access(self) -> AccessChecker:
        if self.access is None:
            raise RuntimeError(f"{self.name} was wired without access control")
        return self.access

    def outbox(self, collection: str) -> Outbox:
        box = Outbox(self.docs.collection(collection), EventEmitter(self.name, self.publisher))
        self._background.append(Background("outbox", box.run, box.stop))
        self._outboxes.append(box)
        return box

    def consume(
        self,
        handlers: Mapping[str, Handler],
        on_dead_letter: DeadLetterHook | None = None,
        concurrency: int = 1,
    ) -> EventRunner:
        runner = EventRunner(
            service=self.name,
            bus=self.bus,
            group=f"tessera-{self.name}",
            handlers=handlers,
            publisher=self.publisher,
            on_dead_letter=on_dead_letter,
            concurrency=concurrency,
        )
        self._background.append(Background("consumer", runner.run, runner.stop))
        return runner

    def verifier(self) -> TokenVerifier:
        auth = self.settings.auth
        return TokenVerifier.from_file(auth.public_key_file, auth.issuer, auth.audience)

    def host(
        self,
        *,
        service_names: Sequence[str],
        register: Sequence[Register],
        background: Sequence[Background] = (),
        on_start: Sequence[Callable[[], Awaitable[None]]] = (),
        verifier: TokenVerifier | None = None,
    ) -> ServiceHost:
        async def start() -> None:
            await self.docs.ping()
            await self.publisher.start()
            for box in self._outboxes:
                await box.ensure_indexes()
            for hook in on_start:
                await hook()

        async def close() -> None:
            await self.publisher.stop()
            if self.access is not None:
                await self.access.close()
            await self.docs.close()

        return ServiceHost(
            self.name,
            self.settings,
            verifier or self.verifier(),
            service_names=service_names,
            register=register,
            background=[*self._background, *background],
            on_start=[start],
            on_close=[close],
        )
