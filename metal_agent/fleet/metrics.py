"""The fleet on /metrics, read at scrape time (nothing to keep up to date between scrapes)."""

from __future__ import annotations

from metal_agent.core.names import METRIC_PREFIX
from metal_agent.fleet.membership import Membership


class FleetCollector:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.membership
        now = m.now()
        held = GaugeMetricFamily(METRIC_PREFIX + "fleet_replicas_held", "replica Leases this Mac holds")
        held.add_metric([], len(m.replicas_held(m.me)))
        members = GaugeMetricFamily(METRIC_PREFIX + "fleet_members", "members of the fleet by state", labels=["state"])
        others = m.others()
        alive = sum(1 for name in others if name != m.me and m.alive(name, now)) + (not m.fenced(now))
        members.add_metric(["alive"], alive)
        members.add_metric(["expired"], len(set(others) | {m.me}) - alive)
        fenced = GaugeMetricFamily(METRIC_PREFIX + "fleet_fenced",
                                   "1 while this Mac could not renew its Lease in time (it serves nothing)")
        fenced.add_metric([], 1 if m.fenced(now) else 0)
        renewals = CounterMetricFamily(METRIC_PREFIX + "fleet_lease_renewals", "renewals of this Mac's Lease",
                                       labels=["outcome"])
        for outcome, count in m.renewals.items():
            renewals.add_metric([outcome], count)
        return [held, members, fenced, renewals]
