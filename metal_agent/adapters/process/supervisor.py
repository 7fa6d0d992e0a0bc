"""Supervise one llama-server: start, readiness, liveness, restart with back-off, stop.

One `Supervisor` per InferenceService, each an independent asyncio task, so a
five-minute model load or a crash loop in one service never delays another.
Exit is awaited, not polled: the moment llama-server dies the supervisor
knows, marks it not ready (the reconciler flips the EndpointSlice) and
schedules the restart. Every transition is reported through `on_change` with
an optional event, which is all the reconciler needs to keep status, Events
and registration true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import aiohttp
import psutil
import structlog

from metal_agent.adapters.process.exitwatch import wait_exit
from metal_agent.adapters.process.health_probe import HealthProbe
from metal_agent.adapters.process.logfile import ServiceLog
from metal_agent.adapters.process.pause_point import AFTER_EXEC, pause_point
from metal_agent.adapters.process.records import ProcessRecord, RecordStore, argv_digest, same_start
from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.adapters.process.terminate import terminate_group
from metal_agent.core.engine import Engine
from metal_agent.core.engines.llama_server import LLAMA_SERVER
from metal_agent.core.process import ExitInfo, ExitReason, Snapshot, State, SupervisorEvent
from metal_agent.tasks import cancel_and_wait

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class LaunchPlan:
    """The supervisor's job for one service, not a launch type: the command line is
    `build_argv(port)` (the reconciler's closure over the engine's argv, `core.launch`'s
    settings and the process's files), so no launch field is copied here. `host` is where the
    supervisor picks a free port and probes: the address that argv binds to."""

    key: str
    uid: str
    spec_hash: str
    host: str
    build_argv: Callable[[int], Sequence[str]]
    port: int = 0  # 0: pick a free port on `host`
    engine: Engine = LLAMA_SERVER  # its probes and log reading (core.engine)


OnChange = Callable[[Snapshot, SupervisorEvent | None], None]


class _Running:
    """A live llama-server, spawned by us or adopted from a previous agent."""

    def __init__(self, pid: int, create_time: float, child: asyncio.subprocess.Process | None,
                 boot_time: float = 0.0) -> None:
        self.pid = pid
        self.create_time = create_time
        self.boot_time = boot_time
        self.child = child
        self.exited = asyncio.ensure_future(child.wait() if child else wait_exit(pid))

    @property
    def returncode(self) -> int | None:
        return self.child.returncode if self.child else None


def pick_port(host: str, preferred: int = 0) -> int:
    """`preferred` if it can be bound on `host`, else a port the kernel hands out."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ((preferred, 0) if preferred else (0,)):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port on {host}")


def child_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The agent's environment minus llama-server's own configuration variables.

    llama-server reads `LLAMA_ARG_*` (one per flag) and `LLAMA_API_KEY`
    before its command line; one left in the agent's environment would
    silently override a flag the agent owns (port, host, model, API key).
    """
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if not k.startswith("LLAMA_ARG_") and k != "LLAMA_API_KEY"}


def ready_poll_interval(elapsed: float) -> float:
    """Seconds between /health polls of a loading engine, `elapsed` seconds after its start:
    20 ms for the first 5 s (small models: noticed at most 20 ms late), 50 ms to 30 s, then
    250 ms (a big model's minutes of loading cost 4 probes a second, not 50)."""
    return 0.02 if elapsed < 5 else 0.05 if elapsed < 30 else 0.25


def _health_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class Supervisor:
    def __init__(
        self,
        plan: LaunchPlan,
        *,
        log_file: ServiceLog,
        records: RecordStore,
        http: aiohttp.ClientSession,
        on_change: OnChange,
        settings: SupervisorSettings = SupervisorSettings(),
        on_probe: Callable[[float], None] | None = None,
    ) -> None:
        self.plan = plan
        self.on_probe = on_probe
        self.log_file = log_file
        self.records = records
        self.http = http
        self.on_change = on_change
        self.settings = settings
        self._snapshot = Snapshot(key=plan.key, spec_hash=plan.spec_hash, state=State.STOPPED, host=plan.host,
                                  server=plan.engine.display)
        self._task: asyncio.Task | None = None
        self._running: _Running | None = None
        self._port = plan.port
        self._log = log.bind(service=plan.key)
        self.failed: BaseException | None = None  # the bug that ended supervision, if one did

    # -- public API -------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self) -> None:
        """Begin supervising: spawn now, restart on failure until stopped."""
        self._begin(adopt=None)

    def adopt(self, record: ProcessRecord) -> None:
        """Take over a llama-server a previous agent started (the caller verified it with `live_process`)."""
        self._port = record.port
        self._begin(adopt=_Running(record.pid, record.create_time, None, record.boot_time))

    async def stop(self) -> None:
        """Stop supervising and terminate the process; forget its record."""
        await self._cancel_task()
        running = self._running
        if running is not None and not running.exited.done():
            await self._terminate(running)
        self._running = None
        if running is not None:
            self.records.remove(self.plan.key, pid=running.pid, create_time=running.create_time)
        self._set(replace(self._snapshot, state=State.STOPPED, pid=None, ready_at=None, next_start_at=None))

    async def detach(self) -> None:
        """Stop supervising but leave the process running for the next agent to adopt."""
        await self._cancel_task()
        if self._running is not None:
            self._running.exited.cancel()

    # -- the loop ---------------------------------------------------------

    def _begin(self, adopt: _Running | None) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.plan.key} is already supervised")
        self._task = asyncio.create_task(self._run(adopt), name=f"supervise {self.plan.key}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        """Supervision only ends by stop() or detach() (cancellation). Anything else is a bug:
        say so loudly and tell the reconciler, which starts supervising afresh, rather than
        leave a service that looks managed while nothing watches its process."""
        if task.cancelled() or task.exception() is None:
            return
        self.failed = task.exception()
        self._log.error("supervision failed; the reconciler will start it again",
                        error=f"{type(self.failed).__name__}: {self.failed}", exc_info=self.failed)
        self._set(replace(self._snapshot, state=State.STOPPED, ready_at=None, next_start_at=None),
                  SupervisorEvent("SupervisorFailed", f"supervision of llama-server failed: "
                                  f"{type(self.failed).__name__}: {self.failed}", warning=True))

    async def _cancel_task(self) -> None:
        if self._task is not None:
            # Waits out the task's clean-up (a spawn in flight) without swallowing a
            # cancellation of our caller: a shutdown landing here must still shut down.
            # Either way the task has finished when this returns.
            try:
                await cancel_and_wait(self._task)
            finally:
                self._task = None

    async def _run(self, adopted: _Running | None) -> None:
        failures = 0
        restarts = 0
        while True:
            if adopted is not None:
                running, adopted = adopted, None
                self._running = running
                self._set(replace(self._snapshot, state=State.STARTING, pid=running.pid, port=self._port,
                                  adopted=True, started_at=time.time(), next_start_at=None))
                self._log.info("adopted running llama-server", pid=running.pid, port=self._port)
                # Its load happened under the previous agent: look at the whole recent log.
                exit_info, healthy_for = await self._watch(running, mark=0)
            else:
                mark = self.log_file.mark()
                running = None
                try:
                    running = await self._spawn()
                except OSError as err:
                    exit_info, healthy_for = ExitInfo(ExitReason.SPAWN_FAILED, None, (str(err),), time.time(), self.plan.engine.display), 0.0
                else:
                    exit_info, healthy_for = await self._watch(running, mark)
            self._running = None
            if running is not None:
                self.records.remove(self.plan.key, pid=running.pid, create_time=running.create_time)
            failures = self.settings.backoff.failures_after_run(failures, healthy_for)
            delay = self.settings.backoff.delay(failures)
            restarts += 1
            self._set(
                replace(self._snapshot, state=State.BACKOFF, pid=None, ready_at=None, adopted=False,
                        last_exit=exit_info, restarts=restarts, next_start_at=time.time() + delay),
                SupervisorEvent(exit_info.reason.value, exit_info.describe(), warning=True),
            )
            self._log.warning("llama-server failed; restarting after back-off", reason=exit_info.reason.value,
                              code=exit_info.code, delay_s=delay, stderr=list(exit_info.stderr_tail))
            await asyncio.sleep(delay)  # the back-off itself; cancelled by stop()
            self._set(self._snapshot, SupervisorEvent("Restarting", f"restart #{restarts} after {delay:g}s back-off"))

    async def _spawn(self) -> _Running:
        """Start llama-server. The launch itself is shielded from cancellation: a
        stop() that lands mid-spawn must still find the new process (in
        `self._running`) and terminate it, never leave it running unrecorded."""
        launch = asyncio.ensure_future(self._launch())
        try:
            return await asyncio.shield(launch)
        except asyncio.CancelledError:
            await launch
            raise

    async def _launch(self) -> _Running:
        port = pick_port(self.plan.host, self._port)
        self._port = port
        argv = [str(a) for a in self.plan.build_argv(port)]
        record = ProcessRecord(key=self.plan.key, uid=self.plan.uid, pid=0, create_time=0.0,
                               spec_hash=self.plan.spec_hash, port=port, host=self.plan.host,
                               argv_digest=argv_digest(argv), argv=tuple(argv), boot_time=psutil.boot_time(),
                               engine=self.plan.engine.name.value)
        # Written before the exec, without a pid: an agent killed between the exec and the
        # full record leaves a process the next agent can still find by its command line
        # (unique: it holds the port) and adopt or stop, never an orphan beside a second copy.
        # Nothing is started that could not be recorded (the state directory is the problem).
        try:
            self.records.save(record)
        except OSError as err:
            raise OSError(f"cannot write the process record in {self.records.dir}: {err.strerror or err}") from err
        fd = self.log_file.open_for_child()
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                env=child_environment(),
            )
        except BaseException:
            self.records.remove(self.plan.key, pid=0)
            raise
        finally:
            os.close(fd)
        pause_point(AFTER_EXEC)  # tests only (pause_point.py): the exec-to-record window, held open
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:
            create_time = 0.0
        running = _Running(child.pid, create_time, child)
        self._running = running
        try:
            self.records.save(replace(record, pid=child.pid, create_time=create_time))
        except OSError as err:
            # A process no later agent could prove it started, adopt or stop must not run:
            # stop it now and report the spawn as failed (the state directory is the problem).
            self._log.error("cannot record llama-server; stopping it", pid=child.pid, error=str(err))
            await self._terminate(running)
            self._running = None
            with contextlib.suppress(OSError):  # the pid-less record named the process just stopped
                self.records.remove(self.plan.key, pid=0)
            raise OSError(f"cannot write the process record in {self.records.dir}: {err.strerror or err}") from err
        self._set(
            replace(self._snapshot, state=State.STARTING, pid=child.pid, port=port, adopted=False,
                    started_at=time.time(), ready_at=None, next_start_at=None),
            SupervisorEvent("Started", f"{self.plan.engine.display} started (pid {child.pid}, port {port}); loading model"),
        )
        self._log.info("llama-server started", pid=child.pid, port=port)
        return running

    async def _watch(self, running: _Running, mark: int) -> tuple[ExitInfo, float]:
        """Readiness then liveness, until the process is gone; returns why and how long it was healthy."""
        base = f"http://{_health_host(self.plan.host)}:{self._port}"
        self._probe = HealthProbe(_health_host(self.plan.host).strip("[]"), self._port, self.plan.engine.probe.health_path)
        try:
            return await self._watch_with(running, mark, base)
        finally:
            self._probe.close()

    async def _watch_with(self, running: _Running, mark: int, base: str) -> tuple[ExitInfo, float]:
        reason = ExitReason.PROCESS_EXITED
        healthy_since: float | None = None
        if not await self._await_ready(running, base):
            if not running.exited.done():
                reason = ExitReason.STARTUP_TIMEOUT
                await self._terminate(running)
        else:
            healthy_since = time.monotonic()
            # One change, acceleration included: the log read is a thread hop (well under a
            # millisecond of the 50 ms to routable), while two changes would cost the service a
            # second status write on every start (Ready, then its acceleration).
            text = await asyncio.to_thread(self.log_file.read_since, mark)
            accel = self.plan.engine.acceleration(text)
            self._set(
                replace(self._snapshot, state=State.READY, ready_at=time.time(),
                        acceleration=accel or self._snapshot.acceleration),
                SupervisorEvent("Ready", f"{self.plan.engine.display} ready on port {self._port}"
                                + (f" ({accel.describe()})" if accel else "")),
            )
            self._log.info("llama-server ready", pid=running.pid, port=self._port)
            if not await self._live(running, base):
                reason = ExitReason.UNHEALTHY
                await self._terminate(running)
        await running.exited
        healthy_for = time.monotonic() - healthy_since if healthy_since else 0.0
        text = await asyncio.to_thread(self.log_file.read_since, mark)
        return ExitInfo(reason, running.returncode, tuple(self.plan.engine.problem_lines(text)), time.time(),
                        self.plan.engine.display), healthy_for

    async def _healthy(self, base: str, timeout: float | None = None) -> bool:
        """The engine's health path answers 200 (`base` names the server; the probe holds its
        connection). The default timeout is the liveness probe's."""
        started = time.monotonic()
        try:
            return await self._probe(self.settings.liveness_timeout if timeout is None else timeout)
        finally:
            if self.on_probe is not None:
                self.on_probe(time.monotonic() - started)

    async def _await_ready(self, running: _Running, base: str) -> bool:
        """Poll /health until 200; False on exit or timeout. The rhythm (`ready_poll_interval`)
        is how late a ready engine is noticed, so it is fast while most loads finish."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.settings.startup_timeout
        while not running.exited.done():
            if await self._healthy(base):
                return await self._model_loaded(running, base, deadline)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait({running.exited}, timeout=min(ready_poll_interval(loop.time() - started), remaining))
        return False

    async def _model_loaded(self, running: _Running, base: str, deadline: float) -> bool:
        """For a server whose /health is green before its model is loaded (mlx_lm.server): one
        request it only answers once the model is (`Probe.ready_path`), raced against the
        process's exit and /health turning red (its load failed). True at once for the others."""
        probe = self.plan.engine.probe
        if probe.ready_path is None:
            return True
        loop = asyncio.get_running_loop()
        request = asyncio.ensure_future(self._ready_request(base, probe.ready_path, probe.ready_body or "{}",
                                                            max(0.1, deadline - loop.time())))
        try:
            while True:
                done, _ = await asyncio.wait({request, running.exited}, timeout=1.0)
                if request in done:
                    return request.result()
                if running.exited.done() or loop.time() >= deadline or not await self._healthy(base):
                    return False
        finally:
            await cancel_and_wait(request)

    async def _ready_request(self, base: str, path: str, body: str, timeout: float) -> bool:
        try:
            async with self.http.post(f"{base}{path}", data=body, headers={"Content-Type": "application/json"},
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _live(self, running: _Running, base: str) -> bool:
        """Probe until the process exits (True) or fails N liveness probes in a row (False).

        Two kinds of probe, as Kubernetes has readiness and liveness: every
        `readiness_interval` a quick one (short timeout) that takes the server out
        of service (UNHEALTHY, so its slice says not ready) the moment it stops
        answering and back when it answers again; every `liveness_interval` one
        with the full `liveness_timeout`, and only those count towards a restart,
        so a server that is merely slow under load is never killed for it.
        """
        s = self.settings
        quick = min(s.readiness_interval, s.liveness_interval)
        failures = 0
        last_liveness = time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            # On the loop clock's grid of `quick`: every supervisor probes in the same wake-up, so
            # an idle agent wakes once per interval, not once per service (each wake-up of an idle
            # Python process costs far more than the probe it runs).
            done, _ = await asyncio.wait({running.exited}, timeout=quick - loop.time() % quick)
            if done:
                return True
            due = time.monotonic() - last_liveness >= s.liveness_interval - 1e-3
            healthy = await self._healthy(base, None if due else s.readiness_timeout)
            if due:
                last_liveness = time.monotonic()
            if healthy:
                failures = 0
                if self._snapshot.state is State.UNHEALTHY:
                    self._set(replace(self._snapshot, state=State.READY), SupervisorEvent("Recovered", f"{self.plan.engine.display} answers /health again"))
                continue
            if self._snapshot.state is not State.UNHEALTHY:
                self._set(replace(self._snapshot, state=State.UNHEALTHY),
                          SupervisorEvent("Unhealthy", f"{self.plan.engine.display} did not answer /health", warning=True))
            if due:
                failures += 1
                if failures >= s.liveness_failures:
                    return False

    async def _terminate(self, running: _Running) -> None:
        """SIGTERM the process group, SIGKILL after the grace period."""
        if running.child is None:
            record = ProcessRecord(self.plan.key, self.plan.uid, running.pid, running.create_time,
                                   self.plan.spec_hash, self._port or 0, self.plan.host, "", boot_time=running.boot_time)
            proc = _still_same(record)
            if proc is None:
                return
        await terminate_group(running.pid, running.exited, self.settings.stop_grace)

    def _set(self, snapshot: Snapshot, event: SupervisorEvent | None = None) -> None:
        self._snapshot = snapshot
        try:
            self.on_change(snapshot, event)
        except Exception:  # a broken observer must not kill supervision
            self._log.exception("on_change callback failed")


def _still_same(record: ProcessRecord) -> psutil.Process | None:
    """For adopted processes: is the pid still the process we adopted (create time)?"""
    try:
        proc = psutil.Process(record.pid)
        return proc if same_start(record, proc.create_time(), psutil.boot_time()) else None
    except psutil.Error:
        return None
