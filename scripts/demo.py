"""`make demo`: the whole loop on this machine, no Mac and no cluster needed.

Starts a real control plane (etcd + kube-apiserver with RBAC, from the test
harness), installs our CRDs and the agent's role, runs the real agent with
its least-privilege identity, applies a sample Model + InferenceService for
the tiny generated model, waits until Ready, prints what `kubectl` would
show, sends a chat completion through the address the agent registered in
the EndpointSlice, then cleans everything up.

As root (Linux), the "Mac" runs in a network namespace so the registered
address is real and reachable, exactly as in the integration tests.
Otherwise registration is switched off and the completion goes to
llama-server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml
from kubernetes_asyncio import client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import netns, tiny_model  # noqa: E402
from tests.support.agent import AgentOptions, AgentProcess, reap_front_doors  # noqa: E402
from tests.support.controlplane import Binaries, ControlPlane  # noqa: E402
from tests.support.isvc import Cluster  # noqa: E402
from tests.support.kube import api_client, install_metal_agent  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

NAMESPACE = "demo"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def asset(script: str) -> Path:
    out = subprocess.run(["bash", str(REPO / "scripts" / script)], env=dict(os.environ, METAL_AGENT_NO_BUILD="1"),
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{script}: assets not built; run `make dev` first")
    return Path(out.stdout.strip())


def columns(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    """Rows as kubectl prints them: each column as wide as its widest cell, three spaces
    between, the last column unpadded, so a long reason never runs into the message."""
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return [indent + "   ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip() for row in cells]


async def show(cluster: Cluster, name: str) -> None:
    """Roughly what `kubectl get isvc` and `kubectl describe isvc` would print."""
    st = (await cluster.isvc(name)).get("status", {})
    ready = f"{st.get('readyReplicas')}/{st.get('desiredReplicas')}"
    print("\n".join(columns(("NAME", "PHASE", "READY", "ENDPOINT"),
                            [(name, st.get("phase", ""), ready, st.get("endpoint", "-"))])))
    print("\nConditions:")
    print("\n".join(columns(("TYPE", "STATUS", "REASON", "MESSAGE"),
                            [(c["type"], c["status"], c["reason"], c.get("message", ""))
                             for c in st.get("conditions", [])], indent="  ")))
    print("\nEvents:")
    print("\n".join(columns(("TYPE", "REASON", "MESSAGE"),
                            [(e.type, e.reason, e.message) for e in await cluster.events(name)], indent="  ")))


async def main() -> None:
    llama = asset("build-llama-server.sh")
    cp_dir = asset("build-controlplane.sh")
    model = tiny_model.ensure_model(tiny_model.DEFAULT, llama.parent.parent / "models" / "ggml-vocab-llama-spm.gguf")
    use_netns = netns.available()

    with tempfile.TemporaryDirectory(prefix="metal-agent-demo-") as tmp:
        tmp = Path(tmp)
        say("starting a local control plane (etcd + kube-apiserver, RBAC on)")
        cp = ControlPlane(Binaries.in_dir(cp_dir), tmp / "cp")
        await cp.start()
        admin = await api_client(cp.admin_kubeconfig)
        agent = None
        try:
            await install_metal_agent(admin)
            await client.CoreV1Api(admin).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))

            async with (netns.network_namespace() if use_netns else contextlib.nullcontext()) as ns:
                kubeconfig = cp.agent_kubeconfig
                if ns is not None:
                    forwarder, port = await netns.forward_into(ns, cp.port)
                    config = yaml.safe_load(kubeconfig.read_text())
                    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
                    kubeconfig = tmp / "agent.kubeconfig"
                    kubeconfig.write_text(yaml.safe_dump(config))
                say("starting metal-agent as the least-privilege identity"
                    + (f" inside network namespace {ns.name} ({ns.inner_ip})" if ns else " (no registration: not root)"))
                agent = AgentProcess(AgentOptions(kubeconfig=kubeconfig, llama_server=llama, workdir=tmp / "agent",
                                                  namespaces=(NAMESPACE,), host_ip=ns.inner_ip if ns else None, netns=ns))
                await agent.start()

                say("applying a Model (accelerator: metal) and an InferenceService")
                cluster = Cluster(admin, NAMESPACE)
                await cluster.create_model("tiny-llama", f"file://{model}")
                await cluster.create_isvc("tiny-chat", "tiny-llama", contextSize=512)
                await cluster.wait_phase("tiny-chat", "Ready", timeout=120)
                await show(cluster, "tiny-chat")

                if ns is not None:
                    slices = await client.DiscoveryV1Api(admin).list_namespaced_endpoint_slice(
                        NAMESPACE, label_selector="kubernetes.io/service-name=tiny-chat")
                    found = slices.items[0]
                    url = f"http://{found.endpoints[0].addresses[0]}:{found.ports[0].port}"
                    say(f"EndpointSlice points at {url}; sending a chat completion there")
                else:
                    url = f"http://127.0.0.1:{(await agent.services())[0]['port']}"
                    say(f"sending a chat completion to {url}")
                async with aiohttp.ClientSession() as http:
                    body = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 12}
                    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                        answer = await resp.json()
                print(f"HTTP {resp.status}; reply (random weights, so junk): {answer['choices'][0]['message']['content']!r}")

                say("cleaning up")
                await cluster.delete_isvc("tiny-chat")
                await wait_for(lambda: _no_services(agent), timeout=20, what="llama-server stopped")
                await agent.stop()
                if ns is not None:
                    forwarder.close()
        finally:
            if agent is not None and agent.process and agent.process.running:
                await agent.process.stop()
            reap_front_doors()  # the front door outlives an agent by design (it keeps serving); not the demo
            await admin.close()
            await cp.stop()
    say("done: everything stopped and removed")


async def _no_services(agent: AgentProcess) -> bool:
    return await agent.services() == []


if __name__ == "__main__":
    asyncio.run(main())
