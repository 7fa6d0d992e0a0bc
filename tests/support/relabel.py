"""Prometheus's relabelling, enough of it to check the shipped rules without a Prometheus.

The integration tests run the real thing; this lets the unit tests apply
`manifests/monitoring/scrape-config.yaml` to the meta labels Prometheus's
`endpointslice` discovery derives from our objects, in milliseconds. Only
the actions and defaults those rules use are modelled (keep, drop, replace;
separator ';', regex '(.*)' anchored, replacement '$1').
"""

from __future__ import annotations

import re

SLICE = "__meta_kubernetes_endpointslice_"


def sanitize(name: str) -> str:
    """Prometheus's strutil.SanitizeLabelName: anything but [a-zA-Z0-9_] becomes '_'."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def slice_meta_labels(body: dict) -> dict[str, str]:
    """What role `endpointslice` derives from one slice with one endpoint and one port."""
    meta = body["metadata"]
    labels = {"__meta_kubernetes_namespace": meta["namespace"], SLICE + "name": meta["name"],
              SLICE + "address_type": body["addressType"]}
    for key, value in (meta.get("labels") or {}).items():
        labels[SLICE + "label_" + sanitize(key)] = value
        labels[SLICE + "labelpresent_" + sanitize(key)] = "true"
    port = body["ports"][0]
    labels[SLICE + "port_name"] = port["name"]
    labels[SLICE + "port"] = str(port["port"])
    endpoint = body["endpoints"][0]
    labels[SLICE + "endpoint_conditions_ready"] = str(endpoint["conditions"]["ready"]).lower()
    labels["__address__"] = f"{endpoint['addresses'][0]}:{port['port']}"
    return labels


def relabel(rules: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Apply `rules` (relabel_configs); None if the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        regex = re.compile("^(?:" + rule.get("regex", "(.*)") + ")$")
        match = regex.match(value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            target = rule["target_label"]
            result = match.expand(rule.get("replacement", "$1").replace("$1", r"\g<1>") if regex.groups
                                  else rule.get("replacement", "$1"))
            if result:
                labels[target] = result
            else:
                labels.pop(target, None)
    return labels


def target_labels(job: dict, meta: dict[str, str]) -> dict[str, str] | None:
    """The labels a target of `job` ends up with: relabelled, `job` added, `__` labels gone."""
    out = relabel(job.get("relabel_configs", []), meta)
    if out is None:
        return None
    out.setdefault("job", job["job_name"])
    out.setdefault("instance", out["__address__"])
    return {k: v for k, v in out.items() if not k.startswith("__")}
