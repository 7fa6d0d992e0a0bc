"""Downloads that cannot be turned against the Mac (issue 20, item 3), against real HTTP servers.

A Model's source is a stranger's URL. Each test plays one way of using the
agent's download against the Mac or against the namespace's own token, and
checks the refusal (the reason the service's status would carry) and that
nothing was sent, stored or leaked: the servers record every request and
its Authorization header, the cache directory is listed, logs are captured.

Addresses: everything is served on 127.0.0.0/8, which the agent refuses by
default (loopback). The "allowed" side of a test is the owner's flag naming
exactly one test address (`--download-allow-network 127.0.0.2/32`), so the
refused side (127.0.0.1, ::1, localhost, 169.254.169.254) is refused by the
very rule that protects a real Mac, not by a test switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from metal_agent.adapters.model_files import ModelFiles, ModelPending, ModelReady
from metal_agent.core.api import Model, ModelFormat, ModelSource, ModelSpec, ObjectMeta, SecretRef, SourceKind
from metal_agent.core.backoff import Backoff
from metal_agent.core.download_limits import DownloadLimits
from metal_agent.core.egress import policy
from metal_agent.core.status import Blocker
from tests.support.http_models import ModelHTTPServer, add_hub_repo, model_bytes, sha256, tls_pair
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20
FAST = Backoff(initial=0.01, factor=2.0, cap=0.05)
NS = "tenant"
TOKEN = "hf_Tenant5ecretT0kenValue0123456789"
SOURCE_HOST = "127.0.0.2"  # the one address the owner allows (and, for tokens, lists)
OTHER_HOST = "127.0.0.3"  # allowed for downloads in some tests, never a token host


def model(url: str, sha: str | None = None, name: str = "m", kind: SourceKind = SourceKind.HTTP,
          fmt: ModelFormat | None = None) -> Model:
    spec = ModelSpec(source=ModelSource(url, kind), sha256=sha, format=fmt or ModelFormat.GGUF)
    return Model(ObjectMeta(NS, name), spec)


class Tokens:
    """The namespace's Secret: records every read."""

    def __init__(self) -> None:
        self.reads = 0

    async def __call__(self, namespace: str, ref: SecretRef) -> str:
        self.reads += 1
        return TOKEN


@pytest.fixture
def tls(tmp_path):
    return tls_pair(tmp_path / "pki", hosts=("127.0.0.1", SOURCE_HOST, OTHER_HOST, "localhost", "::1"))


@pytest.fixture
async def servers():
    started: list[ModelHTTPServer] = []

    async def start(host: str = "127.0.0.1", tls=None, port: int = 0) -> ModelHTTPServer:
        server = ModelHTTPServer(host, tls, port)
        started.append(server)
        try:
            return await server.start()
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL and host.startswith("127.") and host != "127.0.0.1":
                pytest.skip(f"{host} is not on the loopback interface here (macOS: ifconfig lo0 alias {host})")
            raise

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def store(tmp_path, tls):
    """make(allow=[...], token_hosts=[...], limits=..., cache=...) -> (ModelFiles, ready keys, Tokens)."""
    made: list[ModelFiles] = []

    def make(allow=(f"{SOURCE_HOST}/32",), token_hosts=(SOURCE_HOST,), limits=None, cache=None,
             hf_endpoint="https://huggingface.co"):
        ready: list[str] = []
        tokens = Tokens()
        files = ModelFiles(cache or tmp_path / "cache", ready.append, registry=CollectorRegistry(),
                           token_provider=tokens, backoff=FAST, progress_interval=0.05,
                           egress=policy(allow, token_hosts, hf_endpoint), limits=limits,
                           ssl_context=tls[1], hf_endpoint=hf_endpoint)
        files.ready = ready
        made.append(files)
        return files, tokens

    yield make
    for files in made:
        await files.aclose()


async def settle(files: ModelFiles, m: Model, key: str, **kw):
    first = files.lookup(m, key, **kw)
    if not isinstance(first, ModelPending):
        return first
    await wait_for(lambda: key in files.ready, timeout=30, what=f"the download for {key} to end")
    return files.lookup(m, key, **kw)


