"""Which connections a set of NetworkPolicies allows, decided offline.

Implements the parts of the NetworkPolicy semantics e3's policies use:
pod and namespace selectors (matchLabels, matchExpressions), policyTypes,
rules without `from`/`to` (everyone) or `ports` (every port), named ports and
endPort. A pod is isolated in a direction once any policy selecting it names
that direction; a connection needs the source's egress and the
destination's ingress to allow it. ipBlock peers are reported, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    name: str  # the workload it comes from, for messages
    namespace: str
    labels: dict = field(hash=False)
    namespace_labels: dict = field(hash=False)
    ports: dict = field(default_factory=dict, hash=False)  # container port name -> number


def selects(selector: dict | None, labels: dict) -> bool:
    """Label selector semantics; an empty selector selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _peer_matches(peer: dict, policy_namespace: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        raise ValueError("ipBlock peers are not supported by scripts/k8s_netpol.py")
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), pod.labels) if "podSelector" in peer else True


def _port_matches(rule_ports: list | None, destination: Pod, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for item in rule_ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        wanted = item.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = destination.ports.get(wanted)
        if wanted is not None and wanted <= port <= item.get("endPort", wanted):
            return True
    return False


class Policies:
    def __init__(self, policies: list[dict]) -> None:
        self.policies = policies

    def _selecting(self, pod: Pod, direction: str) -> list[dict]:
        out = []
        for policy in self.policies:
            spec = policy["spec"]
            types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))
            if policy["metadata"].get("namespace") == pod.namespace and direction in types \
                    and selects(spec.get("podSelector"), pod.labels):
                out.append(policy)
        return out

    def _allowed(self, pod: Pod, direction: str, peer: Pod, destination: Pod, port: int, protocol: str) -> bool:
        policies = self._selecting(pod, direction)
        if not policies:
            return True  # not isolated in this direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in policies:
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peers_key)
                namespace = policy["metadata"].get("namespace")
                if (not peers or any(_peer_matches(p, namespace, peer) for p in peers)) and \
                        _port_matches(rule.get("ports"), destination, port, protocol):
                    return True
        return False

    def allows(self, source: Pod, destination: Pod, port: int, protocol: str = "TCP") -> bool:
        return (self._allowed(source, "Egress", destination, destination, port, protocol)
                and self._allowed(destination, "Ingress", source, destination, port, protocol))

    def open_rules(self) -> list[str]:
        """Rules that allow any peer: "everyone" is never what an e3 pod needs."""
        out = []
        for policy in self.policies:
            for key, peers_key in (("ingress", "from"), ("egress", "to")):
                for index, rule in enumerate(policy["spec"].get(key) or []):
                    if not rule.get(peers_key):
                        out.append(f"NetworkPolicy {policy['metadata']['name']}: {key}[{index}] allows every peer")
        return out
