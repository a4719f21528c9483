"""Fixtures for interop tests: start the real `flotilla` binary on
127.0.0.1 port 0, read the bound ports from its `listening` log lines, and
kill it afterwards. Also what every test module uses: `TIMEOUT`, a blocking
proton `connect`, a `Scenario` running several proton connections at once,
and `config_file` to write a config for a process."""

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
from proton import Endpoint
from proton.reactor import Container
from proton.utils import BlockingConnection

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LISTENING = re.compile(r'listening proto="([\w-]+)" addr=([\d.]+):(\d+)')
# The bound on a client's wait, in seconds.
TIMEOUT = 10


def connect(url, **kw):
    """A blocking python-qpid-proton connection to `url`."""
    return BlockingConnection(url, timeout=TIMEOUT, **kw)


def wait_until(what, cond, timeout=30):
    """Polls `cond` (bounded) until it returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


def flotilla_bin():
    env = os.environ.get("FLOTILLA_BIN")
    if env:
        return env
    for profile in ("release", "debug"):
        p = os.path.join(ROOT, "target", profile, "flotilla")
        if os.path.exists(p):
            return p
    raise RuntimeError("build flotilla first (cargo build --release) or set FLOTILLA_BIN")


# An argument for Router/Broker (never passed on): start without the
# suite's mesh secret.
NO_MESH_SECRET = "<no mesh secret>"
_MESH_DIR = tempfile.mkdtemp(prefix="flotilla-interop-mesh-")
atexit.register(shutil.rmtree, _MESH_DIR, True)
# The mesh secret every router and broker of the suite shares, as every
# installation has one (`flotilla up` makes it in its data directory).
MESH_SECRET_FILE = os.path.join(_MESH_DIR, "mesh-secret")
with open(MESH_SECRET_FILE, "w") as _f:
    _f.write("interop-mesh-secret-0123456789abcdef")


def with_mesh_secret(args):
    """`args` with `--mesh-secret-file` for the suite's secret, unless they
    give their own or say NO_MESH_SECRET (which is dropped)."""
    args = list(args)
    if NO_MESH_SECRET in args:
        args.remove(NO_MESH_SECRET)
    elif "--mesh-secret-file" not in args:
        args += ["--mesh-secret-file", MESH_SECRET_FILE]
    return args


class Router:
    """A running `flotilla router` process."""

    def __init__(self, *args, component="router", amqp="127.0.0.1:0", listen="--amqp", want=None):
        args = with_mesh_secret(args)
        cmd = [flotilla_bin(), component, listen, amqp, *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.ports = {}
        self.log = []
        deadline = time.monotonic() + 20
        if want is None:
            want = 1 + ("--amqps" in args) + ("--inter-router" in args) + ("--http" in args)
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
            exited = self.proc.poll() is not None
            if exited:
                # Its last lines may still be in the pipe: read them all.
                self._drain.join(max(0, deadline - time.monotonic()))
            if sum(1 for l in list(self.log) if rx.search(l)) >= count:
                return
            if exited:
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


class Gateway(Router):
    """A running `flotilla mqtt-gateway` on its router: `port` is its MQTT
    listener's (and `ports` has `mqtts` and `mqtt-ws` when asked for)."""

    def __init__(self, *args, mqtt="127.0.0.1:0"):
        self.args = args
        want = 1 + ("--mqtts" in args) + ("--mqtt-ws" in args) + ("--http" in args)
        super().__init__(*args, component="mqtt-gateway", amqp=mqtt, listen="--mqtt", want=want)

    @property
    def port(self):
        return self.ports["mqtt"]

    def restart(self):
        """Kills the gateway (SIGKILL) and starts it again on the same port."""
        self.stop()
        self.__init__(*self.args, mqtt="127.0.0.1:%d" % self.port)


LWT_UP = r'broker connected \(route container\).*broker="\$lwt"'


