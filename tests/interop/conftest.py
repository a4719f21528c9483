"""Fixtures for interop tests: start the real `flotilla` binary on
127.0.0.1 port 0, read the bound ports from its `listening` log lines, and
kill it afterwards."""

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LISTENING = re.compile(r'listening proto="([\w-]+)" addr=([\d.]+):(\d+)')


def flotilla_bin():
    env = os.environ.get("FLOTILLA_BIN")
    if env:
        return env
    for profile in ("release", "debug"):
        p = os.path.join(ROOT, "target", profile, "flotilla")
        if os.path.exists(p):
            return p
    raise RuntimeError("build flotilla first (cargo build --release) or set FLOTILLA_BIN")


class Router:
    """A running `flotilla router` process."""

    def __init__(self, *args, component="router"):
        cmd = [flotilla_bin(), component, "--amqp", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.ports = {}
        self.log = []
        deadline = time.monotonic() + 20
        want = 1 + ("--amqps" in args) + ("--inter-router" in args)
        while len(self.ports) < want:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("router did not report listening:\n" + "".join(self.log))
            line = self.proc.stderr.readline()
            if not line:
                self.stop()
                raise RuntimeError("router exited:\n" + "".join(self.log))
            self.log.append(line)
            m = LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))
        # Keep draining the log so the pipe never fills.
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self):
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def url(self):
        return "127.0.0.1:%d" % self.ports["amqp"]

    def wait_for_log(self, pattern, timeout=20):
        """Waits (bounded) until a log line matches `pattern`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            if any(rx.search(l) for l in list(self.log)):
                return
            time.sleep(0.05)
        raise RuntimeError("no log line matching %r:\n%s" % (pattern, "".join(self.log)))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def router():
    r = Router()
    yield r
    r.stop()


@pytest.fixture
def tmpdir_path():
    d = tempfile.mkdtemp(prefix="flotilla-interop-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def broker(tmpdir_path):
    b = Router("--data-dir", tmpdir_path, component="broker")
    yield b
    b.stop()


@pytest.fixture
def start_router():
    started = []

    def start(*args):
        r = Router(*args)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
