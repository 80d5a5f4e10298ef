"""The artifact store: publish a file or folder, fetch one by digest, list them."""

from __future__ import annotations

import json
import tarfile

from pydantic import Field

from aar_agent.tools.registry import Input, ToolContext, ToolError, ToolSet

toolset = ToolSet()


def _ascii_header(value: str) -> str:
    # HTTP header values are Latin-1 at best; one line of ASCII is safe everywhere.
    return " ".join(value.split()).encode("ascii", "replace").decode("ascii")


class ArtifactPublishInput(Input):
    path: str = Field(description="a file, or a folder (sent as a .tar.gz)")
    description: str
    parent: str | None = Field(default=None, description="digest this one derives from")


@toolset.tool(ArtifactPublishInput)
async def artifact_publish(
    context: ToolContext, arguments: ArtifactPublishInput, call_id: str
) -> str:
    """Publish a file or folder to the artifact store; returns its digest."""
    path = context.path(arguments.path)
    if not path.exists():
        raise ToolError(f"{path} does not exist")
    upload, filename = path, path.name
    if path.is_dir():
        upload = context.settings.state_dir / "outputs" / f"{call_id}.tar.gz"
        upload.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(upload, "w:gz") as archive:
            archive.add(path, arcname=path.name)
        filename = f"{path.name}.tar.gz"
    headers = {
        "X-Aar-Description": _ascii_header(arguments.description),
        "X-Aar-Filename": _ascii_header(filename),
        "Content-Type": "application/octet-stream",
    }
    if arguments.parent:
        headers["X-Aar-Parent"] = arguments.parent
    try:
        with upload.open("rb") as body:
            meta = await context.forum.request(
                "POST", "/api/v1/artifacts", data=body, headers=headers
            )
    finally:
        if upload != path:
            upload.unlink(missing_ok=True)
    return f"published {filename} as {meta.get('digest')} ({meta.get('size')} bytes)"


class ArtifactFetchInput(Input):
    digest: str
    destination: str = Field(description="file to write, or folder to extract into")
    extract: bool = Field(default=False, description="the artifact is a .tar.gz: unpack it")


@toolset.tool(ArtifactFetchInput)
async def artifact_fetch(context: ToolContext, arguments: ArtifactFetchInput, call_id: str) -> str:
    """Fetch an artifact by digest into your workspace."""
    destination = context.path(arguments.destination)
    target = context.output_file(call_id) if arguments.extract else destination
    target.parent.mkdir(parents=True, exist_ok=True)
    size = await context.forum.request(
        "GET", f"/api/v1/artifacts/{arguments.digest}", save_to=target
    )
    if not arguments.extract:
        return f"wrote {size} bytes to {destination}"
    try:
        destination.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "r:*") as archive:
            # The "data" filter refuses absolute paths, links out of the folder and devices.
            archive.extractall(destination, filter="data")
    except tarfile.TarError as error:
        raise ToolError(
            f"{arguments.digest} is not a tar archive ({error}); fetch it without extract"
        ) from error
    finally:
        target.unlink(missing_ok=True)
    return f"extracted {arguments.digest} into {destination}"


class ArtifactListInput(Input):
    author: str | None = Field(default=None, description="only this agent's artifacts")


@toolset.tool(ArtifactListInput)
async def artifact_list(context: ToolContext, arguments: ArtifactListInput, _: str) -> str:
    """List the run's artifacts."""
    params = {"author": arguments.author} if arguments.author else None
    found = await context.forum.request("GET", "/api/v1/artifacts", params=params)
    return json.dumps(found, indent=1)
