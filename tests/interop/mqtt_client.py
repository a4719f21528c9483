"""A blocking wrapper around paho-mqtt 2.x (a client no one here wrote) for
the MQTT interop tests, and raw-socket packets for the bad-input tests."""

import queue
import socket
import struct
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import TIMEOUT


class Refused(Exception):
    """CONNACK refused the connection: `code` is paho's reason code value
    (3.1.1 return codes are mapped onto 5.0 reason codes by paho)."""

    def __init__(self, code):
        super().__init__("CONNACK refused: %r" % code)
        self.code = code


class Client:
    """One paho client, connected (or Refused) when constructed. Messages
    arrive in `messages`; `disconnected` is set when the server closes."""

    def __init__(self, port, client_id="", v5=False, clean=True, user=None, password=None,
                 expiry=None, will=None, keepalive=30, connect_props=None,
                 transport="tcp", tls_ca=None, host="127.0.0.1"):
        self.v5 = v5
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else clean, reconnect_on_failure=False,
                             transport=transport)
        if tls_ca is not None:
            self.c.tls_set(ca_certs=tls_ca)
        self.messages = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        self.session_present = None
        self.connack_props = None
        self.disconnect_reason = None
        self.subacks = {}
        self.unsubacks = {}
        self.acks = {}
        self._sub_done = {}
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        if user is not None:
            self.c.username_pw_set(user, password)
        if will is not None:
            self.c.will_set(*will)
        kw = {}
        if v5:
            props = connect_props or Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            kw = {"clean_start": clean, "properties": props}
        self.c.connect(host, port, keepalive=keepalive, **kw)
        self.c.loop_start()
        if not self.connected.wait(TIMEOUT):
            self.close()
            raise AssertionError("no CONNACK within %ss" % TIMEOUT)
        if self.connack != 0:
            self.close()
            raise Refused(self.connack)

    def _on_connect(self, c, u, flags, rc, props):
        self.connack = rc.value
        self.session_present = flags.session_present
        self.connack_props = props
        self.connected.set()

    def _on_disconnect(self, c, u, flags, rc, props):
        self.disconnect_reason = rc.value if rc is not None else None
        self.disconnected.set()
        self.connected.set()

    def _on_subscribe(self, c, u, mid, codes, props):
        self.subacks[mid] = [x.value for x in codes]
        self._sub_done.setdefault(mid, threading.Event()).set()

    def _on_unsubscribe(self, c, u, mid, codes, props):
        self.unsubacks[mid] = [x.value for x in codes] if isinstance(codes, list) else codes
        self._sub_done.setdefault(mid, threading.Event()).set()

    def _on_publish(self, c, u, mid, rc, props):
        self.acks[mid] = rc.value if rc is not None else 0

    def _wait_mid(self, mid):
        ev = self._sub_done.setdefault(mid, threading.Event())
        assert ev.wait(TIMEOUT), "no SUBACK/UNSUBACK within %ss" % TIMEOUT

    def subscribe(self, topic, qos=1, **opts):
        """Subscribes and returns the SUBACK's codes (granted QoS or failure)."""
        if self.v5:
            so = mqtt.SubscribeOptions(qos=qos, **opts)
            props = None
            if "sid" in opts:
                raise ValueError("pass sid as props")
            rc, mid = self.c.subscribe(topic, options=so)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        self._wait_mid(mid)
        return self.subacks[mid]

    def subscribe_with(self, topic, qos, props):
        rc, mid = self.c.subscribe(topic, options=mqtt.SubscribeOptions(qos=qos), properties=props)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        self._wait_mid(mid)
        return self.subacks[mid]

    def unsubscribe(self, topic):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        self._wait_mid(mid)
        return self.unsubacks[mid]

    def publish(self, topic, payload, qos=0, retain=False, props=None, wait=True):
        """Publishes; for QoS 1 and 2 waits for the PUBACK/PUBCOMP and
        returns its reason code (0 for QoS 0)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos == 0 or not wait:
            return info
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), "no PUBACK/PUBCOMP for %s within %ss" % (topic, TIMEOUT)
        return self.acks.get(info.mid, 0)

    def receive(self, timeout=TIMEOUT):
        return self.messages.get(timeout=timeout)

    def receive_n(self, n, timeout=TIMEOUT):
        return [self.receive(timeout) for _ in range(n)]

    def nothing_more(self, within=0.5):
        """True when no message arrives within `within` seconds (used only
        after a later marker message proved delivery has caught up)."""
        try:
            m = self.messages.get(timeout=within)
        except queue.Empty:
            return True
        raise AssertionError("unexpected message on %s: %r" % (m.topic, m.payload))

    def disconnect(self):
        self.c.disconnect()
        self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT (the connection is lost)."""
        self.c.loop_stop()
        self.c.socket().close()


# ---- raw packets for the bad-input tests ----

def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s):
    b = s if isinstance(s, bytes) else s.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect_packet(version=4, client_id="raw", name=b"MQTT", props=b"", flags=0x02, keep_alive=30):
    vh = utf8(name) + bytes([version, flags]) + struct.pack(">H", keep_alive)
    if version == 5:
        vh += varint(len(props)) + props
    return packet(0x10, vh + utf8(client_id))


def publish_packet(topic, payload=b"x", qos=0, version=4, pid=1, props=b"", flags=None):
    first = 0x30 | (qos << 1) if flags is None else 0x30 | flags
    body = utf8(topic)
    if qos or (flags is not None and flags & 0x06):
        body += struct.pack(">H", pid)
    if version == 5:
        body += varint(len(props)) + props
    return packet(first, body + payload)


class Raw:
    """A raw TCP connection to the gateway."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

    def send(self, b):
        self.s.sendall(b)

    def read_packet(self):
        """The next packet as (first byte, body), or None at close."""
        def exact(n):
            buf = b""
            while len(buf) < n:
                chunk = self.s.recv(n - len(buf))
                if not chunk:
                    return None
                buf += chunk
            return buf
        h = exact(1)
        if h is None:
            return None
        n, shift = 0, 0
        while True:
            b = exact(1)
            if b is None:
                return None
            n |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                break
        body = exact(n) if n else b""
        return (h[0], body)

    def until_closed(self):
        """Every packet the server sends until it closes the connection."""
        out = []
        while True:
            try:
                p = self.read_packet()
            except ConnectionResetError:
                return out
            if p is None:
                return out
            out.append(p)

    def close(self):
        self.s.close()
