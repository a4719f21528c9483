"""Failover time: a receiver on D, a sender on A at 2000 msg/s (pre-settled),
kill -9 the router A uses to reach D, and measure from the kill to the first
message that arrives afterwards, and the longest gap between messages."""
import os, re, signal, subprocess, sys, threading, time

from proton.handlers import MessagingHandler
from proton.reactor import Container

bin, port_a, port_d, log_a, pid_b, pid_c = sys.argv[1:]


class Recv(MessagingHandler):
    def __init__(self):
        super().__init__(prefetch=1000)
        self.times = []
        self.ready = threading.Event()

    def on_start(self, event):
        event.container.create_receiver("amqp://127.0.0.1:%s" % port_d, "failover")

    def on_link_opened(self, event):
        self.ready.set()

    def on_message(self, event):
        self.times.append(time.monotonic())


recv = Recv()
container = Container(recv)
t = threading.Thread(target=container.run, daemon=True)
t.start()
recv.ready.wait(10)
sender = subprocess.Popen([bin, "bench", "--url", "amqp://127.0.0.1:" + port_a, "--address", "failover",
                           "--receivers", "0", "--presettled", "--rate", "2000", "--duration", "8", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
time.sleep(3)
routes = [l for l in open(log_a) if "mesh routes" in l][-1]
hop = re.search(r'"D via (\w+)', routes).group(1)
victim = int(pid_b if hop == "B" else pid_c)
killed = time.monotonic()
os.kill(victim, signal.SIGKILL)
sender.wait(30)
time.sleep(1)
container.stop()
after = [x for x in recv.times if x > killed]
gaps = [b - a for a, b in zip(recv.times, recv.times[1:])]
print("| failover (kill -9 of %s, the router on the path; 2000 msg/s pre-settled) | first message on the new path %.0f ms after the kill | longest gap %.0f ms | received %d |"
      % (hop, (after[0] - killed) * 1000 if after else -1, max(gaps) * 1000 if gaps else -1, len(recv.times)))
