"""A multi-host job simulated on this machine: several train.py processes (one CPU device
each) joined by `jax.distributed` through a coordinator on a free local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train_processes(config: Path, workdir: Path, overrides: list[str], compilation_cache: Path,
                        *, processes: int = 2, timeout: float = 300, check: bool = True
                        ) -> tuple[list[int], list[str]]:
    """Runs `train.py --config CONFIG --workdir WORKDIR --set ...` as one job of `processes`
    processes (`--coordinator`, `--num-processes`, `--process-id`) and returns their exit
    codes and outputs (stdout and stderr), process 0 first; `check` asserts that each exits
    with 0. A job still running after `timeout` seconds is killed and raises."""
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)                  # one device per process
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--workdir",
           str(workdir), "--compilation-cache", str(compilation_cache), "--coordinator",
           f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    for o in overrides:
        cmd += ["--set", o]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(processes)]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    codes = [proc.returncode for proc in procs]
    for i, (code, out) in enumerate(zip(codes, outputs)):
        assert code == 0 or not check, f"process {i} exited with {code}:\n{out[-3000:]}"
    return codes, outputs
