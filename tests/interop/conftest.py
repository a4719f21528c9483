"""Fixtures for interop tests: start the real `flotilla` binary on
127.0.0.1 port 0, read the bound ports from its `listening` log lines, and
kill it afterwards."""

import json
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

    def __init__(self, *args, component="router", amqp="127.0.0.1:0"):
        cmd = [flotilla_bin(), component, "--amqp", amqp, *args]
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
        self._drain = threading.Thread(target=self._read_rest, args=(self.proc, self.log), daemon=True)
        self._drain.start()

    @staticmethod
    def _read_rest(proc, log):
        for line in proc.stderr:
            log.append(line)

    @property
    def url(self):
        return "127.0.0.1:%d" % self.ports["amqp"]

    def wait_for_log(self, pattern, timeout=20, count=1):
        """Waits (bounded) until `count` log lines match `pattern`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            if sum(1 for l in list(self.log) if rx.search(l)) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("no log line matching %r:\n%s" % (pattern, "".join(self.log)))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Broker(Router):
    """A running `flotilla broker` with its journal in `data_dir`."""

    def __init__(self, data_dir, *args, amqp="127.0.0.1:0"):
        self.data_dir, self.args = data_dir, args
        super().__init__("--data-dir", data_dir, *args, component="broker", amqp=amqp)

    def restart(self):
        """Kills the broker (SIGKILL: no clean shutdown) and starts it again
        in place on the same data dir and port."""
        self.stop()
        self.__init__(self.data_dir, *self.args, amqp=self.url)

    def queues(self):
        """The broker's queues by address, as `flotilla stat --json` reports them."""
        out = subprocess.run(
            [flotilla_bin(), "stat", "--url", "amqp://" + self.url, "--json"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        return {q["address"]: q for q in json.loads(out)["queues"]}


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


@pytest.fixture
def start_broker():
    """Starts brokers (`start(data_dir, *args)`); all are killed afterwards."""
    started = []

    def start(data_dir, *args):
        b = Broker(data_dir, *args)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
