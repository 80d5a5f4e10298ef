"""Local volumes for the node: `python -m aar_devcluster.provisioner`, started with the node.

Every claim of the default StorageClass `aar-local` gets a `local` PersistentVolume of its own, a
directory under the node's volume root, pinned to the node. A `local` volume (unlike `hostPath`)
honours a Pod's `fsGroup`, so a non-root agent can write its workspace. A released volume is
deleted with its directory. Polls once a second: the development cluster has tens of claims.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from aar_devcluster.kubeapi import KubeApi, add_api_arguments, api_from, run_every
from aar_devcluster.node import NODE_NAME

STORAGE_CLASS = "aar-local"
PROVISIONER = "aar.dev/local"


def storage_class() -> dict[str, Any]:
    """The cluster's default StorageClass: claims that name none get it."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def volume_for(claim: dict[str, Any], root: Path) -> dict[str, Any]:
    """The `local` PersistentVolume, bound in advance to `claim`."""
    meta, spec = claim["metadata"], claim["spec"]
    name = f"pvc-{meta['uid']}"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "local": {"path": str(root / name)},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [NODE_NAME],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }


def reconcile(api: KubeApi, root: Path) -> None:
    """One pass: a volume for each unbound claim of our class, and released volumes deleted."""
    claims = api.get("/api/v1/persistentvolumeclaims")["items"]
    volumes = api.get("/api/v1/persistentvolumes")["items"]
    ours = [v for v in volumes if v["spec"].get("storageClassName") == STORAGE_CLASS]
    claimed = {v["spec"].get("claimRef", {}).get("uid") for v in ours}
    for claim in claims:
        if (
            claim["spec"].get("storageClassName") == STORAGE_CLASS
            and not claim["spec"].get("volumeName")
            and claim["metadata"]["uid"] not in claimed
            and not claim["metadata"].get("deletionTimestamp")
        ):
            volume = volume_for(claim, root)
            (root / volume["metadata"]["name"]).mkdir(parents=True, exist_ok=True)
            api.create("/api/v1/persistentvolumes", volume)
            print(
                f"Provisioned {volume['metadata']['name']} for "
                f"{claim['metadata']['namespace']}/{claim['metadata']['name']}",
                flush=True,
            )
    for volume in ours:
        if volume.get("status", {}).get("phase") in ("Released", "Failed"):
            name = volume["metadata"]["name"]
            api.delete(f"/api/v1/persistentvolumes/{name}")
            shutil.rmtree(root / name, ignore_errors=True)
            print(f"Deleted released volume {name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aar_devcluster.provisioner")
    add_api_arguments(parser)
    parser.add_argument("--root", type=Path, required=True, help="where volumes' directories go")
    args = parser.parse_args(argv)
    api = api_from(args)
    args.root.mkdir(parents=True, exist_ok=True)
    api.create("/apis/storage.k8s.io/v1/storageclasses", storage_class())
    run_every(1, lambda: reconcile(api, args.root), "Provisioning pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