def stored(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_no_secret(logs, *texts: str) -> None:
    assert TOKEN not in repr(logs)
    for text in texts:
        assert TOKEN not in text


# -- the token ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["other-host", "same-host-other-port", "plain-http-same-host"])
async def test_a_redirect_never_takes_the_token_to_another_origin(servers, store, tls, tmp_path, target):
    data = model_bytes(2 * MiB + 7)
    origin = await servers(SOURCE_HOST, tls[0])
    if target == "other-host":
        cdn = await servers(OTHER_HOST, tls[0])
    elif target == "same-host-other-port":
        cdn = await servers(SOURCE_HOST, tls[0])
    else:
        cdn = await servers(SOURCE_HOST)
    cdn_url = cdn.add("/signed/m.gguf", data)
    url = origin.redirect("/org/repo/resolve/main/m.gguf", cdn_url + "?X-Signature=abc")
    allow = [f"{SOURCE_HOST}/32", f"{OTHER_HOST}/32"]
    files, tokens = store(allow=allow)

    with capture_logs() as logs:
        found = await settle(files, model(url, sha256(data)), f"{NS}/a", secret_ref=SecretRef("hf"))

    assert isinstance(found, ModelReady) and found.path.read_bytes() == data
    assert [r.authorization for r in origin.requests] == [f"Bearer {TOKEN}"]  # the origin the token is for
    assert cdn.requests and all(r.authorization is None for r in cdn.requests)  # nothing arrived elsewhere
    assert_no_secret(logs)


async def test_a_token_source_on_a_host_not_listed_is_refused_before_anything(servers, store, tls, tmp_path):
    foreign = await servers(OTHER_HOST, tls[0])
    url = foreign.add("/m.gguf", model_bytes(MiB))
    files, tokens = store(allow=[f"{OTHER_HOST}/32"])
    with capture_logs() as logs:
        found = files.lookup(model(url), f"{NS}/f", secret_ref=SecretRef("hf"))
    assert isinstance(found, Blocker) and found.reason == "TokenHostNotAllowed"
    assert OTHER_HOST in found.message and "--token-hosts" in found.message
    await asyncio.sleep(0)  # give a (wrongly) started download its first step
    assert foreign.requests == [] and tokens.reads == 0 and not files.downloading()
    assert stored(tmp_path / "cache") == []
    assert_no_secret(logs, found.message)


async def test_plain_http_never_carries_the_token_even_to_a_listed_host(servers, store, tmp_path):
    plain = await servers(SOURCE_HOST)
    url = plain.add("/m.gguf", model_bytes(MiB), token=TOKEN)
    files, tokens = store()
    found = files.lookup(model(url), f"{NS}/h", secret_ref=SecretRef("hf"))
    assert isinstance(found, Blocker) and found.reason == "TokenHostNotAllowed" and "https" in found.message
    await asyncio.sleep(0)
    assert plain.requests == [] and tokens.reads == 0 and stored(tmp_path / "cache") == []


async def test_an_http_hub_endpoint_gets_no_token_either(servers, store, tmp_path):
    """hf:// with a token, the owner's hub mirror on plain http: refused, not sent in clear."""
    hub = await servers(SOURCE_HOST)
    add_hub_repo(hub, "org/private", {"config.json": b"{}"}, token=TOKEN)
    files, tokens = store(hf_endpoint=hub.url(""))
    found = files.lookup(model("hf://org/private", kind=SourceKind.HUGGINGFACE, fmt=ModelFormat.MLX), f"{NS}/x",
                         secret_ref=SecretRef("hf"))
    assert isinstance(found, Blocker) and found.reason == "TokenHostNotAllowed"
    await asyncio.sleep(0)
    assert hub.requests == [] and tokens.reads == 0


async def test_a_snapshots_cdn_redirects_carry_no_token(servers, store, tls, tmp_path):
    """A private MLX repository: the listing and resolve URLs on the hub get the token, the
    signed CDN URLs they redirect to do not."""
    hub = await servers(SOURCE_HOST, tls[0])
    cdn = await servers(OTHER_HOST, tls[0])
    repo_files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": model_bytes(MiB + 3)}
    commit = add_hub_repo(hub, "org/private", repo_files, token=TOKEN, lfs=("model.safetensors",))
    for name, data in repo_files.items():
        hub.redirect(f"/org/private/resolve/{commit}/{name}", cdn.add(f"/xet/{name}", data) + "?sig=1")
    files, _ = store(allow=[f"{SOURCE_HOST}/32", f"{OTHER_HOST}/32"], hf_endpoint=hub.url(""))
    m = model("hf://org/private", kind=SourceKind.HUGGINGFACE, fmt=ModelFormat.MLX)
    found = await settle(files, m, f"{NS}/s", secret_ref=SecretRef("hf"))
    assert isinstance(found, ModelReady), found
    assert hub.requests and all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert len(cdn.requests) == 2 and all(r.authorization is None for r in cdn.requests)


# -- addresses ---------------------------------------------------------------------------------------


ADDRESS = "DownloadAddressNotAllowed"


@pytest.mark.parametrize("target,reason", [
    ("127.0.0.1", ADDRESS), ("[::1]", ADDRESS), ("localhost", ADDRESS), ("[::ffff:127.0.0.1]", ADDRESS),
    ("127.1", "DownloadRedirectRefused"), ("169.254.169.254", ADDRESS), ("[fe80::1]", ADDRESS), ("0.0.0.0", ADDRESS),
    ("10.0.0.1", ADDRESS), ("192.168.1.1", ADDRESS),
    ("2130706433", "DownloadRedirectRefused"),  # short or decimal IPv4: the client refuses to parse it at all
])
async def test_a_redirect_to_a_non_public_address_is_refused_and_nothing_stored(servers, store, target, reason,
                                                                                 tmp_path):
    """The source is allowed (the owner listed it); where it redirects is not."""
    origin = await servers(SOURCE_HOST)
    victims = [await servers("127.0.0.1")]
    port = victims[0].port
    with contextlib.suppress(OSError):  # the same port on ::1, for [::1] and localhost's IPv6 answer
        victims.append(await servers("::1", port=port))
    for victim in victims:  # whatever the name or form reaches would serve a "model"
        victim.add("/admin", model_bytes(1000))
    url = origin.redirect("/m.gguf", f"http://{target}:{port}/admin")
    files, _ = store()
    with capture_logs() as logs:
        found = await settle(files, model(url), f"{NS}/r")
    assert isinstance(found, Blocker) and found.reason == reason, found
    assert [r.path for r in origin.requests] == ["/m.gguf"]
    for victim in victims:
        assert victim.requests == []
    assert stored(tmp_path / "cache") == []
    assert not any("admin" in str(e) and "secret" in str(e) for e in logs)


@pytest.mark.parametrize("host,reason", [
    ("127.0.0.1", ADDRESS), ("localhost", ADDRESS), ("[::ffff:127.0.0.1]", ADDRESS), ("127.1", "ModelSourceInvalid"),
    ("0x7f.0.0.1", ADDRESS), ("2130706433", "ModelSourceInvalid"),
])
async def test_a_source_on_this_mac_is_refused_by_default(servers, store, host, reason, tmp_path):
    victim = await servers("127.0.0.1")
    victim.add("/m.gguf", model_bytes(1000))
    files, _ = store(allow=())  # the agent's default: no network beyond public addresses
    found = await settle(files, model(f"http://{host}:{victim.port}/m.gguf"), f"{NS}/l")
    assert isinstance(found, Blocker) and found.reason == reason, found
    assert victim.requests == [] and stored(tmp_path / "cache") == []


async def test_the_owner_flag_allows_exactly_its_network(servers, store, tmp_path):
    """The allowed path is the same code: 127.0.0.2 listed, served; 127.0.0.3 not, refused."""
    data = model_bytes(MiB)
    allowed, other = await servers(SOURCE_HOST), await servers(OTHER_HOST)
    files, _ = store()
    found = await settle(files, model(allowed.add("/m.gguf", data)), f"{NS}/ok")
    refused = await settle(files, model(other.add("/m.gguf", data), name="o"), f"{NS}/no")
    assert isinstance(found, ModelReady) and found.path.read_bytes() == data
    assert isinstance(refused, Blocker) and refused.reason == "DownloadAddressNotAllowed"
    assert other.requests == []


async def test_redirect_mazes_and_other_schemes_are_refused(servers, store, tmp_path):
    origin = await servers(SOURCE_HOST)
    for i in range(20):
        origin.redirect(f"/loop{i}", f"/loop{i + 1}")
    origin.redirect("/file", "file:///etc/passwd")
    files, _ = store()
    maze = await settle(files, model(origin.url("/loop0"), name="a"), f"{NS}/a")
    scheme = await settle(files, model(origin.url("/file"), name="b"), f"{NS}/b")
    for found in (maze, scheme):
        assert isinstance(found, Blocker) and found.reason == "DownloadRedirectRefused", found
    assert len([r for r in origin.requests if r.path.startswith("/loop")]) == 11
    assert stored(tmp_path / "cache") == []


# -- sizes ---------------------------------------------------------------------------------------------


async def test_no_content_length_and_no_sha256_is_refused_and_nothing_kept(servers, store, tmp_path):
    server = await servers(SOURCE_HOST)
    url = server.add("/m.gguf", model_bytes(MiB), chunked=True, endless=True)
    files, _ = store()
    found = await settle(files, model(url), f"{NS}/c")
    assert isinstance(found, Blocker) and found.reason == "ModelSizeUnknown" and "sha256" in found.message
    assert stored(tmp_path / "cache") == []
    assert server.body_bytes_sent < 64 * MiB  # the client stopped reading at once


async def test_an_endless_body_is_cut_at_the_cap_even_with_a_sha256(servers, store, tmp_path):
    server = await servers(SOURCE_HOST)
    url = server.add("/m.gguf", model_bytes(MiB), chunked=True, endless=True)
    files, _ = store(limits=DownloadLimits(max_size=8 * MiB, free_margin=0))
    found = await settle(files, model(url, sha256(b"whatever")), f"{NS}/e")
    assert isinstance(found, Blocker) and found.reason == "ModelTooLarge" and "--max-download-size" in found.message
    assert stored(tmp_path / "cache") == []  # the partial was removed, not kept for a resume
    assert server.body_bytes_sent < 64 * MiB


async def test_a_file_announced_over_the_cap_is_refused_before_writing(servers, store, tmp_path):
    server = await servers(SOURCE_HOST)
    url = server.add("/big.gguf", model_bytes(3 * MiB))
    files, _ = store(limits=DownloadLimits(max_size=2 * MiB, free_margin=0))
    found = await settle(files, model(url), f"{NS}/big")
    assert isinstance(found, Blocker) and found.reason == "ModelTooLarge"
    assert stored(tmp_path / "cache") == []


# -- a full disk -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("case", ["enospc", "margin-while-writing", "margin-before-start"])
async def test_a_full_disk_removes_the_partial_and_touches_nothing_else(servers, store, tmp_path, case):
    with tmpfs(tmp_path / "volume", "16m") as volume:
        owner_file = volume / "owners-notes.txt"
        owner_file.write_bytes(b"x" * MiB)
        server = await servers(SOURCE_HOST)
        big = model_bytes(24 * MiB)
        if case == "margin-before-start":  # the size is known: refused before a byte is written
            url = server.add("/big.gguf", big)
            limits = DownloadLimits(free_margin=2 * MiB)
        elif case == "margin-while-writing":  # unknown size (sha256 pinned): stopped by the periodic check
            url = server.add("/big.gguf", big, chunked=True)
            limits = DownloadLimits(free_margin=4 * MiB, check_every=MiB)
        else:  # no margin at all: the disk fills and the write fails with ENOSPC
            url = server.add("/big.gguf", big, chunked=True)
            limits = DownloadLimits(free_margin=0, check_every=1 << 40)
        files, _ = store(limits=limits, cache=volume / "cache")
        free_before = free_bytes(volume)

        found = await settle(files, model(url, sha256(big)), f"{NS}/d")

        assert isinstance(found, Blocker) and found.reason == "InsufficientDisk", found
        assert "partial file was removed" in found.message
        assert not list(volume.rglob("*.partial")) and not list(volume.rglob("big.gguf"))
        assert owner_file.read_bytes() == b"x" * MiB
        assert free_bytes(volume) >= free_before - 64 * 1024  # the space is back (directories aside)

        # The store keeps working: a file that fits is downloaded on the same volume.
        small = model_bytes(MiB // 2)
        ok = await settle(files, model(server.add("/small.gguf", small), name="s"), f"{NS}/s")
        assert isinstance(ok, ModelReady) and ok.path.read_bytes() == small
        await files.aclose()


# -- the owner's flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (("--download-allow-network", "0.0.0.0/0"), "would allow every address"),
    (("--download-allow-network", "my-nas"), "is not a network"),
    (("--token-hosts", "*"), "is not a host name"),
    (("--max-download-size", "lots"), "--max-download-size"),
    (("--download-free-margin", "-1Gi"), "--download-free-margin"),
])
def test_bad_owner_flags_are_refused_with_one_clear_line(args, needle, tmp_path):
    import re
    import sys

    result = subprocess.run([sys.executable, "-m", "metal_agent", "run", "--no-power", "--llama-server",
                             str(tmp_path / "nope"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    flat = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())  # click's box wraps long lines
    assert needle in flat, result.stderr


async def test_a_snapshot_that_fills_the_disk_gives_back_every_file(servers, store, tls, tmp_path):
    """An MLX snapshot whose second file does not fit: the first (complete) one goes too."""
    with tmpfs(tmp_path / "volume", "16m") as volume:
        hub = await servers(SOURCE_HOST, tls[0])
        repo_files = {"a.safetensors": model_bytes(6 * MiB), "b.safetensors": model_bytes(8 * MiB, seed=2),
                      "config.json": b"{}"}
        add_hub_repo(hub, "org/big", repo_files, lfs=("a.safetensors", "b.safetensors"))
        files, _ = store(hf_endpoint=hub.url(""), cache=volume / "cache",
                         limits=DownloadLimits(free_margin=4 * MiB))
        m = model("hf://org/big", kind=SourceKind.HUGGINGFACE, fmt=ModelFormat.MLX)
        found = await settle(files, m, f"{NS}/big")
        assert isinstance(found, Blocker) and found.reason == "InsufficientDisk", found
        assert stored(volume / "cache") == []
        await files.aclose()
