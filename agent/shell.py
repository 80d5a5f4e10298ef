"""The bash tool: one command at a time in its own process group, output to a file (so a
background job left running cannot hold the call open), a timeout that kills the whole group,
and the working directory carried from one call to the next."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

# Exit status a command gets when the timeout killed it, as coreutils' `timeout` reports it.
TIMED_OUT = 124


@dataclass
class ShellResult:
    output: str
    exit_code: int
    cwd: str
    timed_out: bool


def _wrap(command: str, cwd_file: Path) -> str:
    # The user's command runs in this shell itself (so `cd` and `export` work within the call);
    # the trap records where it ended up, whether it exits normally or through `exit`.
    return f"trap 'pwd > {shlex.quote(str(cwd_file))}' EXIT\n{command}\n"


async def run_bash(
    command: str, cwd: Path, limit_s: float, output_file: Path, env: dict[str, str] | None = None
) -> ShellResult:
    """Run `command` with bash in `cwd`; stdout and stderr together go to `output_file`."""
    output_file.parent.mkdir(parents=True, exist_ok=True)
    cwd_file = output_file.with_suffix(".cwd")
    cwd_file.unlink(missing_ok=True)
    with output_file.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            _wrap(command, cwd_file),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        timed_out = False
        try:
            exit_code = await asyncio.wait_for(process.wait(), limit_s)
        except TimeoutError:
            timed_out = True
            exit_code = TIMED_OUT
        finally:
            # The command's own children (pipelines, subshells) die with it; nothing else does.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
    return _collect(output_file, cwd_file, cwd, exit_code, timed_out)


def _collect(
    output_file: Path, cwd_file: Path, cwd: Path, exit_code: int, timed_out: bool
) -> ShellResult:
    new_cwd = cwd
    if cwd_file.exists():
        recorded = Path(cwd_file.read_text().strip())
        if recorded.is_dir():
            new_cwd = recorded
        cwd_file.unlink()
    output = output_file.read_text(errors="replace")
    return ShellResult(output=output, exit_code=exit_code, cwd=str(new_cwd), timed_out=timed_out)