class Lwt:
    """A running `flotilla lwt` (the last-will service) joined to `router`
    as the route container of `$lwt`; it has no listener of its own."""

    def __init__(self, data_dir, router, *args):
        self.data_dir, self.router, self.args = data_dir, router, args
        before = sum(1 for l in list(router.log) if re.search(LWT_UP, l))
        cmd = [flotilla_bin(), "lwt", "--router", router.url, "--data-dir", data_dir,
               *with_mesh_secret(args)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log = []
        self._drain = threading.Thread(target=Router._read_rest, args=(self.proc, self.log), daemon=True)
        self._drain.start()
        try:
            router.wait_for_log(LWT_UP, count=before + 1)
        except RuntimeError:
            self.stop()
            raise RuntimeError("the last-will service did not join:\n" + "".join(self.log))

    def restart(self):
        """Kills the service (SIGKILL) and starts it again on the same data."""
        self.stop()
        self.__init__(self.data_dir, self.router, *self.args)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def followers(console, data_dir, lwt=False):
    """A router, a broker behind it, optionally the last-will service, and
    an MQTT gateway, all following `console`. Returns (router, gateway,
    procs); the caller stops `procs`."""
    follow = console.follow_args()
    procs = []
    try:
        router = Router(*follow)
        procs.append(router)
        procs.append(Broker(os.path.join(data_dir, "broker"), *follow, "--router", router.url))
        router.wait_for_log(r"broker connected \(route container\)")
        if lwt:
            procs.append(Lwt(os.path.join(data_dir, "lwt"), router, *follow))
        gw = Gateway(*follow, "--router", router.url)
        procs.append(gw)
        router.wait_for_log(r"component connected .*gateway=true", count=2)
        return router, gw, procs
    except Exception:
        for p in reversed(procs):
            p.stop()
        raise


def make_certs(d):
    """A CA and a server certificate for 127.0.0.1 and localhost, by openssl."""
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=flotilla-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return os.path.join(d, "ca.pem"), os.path.join(d, "server.pem"), os.path.join(d, "server.key")



class Scenario:
    """Runs `parts` in one proton container: each is a handler with
    `start(container)`, which opens its connection `conn`, and `tick()`,
    called every 50 ms. Runs until `done()` holds or the timeout (then
    `timed_out`). With `close`, it then closes the parts' connections and
    stops once the peer has closed each (so every settlement reached it)."""

    def __init__(self, parts, done, timeout=TIMEOUT, close=False):
        self.parts, self.done, self.timeout, self.close = parts, done, timeout, close
        self.timed_out = self.closing = False

    def run(self):
        Container(self).run()
        return self

    def on_reactor_init(self, event):
        self.deadline = time.monotonic() + self.timeout
        for p in self.parts:
            p.start(event.container)
        event.container.schedule(0.05, self)

    def on_timer_task(self, event):
        for p in self.parts:
            p.tick()
        if self.closing:
            if all(p.conn.state & Endpoint.REMOTE_CLOSED for p in self.parts):
                return event.container.stop()
        elif self.done():
            if not self.close:
                return event.container.stop()
            self.closing = True
            for p in self.parts:
                p.conn.close()
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return event.container.stop()
        event.container.schedule(0.05, self)


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
def config_file(tmpdir_path):
    """`config_file(yaml)`: writes `yaml` to config.yaml in the test's
    temporary directory and returns its path (for `--config`)."""

    def write(yaml):
        path = os.path.join(tmpdir_path, "config.yaml")
        with open(path, "w") as f:
            f.write(yaml)
        return path

    return write


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


class Console:
    """A running `flotilla console` (the control plane) with its store and
    admin token in `data_dir`; `api()` calls its REST API with the token."""

    def __init__(self, data_dir, *args):
        self.data_dir = data_dir
        cmd = [flotilla_bin(), "console", "--http", "127.0.0.1:0", "--data-dir", data_dir, *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log = []
        self.port = None
        deadline = time.monotonic() + 20
        while self.port is None:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("console did not report listening:\n" + "".join(self.log))
            line = self.proc.stderr.readline()
            if not line:
                self.stop()
                raise RuntimeError("console exited:\n" + "".join(self.log))
            self.log.append(line)
            m = LISTENING.search(line)
            if m and m.group(1) == "http":
                self.port = int(m.group(3))
        self._drain = threading.Thread(target=Router._read_rest, args=(self.proc, self.log), daemon=True)
        self._drain.start()
        self.token_file = os.path.join(data_dir, "admin-token")
        with open(self.token_file) as f:
            self.token = f.read().strip()

    wait_for_log = Router.wait_for_log

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def follow_args(self):
        """`--console URL --console-token-file FILE`, for a router or broker."""
        return ["--console", self.url, "--console-token-file", self.token_file]

    ADMIN = object()

    def api(self, method, path, body=None, token=ADMIN):
        """One call with `token` (default: the admin token; None: no
        credentials): (status, JSON body or None)."""
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token is Console.ADMIN:
            token = self.token
        if token is not None:
            req.add_header("Authorization", "Bearer " + token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as res:
                status, raw = res.status, res.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except urllib.error.URLError as e:
            raise RuntimeError("%s %s: %s (console exit status %r); its log:\n%s"
                               % (method, path, e, self.proc.poll(), "".join(self.log))) from e
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    def expect(self, method, path, body=None, status=200):
        got, v = self.api(method, path, body)
        assert got == status, "%s %s: %s %s" % (method, path, got, v)
        return v

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def console(tmpdir_path):
    c = Console(os.path.join(tmpdir_path, "console"))
    yield c
    c.stop()
