"""`flotilla up`, the README's first command, as a user runs it: the whole
system in one process, reached by clients no one here wrote, and stopped
by SIGTERM."""

import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from proton import Message
from proton.reactor import AtMostOnce

from conftest import TIMEOUT, connect, flotilla_bin
from mqtt_client import Client

LISTENING = re.compile(r'(flotilla_\w+): listening proto="([\w-]+)" addr=[\d.]+:(\d+)')


def test_up_runs_everything_and_stops_on_sigterm():
    data = tempfile.mkdtemp(prefix="flotilla-up-")
    proc = subprocess.Popen(
        [flotilla_bin(), "up", "--data-dir", data, "--amqp", "127.0.0.1:0", "--broker-amqp", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--gateways", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log, ports = [], {}
    try:
        deadline = time.monotonic() + 30
        while "gateway" not in ports or len(ports.get("gateway", [])) < 2 or "router" not in ports \
                or not any("gateway=true" in l for l in log) or not any("broker connected" in l for l in log):
            assert time.monotonic() < deadline, "".join(log)
            line = proc.stderr.readline()
            assert line, "flotilla up exited:\n" + "".join(log)
            log.append(line)
            m = LISTENING.search(line)
            if m:
                who = {"flotilla_router": "router", "flotilla_mqtt_gateway": "gateway"}.get(m.group(1))
                if who:
                    ports.setdefault(who, []).append(int(m.group(3)))
        threading.Thread(target=lambda: [log.append(l) for l in proc.stderr], daemon=True).start()
        # AMQP through the router (anycast; at most once, as sender and
        # receiver share one blocking connection).
        c = connect("127.0.0.1:%d" % ports["router"][0])
        rcv = c.create_receiver("jobs", credit=5)
        snd = c.create_sender("jobs", options=AtMostOnce())
        snd.send(Message(body="job 1"))
        assert rcv.receive(timeout=TIMEOUT).body == "job 1"
        c.close()
        # MQTT: a persistent session made on one gateway, its messages
        # taken on the other.
        a, b = ports["gateway"]
        sub = Client(a, client_id="up-sub", clean=False)
        assert sub.subscribe("sensors/#", 1) == [1]
        sub.disconnect()
        pub = Client(b)
        pub.publish("sensors/t1", b"21.5", qos=1)
        pub.disconnect()
        again = Client(b, client_id="up-sub", clean=False)
        assert again.session_present
        m = again.receive()
        assert (m.topic, m.payload) == ("sensors/t1", b"21.5")
        again.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("flotilla up did not stop on SIGTERM")
        finally:
            shutil.rmtree(data, ignore_errors=True)
    assert code == 0, "".join(log)
