"""Small helpers shared by the tests that start processes (pytest puts tests/ on sys.path)."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ok(proc):
    """The finished process, or a failure showing the tail of what it printed."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc
