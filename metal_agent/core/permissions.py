"""Every Kubernetes API permission the agent uses, and why: one table.

The table exists so that three things cannot drift apart: what the code
calls, what `metal-agent doctor` asks the API server for (one
SelfSubjectAccessReview per entry), and what `manifests/rbac/metal-agent.yaml`
grants (a unit test holds the ClusterRole to exactly this table: every
entry granted, nothing granted beyond it). When an adapter starts making a
new kind of call, add its row here; the doctor then checks it and the test
says whether the role grants it.

Verbs are the authorizer's, not HTTP's: a server-side apply is a PATCH and
needs `patch`, plus `create` when the apply creates the object; a watch is
`watch`; a list with a label selector is `list`.

Pure data: importing this must not import the Kubernetes client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metal_agent.core.names import GROUP, ISVC_PLURAL, MODEL_PLURAL

DISCOVERY_GROUP = "discovery.k8s.io"


@dataclass(frozen=True)
class Permission:
    verb: str
    group: str  # "" is the core API group
    resource: str
    subresource: str = ""
    why: str = field(default="", compare=False)

    @property
    def rbac_resource(self) -> str:
        """How an RBAC rule names it: `inferenceservices/status`."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def __str__(self) -> str:
        return f"{self.verb} {self.rbac_resource}{'.' + self.group if self.group else ''}"


def _grant(verbs: str, group: str, resource: str, subresource: str = "", *, why: str) -> tuple[Permission, ...]:
    return tuple(Permission(v, group, resource, subresource, why) for v in verbs.split())


#: Everything the agent does in the cluster (adapters/kube/*). The optional
#: per-Secret read of a download token is deliberately absent: it is granted
#: separately (manifests/rbac/optional-model-secret-reader.yaml), per Secret,
#: and the agent works without it.
AGENT_PERMISSIONS: tuple[Permission, ...] = (
    *_grant("list watch", GROUP, ISVC_PLURAL,
            why="the informer lists, then watches, the desired state"),
    *_grant("list watch", GROUP, MODEL_PLURAL,
            why="the informer lists, then watches, the Models; a Model decides whether a service is Metal's"),
    *_grant("patch", GROUP, ISVC_PLURAL, "status",
            why="the status writer reports phase, endpoint and conditions (server-side apply is a patch)"),
    *_grant("create patch", "", "services",
            why="server-side apply of each model's selector-less Service (an apply that creates needs create)"),
    *_grant("get delete", "", "services",
            why="removal reads the Service to check our managed-by label, then deletes it by uid"),
    *_grant("list", "", "services",
            why="start-up cleanup finds leftover Services by our managed-by label"),
    *_grant("create patch", DISCOVERY_GROUP, "endpointslices",
            why="server-side apply of each model's EndpointSlice, also by the heartbeat (which re-creates a "
                "deleted one: create)"),
    *_grant("get delete", DISCOVERY_GROUP, "endpointslices",
            why="removal (ours, and the Go agent's leftover slice) reads the slice to check its labels, "
                "then deletes it by uid"),
    *_grant("list", DISCOVERY_GROUP, "endpointslices",
            why="start-up cleanup finds leftover slices by our managed-by label"),
    *_grant("list delete", "", "endpoints",
            why="legacy cleanup: Endpoints written by old agents are found by label and deleted, never created"),
    *_grant("create", "", "events",
            why="Events on InferenceServices: started, ready, exited, memory pressure"),
    *_grant("patch", "", "events",
            why="a repeated Event is counted on the existing one instead of duplicated"),
    *_grant("create", "authentication.k8s.io", "tokenreviews",
            why="a scrape of /metrics from the network: who does its bearer token belong to?"),
    *_grant("create", "authorization.k8s.io", "subjectaccessreviews",
            why="... and may that identity get the non-resource URL /metrics (or, through the front door, "
                "get inferenceservices/proxy)?"),
    *_grant("list watch", "", "nodes",
            why="the front door lets the cluster's Node addresses and pod CIDRs in; watched to stay current"),
)

COORDINATION_GROUP = "coordination.k8s.io"
FLEET_NAMESPACE = "metal-agent"

#: Fleet mode only (`run --fleet`), granted by the namespaced Role `metal-agent-fleet`
#: in the fleet namespace (manifests/rbac/metal-agent.yaml): the doctor asks them there.
FLEET_PERMISSIONS: tuple[Permission, ...] = (
    *_grant("list watch", COORDINATION_GROUP, "leases",
            why="fleet: every Mac watches the fleet's Leases (members and replicas)"),
    *_grant("create update", COORDINATION_GROUP, "leases",
            why="fleet: renew this Mac's Lease; take a free replica (an update at the resourceVersion it was seen)"),
    *_grant("get", COORDINATION_GROUP, "leases",
            why="fleet: re-read a silent Mac's Lease before taking its replicas over"),
    *_grant("delete", COORDINATION_GROUP, "leases",
            why="fleet: release a replica when its service is scaled down or deleted"),
)
