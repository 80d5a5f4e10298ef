"""The node's one way out: a relay to the Anthropic API, used only when a real API key is set.

The node has no route off this machine, so nothing a Pod sends can leave through a host
interface. With `ANTHROPIC_API_KEY` the gateway Pod must still reach api.anthropic.com: a relay on
the host end of the node's link joins each connection to that one destination and nothing else,
bytes untouched. TLS runs end to end between the gateway and the API, so the gateway checks the
API's certificate itself and the relay only ever sees ciphertext. In the cluster, a Service with
no selector has the relay as its endpoint and claims the name for cluster DNS (annotation
`aar.dev/dns-names`), so the gateway's default upstream, `https://api.anthropic.com`, works as it
does in a real cluster.

The relay is `socat`, like the forwarder to the apiserver. It names the node's directory on its
command line (as its log name), so the node's teardown stops it with the node's other processes.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from aar_devcluster.clusterdns import DNS_NAMES_ANNOTATION
from aar_devcluster.node import Node, NodeError, processes_naming, spawn_logged
from aar_devcluster.tools import Tool

ANTHROPIC_API = "api.anthropic.com"
HTTPS_PORT = 443
# Where the relay listens on the link's host address; the address is the node's own /30, so
# the port cannot clash with anything but another relay of the same node.
RELAY_PORT = 9443


def relay_marker(node: Node, destination: str) -> str:
    """The relay's name on its command line: the node's directory (for teardown) and where to."""
    return f"aar-egress:{node.directory}:{destination}"


def start_relay(node: Node, destination: str, listen_port: int = RELAY_PORT) -> str:
    """Start (or keep) the relay from the link's host address to `destination` (`host:port`);
    returns the address Pods reach it at, `host_ip:port`."""
    state = node.read_state()
    if state is None or not node.running():
        raise NodeError("the node is not running: start the cluster first (make cluster-up)")
    listen = f"{state.host_ip}:{listen_port}"
    marker = relay_marker(node, destination)
    if processes_naming(marker):
        return listen
    node.log_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "socat",
        "-lp",
        marker,
        f"TCP-LISTEN:{listen_port},bind={state.host_ip},reuseaddr,fork",
        f"TCP:{destination}",
    ]
    relay = spawn_logged(command, node.log_dir / "egress.log", new_session=True)
    deadline = time.monotonic() + 10
    while not _listening(listen):
        if relay.poll() is not None or time.monotonic() > deadline:
            relay.kill()
            raise NodeError(
                f"the egress relay to {destination} did not listen on {listen}; "
                f"see {node.log_dir / 'egress.log'}"
            )
        time.sleep(0.05)
    return listen


def _listening(address: str) -> bool:
    # Asked of the kernel, not by connecting: a test connection would make the relay dial out.
    sockets = subprocess.run(
        ["ss", "-Hltn", "src", address], capture_output=True, text=True, check=False
    ).stdout
    return bool(sockets.strip())


def relay_service(
    name: str, namespace: str, dns_name: str, relay: str, port: int = HTTPS_PORT
) -> list[dict[str, Any]]:
    """A Service without a selector whose one endpoint is the relay (`host_ip:port`), claiming
    `dns_name` in cluster DNS."""
    address, relay_port = relay.rsplit(":", 1)
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": {DNS_NAMES_ANNOTATION: dns_name},
            },
            "spec": {"ports": [{"name": "relay", "port": port, "targetPort": int(relay_port)}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": name, "namespace": namespace},
            "subsets": [
                {
                    "addresses": [{"ip": address}],
                    "ports": [{"name": "relay", "port": int(relay_port)}],
                }
            ],
        },
    ]


def open_egress(
    node: Node,
    kubectl: Tool,
    namespace: str,
    *,
    name: str = "anthropic-api",
    dns_name: str = ANTHROPIC_API,
    destination: str = f"{ANTHROPIC_API}:{HTTPS_PORT}",
    port: int = HTTPS_PORT,
    listen_port: int = RELAY_PORT,
) -> str:
    """Let Pods reach `dns_name:port`, and only that, through a relay to `destination`; returns
    where the relay listens."""
    relay = start_relay(node, destination, listen_port)
    kubectl.apply(*relay_service(name, namespace, dns_name, relay, port))
    return relay
