#!/usr/bin/env python3
"""Writes small seed corpora for the fuzz targets into fuzz/corpus/.

The seeds are hand-built AMQP 1.0 byte streams: frames are
[u32 size][doff=2][type][u16 channel][body], performatives are described
lists (0x00 0x53 <code> <list>). Run from anywhere:

    python3 fuzz/make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

NULL, TRUE, FALSE, UINT0 = b"\x40", b"\x41", b"\x42", b"\x43"


def uint(v):
    return UINT0 if v == 0 else (b"\x52" + bytes([v]) if v < 256 else b"\x70" + struct.pack(">I", v))


def ushort(v):
    return b"\x60" + struct.pack(">H", v)


def ubyte(v):
    return b"\x50" + bytes([v])


def string(s):
    s = s.encode()
    return b"\xa1" + bytes([len(s)]) + s


def symbol(s):
    s = s.encode()
    return b"\xa3" + bytes([len(s)]) + s


def binary(b):
    return b"\xa0" + bytes([len(b)]) + b


def lst(*items):
    body = b"".join(items)
    if not items:
        return b"\x45"
    return b"\xc0" + bytes([len(body) + 1, len(items)]) + body


def described(code, value):
    return b"\x00\x53" + bytes([code]) + value


def frame(body, channel=0, ftype=0, payload=b""):
    data = body + payload
    return struct.pack(">IBBH", 8 + len(data), 2, ftype, channel) + data


HEARTBEAT = frame(b"")
OPEN = frame(described(0x10, lst(string("fuzz-peer"), NULL, uint(65536), ushort(255), uint(30000))))
BEGIN = frame(described(0x11, lst(NULL, UINT0, uint(2048), uint(2048))))
SOURCE = described(0x28, lst(string("q")))
TARGET = described(0x29, lst(string("q")))


def attach(name, handle, role_receiver):
    return frame(described(0x12, lst(
        string(name), uint(handle), TRUE if role_receiver else FALSE,
        ubyte(2), ubyte(0), SOURCE, TARGET, NULL, FALSE, UINT0)))


MESSAGE = (described(0x73, lst(NULL, NULL, string("q"), NULL, string("reply")))
           + described(0x77, string("hello")))


def transfer(handle, delivery_id, tag, payload, more=False, first=True):
    if first:
        fields = [uint(handle), uint(delivery_id), binary(tag), UINT0, FALSE, TRUE if more else FALSE]
    else:
        fields = [uint(handle), NULL, NULL, NULL, NULL, TRUE if more else FALSE]
    return frame(described(0x14, lst(*fields)), payload=payload)


FLOW = frame(described(0x13, lst(UINT0, uint(2048), UINT0, uint(2048), UINT0, UINT0, uint(10))))
DISPOSITION = frame(described(0x15, lst(TRUE, UINT0, NULL, TRUE, described(0x24, lst()))))
DETACH = frame(described(0x16, lst(UINT0, TRUE)))
END = frame(described(0x17, lst()))
CLOSE = frame(described(0x18, lst()))

SASL_MECHS = frame(described(0x40, lst(symbol("PLAIN"))), ftype=1)
SASL_INIT = frame(described(0x41, lst(symbol("PLAIN"), binary(b"\x00user\x00pass"))), ftype=1)
SASL_OUTCOME = frame(described(0x44, lst(ubyte(0))), ftype=1)

ENGINE = {
    "open_close": OPEN + BEGIN + END + CLOSE,
    # The peer sends on a link: we are the receiver and grant credit.
    "send_one": OPEN + BEGIN + attach("l1", 0, False) + transfer(0, 0, b"t0", MESSAGE)
    + HEARTBEAT + DETACH + END + CLOSE,
    # A message split over two transfers.
    "send_multi": OPEN + BEGIN + attach("l1", 0, False)
    + transfer(0, 0, b"t0", MESSAGE[:10], more=True)
    + transfer(0, 0, b"", MESSAGE[10:], first=False) + CLOSE,
    # The peer receives: we are the sender; it grants credit and settles.
    "receive": OPEN + BEGIN + attach("r1", 0, True) + FLOW + DISPOSITION + DETACH + CLOSE,
}

FRAME = dict(ENGINE)
FRAME.update({
    "sasl": SASL_MECHS + SASL_INIT + SASL_OUTCOME,
    "heartbeat": HEARTBEAT,
})

MESSAGES = {
    "to_reply_to_value": MESSAGE,
    "header_data": described(0x70, lst(TRUE)) + described(0x75, binary(b"abc"))
    + described(0x75, binary(b"def")),
}


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed_" + name), "wb") as f:
            f.write(data)
    print(f"{d}: {len(seeds)} seeds")


if __name__ == "__main__":
    write("frame", FRAME)
    write("engine", ENGINE)
    write("message", MESSAGES)
