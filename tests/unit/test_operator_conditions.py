"""Status conditions computed from what a reconcile found (pure)."""

from __future__ import annotations

from services.operator import builders
from services.operator.builders import RolloutState

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"


def by_type(conds: list[dict]) -> dict[str, dict]:
    return {c["type"]: c for c in conds}


def done(name: str) -> RolloutState:
    return RolloutState(name, desired=1, updated=1, available=1, observed_current=True)


def waiting(name: str) -> RolloutState:
    return RolloutState(name, desired=1, updated=0, available=0, observed_current=True)


def test_all_available_is_ready() -> None:
    c = by_type(
        builders.node_conditions(
            generation=3,
            now=T0,
            previous=[],
            problems={},
            rollouts=[done("a"), done("b")],
            peers_wanted=0,
            peers_mutual=0,
        )
    )
    assert c["Ready"]["status"] == "True" and c["Ready"]["reason"] == "AllServicesAvailable"
    assert c["Progressing"]["status"] == "False"
    assert c["Degraded"]["status"] == "False" and c["Degraded"]["reason"] == "AsExpected"
    assert c["Federated"]["reason"] == "NoPeers"
    assert all(x["observedGeneration"] == 3 for x in c.values())


def test_rollout_in_progress() -> None:
    c = by_type(
        builders.node_conditions(
            generation=1,
            now=T0,
            previous=[],
            problems={},
            rollouts=[done("a"), waiting("b")],
            peers_wanted=0,
            peers_mutual=0,
        )
    )
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "DeploymentsUnavailable"
    assert c["Progressing"]["status"] == "True" and c["Progressing"]["reason"] == "RollingOut"
    assert "b" in c["Progressing"]["message"]


def test_problems_degrade() -> None:
    c = by_type(
        builders.node_conditions(
            generation=1,
            now=T0,
            previous=[],
            problems={"KafkaUnavailable": "Kafka topics not reconciled (KafkaConnectionError)"},
            rollouts=[done("a")],
            peers_wanted=0,
            peers_mutual=0,
        )
    )
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "KafkaUnavailable"
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "Degraded"


def test_transition_time_moves_only_on_change() -> None:
    first = builders.node_conditions(
        generation=1,
        now=T0,
        previous=[],
        problems={},
        rollouts=[done("a")],
        peers_wanted=1,
        peers_mutual=0,
    )
    again = by_type(
        builders.node_conditions(
            generation=2,
            now=T1,
            previous=first,
            problems={},
            rollouts=[done("a")],
            peers_wanted=1,
            peers_mutual=1,
        )
    )
    assert again["Ready"]["lastTransitionTime"] == T0
    assert again["Federated"]["status"] == "True"
    assert again["Federated"]["lastTransitionTime"] == T1


def test_rollout_state_from_a_deployment() -> None:
    dep = {
        "metadata": {"name": "x", "generation": 2},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 2},
    }
    assert not builders.rollout_state(dep).complete  # the controller has not seen gen 2 yet
    dep["status"]["observedGeneration"] = 2
    assert builders.rollout_state(dep).complete
    assert not builders.rollout_state({"metadata": {"name": "y"}, "spec": {"replicas": 1}}).complete
