"""Cluster DNS for the local node: `python -m aar_devcluster.clusterdns`, run as a Pod.

It answers A queries for `<service>.<namespace>.svc.cluster.local` with the Service's cluster IP,
kept current by a watch on Services, and NXDOMAIN for every other name: there is no upstream, so
a Pod can resolve the cluster's Services and nothing else. The one way out is a name a Service
claims with the annotation `aar.dev/dns-names` (the egress relay's, when an API key is set).
It runs behind the `kube-dns` Service of `kube-system` (10.0.0.10, port 53 to this server's
unprivileged port), labelled `k8s-app: kube-dns` like CoreDNS, so NetworkPolicies written for a
real cluster select it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from aar_devcluster.kubeapi import ApiError, KubeApi

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DOMAIN = "svc.cluster.local"
TTL = 5
# A Service may claim outside names, comma-separated: the egress relay's Service claims
# api.anthropic.com, so a Pod reaching for that name reaches the relay (see egress.py).
DNS_NAMES_ANNOTATION = "aar.dev/dns-names"
TYPE_A = 1
CLASS_IN = 1
RCODE_NXDOMAIN = 3
RCODE_FORMERR = 1


class Records:
    """DNS names to cluster IPs, from the Services; shared between the watch and the servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[str, tuple[list[str], str]] = {}
        self._addresses: dict[str, str] = {}

    def replace(self, services: list[dict[str, Any]]) -> None:
        table = {}
        for service in services:
            names, address = records_of(service)
            if address:
                table[service_key(service)] = (names, address)
        with self._lock:
            self._services = table
            self._index()

    def apply(self, event: str, service: dict[str, Any]) -> None:
        names, address = records_of(service)
        with self._lock:
            if event == "DELETED" or not address:
                self._services.pop(service_key(service), None)
            else:
                self._services[service_key(service)] = (names, address)
            self._index()

    def _index(self) -> None:
        # Rebuilt whole on every change, so a Service that drops an alias loses it at once.
        self._addresses = {
            name: address for names, address in self._services.values() for name in names
        }

    def lookup(self, name: str) -> str | None:
        with self._lock:
            return self._addresses.get(name.lower().rstrip("."))


def service_key(service: dict[str, Any]) -> str:
    return f"{service['metadata']['namespace']}/{service['metadata']['name']}"


def records_of(service: dict[str, Any]) -> tuple[list[str], str | None]:
    """A Service's DNS names (its own, then those its `aar.dev/dns-names` annotation claims) and
    its cluster IP (None for a headless Service)."""
    meta = service["metadata"]
    address = service.get("spec", {}).get("clusterIP")
    aliases = (meta.get("annotations") or {}).get(DNS_NAMES_ANNOTATION, "")
    names = [f"{meta['name']}.{meta['namespace']}.{DOMAIN}"]
    names += [alias.strip().lower().rstrip(".") for alias in aliases.split(",") if alias.strip()]
    return names, address if address and address != "None" else None


def parse_question(query: bytes) -> tuple[str, int, int]:
    """The first question's name, type and class; ValueError for a malformed query."""
    if len(query) < 12:
        raise ValueError("shorter than a DNS header")
    labels, offset = [], 12
    while True:
        if offset >= len(query):
            raise ValueError("name runs past the end")
        length = query[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(query[offset : offset + length].decode("ascii", errors="replace"))
        offset += length
    if offset + 4 > len(query):
        raise ValueError("question has no type and class")
    qtype, qclass = struct.unpack("!HH", query[offset : offset + 4])
    return ".".join(labels), qtype, qclass


def answer(query: bytes, records: Records) -> bytes:
    """The reply to one query: one A record, an empty NOERROR (other types of a known name) or
    NXDOMAIN."""
    request_id, flags = struct.unpack("!HH", query[:4]) if len(query) >= 4 else (0, 0)
    recursion_desired = flags & 0x0100
    try:
        name, qtype, qclass = parse_question(query)
    except ValueError:
        return struct.pack("!HHHHHH", request_id, 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
    question_end = 12 + sum(len(label) + 1 for label in name.split(".") if label) + 1 + 4
    question = query[12:question_end]
    address = records.lookup(name)
    reply_flags = 0x8000 | 0x0400 | recursion_desired  # a response, authoritative
    if address is None:
        header = struct.pack("!HHHHHH", request_id, reply_flags | RCODE_NXDOMAIN, 1, 0, 0, 0)
        return header + question
    if qtype != TYPE_A or qclass != CLASS_IN:
        return struct.pack("!HHHHHH", request_id, reply_flags, 1, 0, 0, 0) + question
    record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", request_id, reply_flags, 1, 1, 0, 0) + question + record


def in_cluster_api() -> KubeApi:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = (SERVICE_ACCOUNT / "token").read_text().strip()
    return KubeApi(f"https://{host}:{port}", token, SERVICE_ACCOUNT / "ca.crt")


def watch_services(api: KubeApi, records: Records) -> None:
    """List, then follow the watch; list again whenever it ends or fails."""
    while True:
        try:
            listing = api.get("/api/v1/services")
            records.replace(listing["items"])
            version = listing["metadata"]["resourceVersion"]
            request = urllib.request.Request(
                f"{api.server}/api/v1/services?watch=1&resourceVersion={version}"
                "&timeoutSeconds=300",
                headers={"Authorization": f"Bearer {api.token}"},
            )
            with urllib.request.urlopen(request, timeout=330, context=api.context) as stream:
                for line in stream:
                    event = json.loads(line)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        records.apply(event["type"], event["object"])
        except (ApiError, OSError, ValueError, KeyError) as error:
            print(f"Watch on Services ended: {error}; listing again", flush=True)
            time.sleep(1)


def serve(port: int, records: Records) -> None:
    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(answer(data, records), self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            prefix = self.rfile.read(2)
            if len(prefix) < 2:  # a readiness probe connects and closes
                return
            size = struct.unpack("!H", prefix)[0]
            reply = answer(self.rfile.read(size), records)
            self.wfile.write(struct.pack("!H", len(reply)) + reply)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    tcp = socketserver.ThreadingTCPServer(("0.0.0.0", port), Tcp)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    with socketserver.ThreadingUDPServer(("0.0.0.0", port), Udp) as udp:
        print(f"Serving cluster DNS on port {port}", flush=True)
        udp.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aar_devcluster.clusterdns")
    parser.add_argument("--port", type=int, default=5353)
    args = parser.parse_args(argv)
    records = Records()
    threading.Thread(target=watch_services, args=(in_cluster_api(), records), daemon=True).start()
    serve(args.port, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
