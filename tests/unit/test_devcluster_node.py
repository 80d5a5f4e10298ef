"""The local node's pure pieces: cluster DNS answers on the wire, scrape targets, the volumes the
provisioner makes, the guard's rules and the node's configuration files."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

from aar_devcluster import clusterdns, node, provisioner, targets


def query(name: str, qtype: int = clusterdns.TYPE_A, request_id: int = 0x1234) -> bytes:
    """A DNS query as a stub resolver sends it, recursion desired."""
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return (
        struct.pack("!HHHHHH", request_id, 0x0100, 1, 0, 0, 0)
        + question
        + b"\0"
        + (struct.pack("!HH", qtype, clusterdns.CLASS_IN))
    )


def service(name: str, namespace: str, cluster_ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"clusterIP": cluster_ip}}


def records() -> clusterdns.Records:
    table = clusterdns.Records()
    table.replace(
        [
            service("aar-forum", "aar-system", "10.0.0.42"),
            service("headless", "aar-system", "None"),
        ]
    )
    return table


def test_a_service_name_resolves_to_its_cluster_ip() -> None:
    reply = clusterdns.answer(query("aar-forum.aar-system.svc.cluster.local"), records())
    request_id, flags, questions, answers = struct.unpack("!HHHH", reply[:8])
    assert request_id == 0x1234
    assert flags & 0x8000  # a response
    assert flags & 0x0400  # authoritative
    assert flags & 0x000F == 0
    assert (questions, answers) == (1, 1)
    assert socket.inet_ntoa(reply[-4:]) == "10.0.0.42"


def test_names_outside_the_cluster_are_nxdomain_with_no_upstream() -> None:
    for name in ("pypi.org", "api.anthropic.com", "headless.aar-system.svc.cluster.local"):
        reply = clusterdns.answer(query(name), records())
        flags, answers = struct.unpack("!H", reply[2:4])[0], struct.unpack("!H", reply[6:8])[0]
        assert flags & 0x000F == clusterdns.RCODE_NXDOMAIN, name
        assert answers == 0


def test_another_type_for_a_known_name_is_an_empty_answer() -> None:
    reply = clusterdns.answer(query("aar-forum.aar-system.svc.cluster.local", qtype=28), records())
    flags, answers = struct.unpack("!H", reply[2:4])[0], struct.unpack("!H", reply[6:8])[0]
    assert (flags & 0x000F, answers) == (0, 0)


def test_a_malformed_query_is_a_format_error() -> None:
    reply = clusterdns.answer(b"\x12\x34\x01\x00\x00\x01", records())
    assert struct.unpack("!H", reply[2:4])[0] & 0x000F == clusterdns.RCODE_FORMERR


def test_a_service_claims_outside_names_by_annotation() -> None:
    table = records()
    relay = service("anthropic-api", "aar-system", "10.0.0.9")
    relay["metadata"]["annotations"] = {
        clusterdns.DNS_NAMES_ANNOTATION: "API.anthropic.com, x.test"
    }
    table.apply("ADDED", relay)
    assert table.lookup("api.anthropic.com.") == "10.0.0.9"
    assert table.lookup("x.test") == "10.0.0.9"
    assert table.lookup("anthropic-api.aar-system.svc.cluster.local") == "10.0.0.9"
    # Dropping the annotation (or the Service) drops the names it claimed at once.
    relay["metadata"]["annotations"] = {}
    table.apply("MODIFIED", relay)
    assert table.lookup("api.anthropic.com") is None
    assert table.lookup("anthropic-api.aar-system.svc.cluster.local") == "10.0.0.9"
    table.apply("DELETED", relay)
    assert table.lookup("anthropic-api.aar-system.svc.cluster.local") is None


def test_the_watch_adds_and_removes_names() -> None:
    table = records()
    table.apply("ADDED", service("web", "research", "10.0.0.7"))
    assert table.lookup("web.research.svc.cluster.local.") == "10.0.0.7"
    table.apply("DELETED", service("web", "research", "10.0.0.7"))
    assert table.lookup("web.research.svc.cluster.local") is None


def pod(phase: str, ports: list[dict[str, Any]], ip: str = "10.244.0.9") -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "aar-system", "labels": {}},
        "status": {"phase": phase, "podIP": ip},
        "spec": {"containers": [{"name": "c", "ports": ports}]},
    }


def test_only_running_pods_ports_named_metrics_are_scraped() -> None:
    found = targets.targets(
        [
            # A service: its API port is not scraped, its metrics port is.
            pod(
                "Running",
                [
                    {"name": "http", "containerPort": 8080},
                    {"name": "metrics", "containerPort": 9090},
                ],
            ),
            pod("Running", [{"name": "metrics", "containerPort": 9091}, {"name": "health"}]),
            pod("Running", [{"name": "dns", "containerPort": 5353}]),
            pod("Pending", [{"name": "metrics", "containerPort": 9090}], ip=""),
            pod("Succeeded", [{"name": "metrics", "containerPort": 9090}]),
        ]
    )
    assert [t["targets"] for t in found] == [["10.244.0.9:9090"], ["10.244.0.9:9091"]]
    assert found[0]["labels"] == {"namespace": "aar-system", "pod": "p", "app": ""}


def test_a_claim_gets_a_local_volume_pinned_to_the_node_and_bound_to_it() -> None:
    claim = {
        "metadata": {"name": "w-0-workspace", "namespace": "research", "uid": "u-1"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
    }
    volume = provisioner.volume_for(claim, Path("/volumes"))
    assert volume["metadata"]["name"] == "pvc-u-1"
    assert volume["spec"]["local"] == {"path": "/volumes/pvc-u-1"}  # local honours fsGroup
    assert volume["spec"]["capacity"] == {"storage": "2Gi"}
    assert volume["spec"]["claimRef"]["uid"] == "u-1"
    term = volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["values"] == [node.NODE_NAME]


def test_the_guard_covers_the_pod_service_and_link_ranges_on_every_host_interface() -> None:
    rules = node.guard_rules("10.0.0.0/24")
    assert [rule[1] for rule in rules] == [node.POD_RANGE, "10.0.0.0/24", str(node.LINK_RANGE)]
    for rule in rules:
        assert rule[2:5] == ["!", "-o", "aarh+"]  # only a node's own veth is exempt
        assert rule[-3:] == ["REJECT", "--reject-with", "icmp-admin-prohibited"]


def test_the_kubelet_never_shows_pods_the_hosts_resolver() -> None:
    link = node.Link("abcd1234", "198.18.0.1", "198.18.0.2")
    config = node.kubelet_config(link, Path("/ca.crt"), Path("/empty-resolv.conf"))
    assert config["resolvConf"] == "/empty-resolv.conf"
    assert config["clusterDNS"] == [node.CLUSTER_DNS_IP]
    assert config["address"] == link.node_ip
    assert config["authentication"]["anonymous"] == {"enabled": False}
    assert config["cgroupRoot"] == "/aar-abcd1234"


def test_pods_get_a_bridge_that_never_masquerades() -> None:
    bridge = node.cni_config(Path("/ipam"))["plugins"][0]
    assert bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"] == [[{"subnet": node.POD_CIDR}]]
