"""All supervised llama-servers of this agent, and the ones a previous agent left.

At start-up the records of the previous agent are checked against the
running processes (`live_process`: pid, create time and command line must
all match). A verified process is *adoptable*: the reconciler adopts it when
its InferenceService still wants exactly that spec, which costs no reload.
Records whose process is gone are dropped; verified processes nobody wants
are stopped once the cluster state is known. A pid that fails verification
is never signalled.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import aiohttp
import structlog

from metal_agent.adapters.process.exitwatch import wait_exit
from metal_agent.adapters.process.log_retention import remove_stale_service_logs, rotate_agent_log
from metal_agent.adapters.process.logfile import ServiceLog
from metal_agent.adapters.process.records import ProcessRecord, RecordStore, find_unrecorded, live_process
from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.adapters.process.supervisor import LaunchPlan, Supervisor
from metal_agent.adapters.process.terminate import terminate_group
from metal_agent.core.engine import Engine
from metal_agent.core.engines import engine_named
from metal_agent.core.engines.llama_server import LLAMA_SERVER
from metal_agent.core.process import Snapshot, SupervisorEvent

log = structlog.get_logger(__name__)

OnChange = Callable[[str, Snapshot, SupervisorEvent | None], None]
OnProbe = Callable[[str, float], None]


def log_file_name(key: str) -> str:
    return key.replace("/", "__") + ".log"


async def terminate_recorded(record: ProcessRecord, grace: float) -> None:
    """Stop a process from a record, only if it provably is that process."""
    if live_process(record) is None:
        return
    waiter = asyncio.ensure_future(wait_exit(record.pid))
    try:
        await terminate_group(record.pid, waiter, grace)
    finally:
        waiter.cancel()


class ProcessManager:
    def __init__(
        self,
        *,
        records: RecordStore,
        log_dir: Path,
        http: aiohttp.ClientSession,
        on_change: OnChange,
        settings: SupervisorSettings = SupervisorSettings(),
        log_max_bytes: int = 20 * 1024 * 1024,
        on_probe: OnProbe | None = None,
    ) -> None:
        self.on_probe = on_probe
        self.records = records
        self.log_dir = log_dir
        self.http = http
        self.on_change = on_change
        self.settings = settings
        self.log_max_bytes = log_max_bytes
        self.supervisors: dict[str, Supervisor] = {}
        self.adoptable: dict[str, ProcessRecord] = {}

    def load_adoptable(self) -> None:
        for record in self.records.load_all():
            if record.pid == 0:  # written before an exec whose agent died before the full record
                found = find_unrecorded(record)
                if found is None:
                    self.records.remove(record.key, pid=0)
                    continue
                record = found
                self.records.save(record)
            if live_process(record) is not None:
                self.adoptable[record.key] = record
                log.info("found llama-server from a previous agent", service=record.key, pid=record.pid)
            else:
                self.records.remove(record.key)

    def service_log(self, key: str) -> ServiceLog:
        return ServiceLog(self.log_dir / log_file_name(key), max_bytes=self.log_max_bytes)

    def get(self, key: str) -> Supervisor | None:
        return self.supervisors.get(key)

    def has_record(self, key: str) -> bool:
        """A process serves `key`: supervised by us, or left running by the previous agent."""
        return key in self.supervisors or key in self.adoptable

    def _supervisor(self, plan: LaunchPlan) -> Supervisor:
        return Supervisor(
            plan, log_file=self.service_log(plan.key), records=self.records, http=self.http,
            on_change=lambda snap, event, key=plan.key: self.on_change(key, snap, event), settings=self.settings,
            on_probe=(lambda seconds, key=plan.key: self.on_probe(key, seconds)) if self.on_probe else None,
        )

    async def start(self, plan: LaunchPlan) -> Supervisor:
        """Supervise `plan`: adopt the matching previous process, or spawn a new one."""
        if plan.key in self.supervisors:
            raise RuntimeError(f"{plan.key} is already supervised")
        supervisor = self._supervisor(plan)
        record = self.adoptable.pop(plan.key, None)
        if record is not None:
            matches = record.uid == plan.uid and record.spec_hash == plan.spec_hash and record.host == plan.host
            if matches and live_process(record) is not None:
                self.supervisors[plan.key] = supervisor
                supervisor.adopt(record)
                return supervisor
            log.info("previous llama-server runs another spec; replacing it", service=plan.key, pid=record.pid)
            await terminate_recorded(record, self.settings.stop_grace)
            self.records.remove(plan.key, pid=record.pid, create_time=record.create_time)
        self.supervisors[plan.key] = supervisor
        supervisor.start()
        return supervisor

    def supervise_recorded(self) -> list[str]:
        """Supervise every verified process of the previous agent as it was recorded, before
        the cluster is even reachable: like a kubelet, the Mac keeps its models healthy
        (probes, restarts) through an API outage of any length. The reconciler takes each
        over, or replaces or stops it, once it knows the cluster's wishes."""
        return [key for key, record in list(self.adoptable.items())
                if self.adopt_as_recorded(key, record.uid) is not None]

    def adopt_as_recorded(self, key: str, uid: str) -> Supervisor | None:
        """Keep a previous agent's process running as it was, without a valid spec to check it against.

        Used when the service's current spec is invalid: the recorded command
        line is the last valid spec, and a typo must not cost a model reload.
        Restarts after a crash reuse exactly that command line.
        """
        record = self.adoptable.get(key)
        if record is None or record.uid != uid or not record.argv or live_process(record) is None:
            return None
        del self.adoptable[key]
        argv = record.argv
        plan = LaunchPlan(key=key, uid=uid, spec_hash=record.spec_hash, host=record.host,
                          build_argv=lambda port: argv, port=record.port, engine=_engine_of(record))
        supervisor = self._supervisor(plan)
        self.supervisors[key] = supervisor
        supervisor.adopt(record)
        return supervisor

    async def stop(self, key: str) -> None:
        supervisor = self.supervisors.pop(key, None)
        if supervisor is not None:
            await supervisor.stop()
        record = self.adoptable.pop(key, None)
        if record is not None:
            await terminate_recorded(record, self.settings.stop_grace)
            self.records.remove(key, pid=record.pid, create_time=record.create_time)

    async def stop_unwanted_adoptable(self, wanted: Callable[[str], bool]) -> None:
        """Stop processes of a previous agent whose service is gone or changed hands."""
        for key, record in list(self.adoptable.items()):
            if not wanted(key):
                log.info("stopping llama-server no longer wanted", service=key, pid=record.pid)
                del self.adoptable[key]
                await terminate_recorded(record, self.settings.stop_grace)
                self.records.remove(key, pid=record.pid, create_time=record.create_time)

    async def shutdown(self, *, stop_processes: bool) -> None:
        """Agent exit: by default leave llama-servers running for the next agent to adopt."""
        supervisors, self.supervisors = list(self.supervisors.values()), {}
        if stop_processes:
            await asyncio.gather(*(s.stop() for s in supervisors))
        else:
            await asyncio.gather(*(s.detach() for s in supervisors))

    async def rotate_logs(self, *, agent_log_max_bytes: int = 50 * 1024 * 1024,
                          retention: float = 7 * 24 * 3600) -> None:
        """Cap every log (the agent's own included) and drop logs of services gone for `retention`."""
        for key in list(self.supervisors):
            await asyncio.to_thread(self.service_log(key).rotate_if_needed)
        await asyncio.to_thread(rotate_agent_log, self.log_dir, agent_log_max_bytes)
        live = {log_file_name(key) for key in (*self.supervisors, *self.adoptable)}
        if removed := await asyncio.to_thread(remove_stale_service_logs, self.log_dir, live, retention):
            log.info("removed logs of services gone for a while", files=removed)


def _engine_of(record: ProcessRecord) -> Engine:
    """The engine a record names; one this agent does not know is probed as llama-server."""
    try:
        return engine_named(record.engine)
    except ValueError:
        return LLAMA_SERVER
