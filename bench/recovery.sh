#!/usr/bin/env bash
# Broker recovery time (issue #4: "recovery of 1M stored messages in under
# 2 s"): fill a fresh Flotilla broker with COUNT durable messages, kill -9
# it, start it again on the same data dir and time it from launch until it
# logs `listening` (it binds only after the journal was replayed and the
# queues rebuilt: the `queues recovered` line, with the message count).
#
#   bench/recovery.sh [COUNT] [SIZE]          (default 1000000 messages, 1024 B)
#
# Environment: FLOTILLA_BIN=target/release/flotilla; NO_BUILD=1 skips
# `cargo build --release`; VERIFY=1 drains the queue after the restart and
# checks every message is there; COLD=1 drops the page cache before the
# restart (as after a machine crash; needs root, and slows everything else
# on the machine for a moment). Without it the journal is still cached, as
# after a process crash.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000000}
size=${2:-1024}
bin=${FLOTILLA_BIN:-target/release/flotilla}

[ -n "${NO_BUILD:-}" ] || cargo build --release -q
[ -x "$bin" ] || { echo "recovery.sh: no $bin (build it: cargo build --release)" >&2; exit 1; }

tmp=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { echo "recovery.sh: $*" >&2; }

# wait_for LOG PATTERN SECONDS: until LOG has PATTERN, or the broker died.
wait_for() {
  local _
  for _ in $(seq $(($3 * 100))); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { say "the broker exited; its log:"; cat "$1" >&2; return 1; }
    sleep 0.01
  done
  say "timed out waiting for '$2' in $1"; return 1
}

# start LOG: a broker on the data dir; sets pid, port and launched (epoch s).
start() {
  launched=$(date +%s.%N)
  "$bin" broker --amqp 127.0.0.1:0 --data-dir "$tmp/data" 2> "$1" &
  pid=$!
}

port_of() { grep -o 'addr=127.0.0.1:[0-9]*' "$1" | head -1 | cut -d: -f2; }

start "$tmp/first.log"
wait_for "$tmp/first.log" listening 10
url="amqp://127.0.0.1:$(port_of "$tmp/first.log")"
say "filling $url with $count durable messages of $size B"
fill=$("$bin" bench --json --url "$url" --address recovery --size "$size" --durable \
  --receivers 0 --count "$count" 2> "$tmp/fill.log")
accepted=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["accepted"])' "$fill")
say "fill: $fill"
[ "$accepted" -eq "$count" ] || say "warning: only $accepted of $count were accepted"

kill -9 "$pid"; wait "$pid" 2>/dev/null || true; pid=
journal=$(du -sh "$tmp/data" | cut -f1)
cache="page cache warm"
if [ -n "${COLD:-}" ]; then
  if sync && { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    cache="page cache dropped"
  else
    say "COLD=1: cannot write /proc/sys/vm/drop_caches; measuring with a warm cache"
  fi
fi

start "$tmp/second.log"
wait_for "$tmp/second.log" listening 300
seen=$(date +%s.%N)       # when this script saw the line (polled every 10 ms)
rss=$(awk '/^VmRSS/ {print $2 " " $3}' "/proc/$pid/status")

python3 - "$tmp/second.log" "$launched" "$seen" "$accepted" "$journal" "$rss" "$size" "$cache" <<'PY'
import re, sys
from datetime import datetime, timezone
log, launched, seen, accepted, journal, rss, size, cache = sys.argv[1:9]
launched, seen = float(launched), float(seen)

def at(line):
    ts = line.split()[0].rstrip("Z")
    whole, _, frac = ts.partition(".")
    t = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return t + float("0." + frac) if frac else t

recovered = listening = None
for line in open(log):
    if "queues recovered" in line and recovered is None:
        recovered = line
    elif " listening " in line and listening is None:
        listening = line
if recovered is None or listening is None:
    sys.exit("recovery.sh: no 'queues recovered' / 'listening' line in " + log)
msgs = int(re.search(r"messages=(\d+)", recovered).group(1))
queues = re.search(r"queues=(\d+)", recovered).group(1)
print(f"recovery of {int(accepted):,} accepted messages of {size} B (journal {journal}, {cache}):")
print(f"  launch → listening         {at(listening) - launched:.3f} s  (log timestamps; seen by polling after {seen - launched:.3f} s)")
print(f"  launch → queues recovered  {at(recovered) - launched:.3f} s")
print(f"  recovered {msgs:,} messages in {queues} queue(s); RSS after recovery {rss}")
if msgs != int(accepted):
    print(f"  MISMATCH: {int(accepted):,} were accepted before the kill")
PY

if [ -n "${VERIFY:-}" ]; then
  url="amqp://127.0.0.1:$(port_of "$tmp/second.log")"
  drained=$("$bin" bench --json --url "$url" --address recovery --senders 0 --count "$accepted" 2> "$tmp/drain.log")
  got=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["received"])' "$drained")
  echo "  verify: drained $got of $accepted after the restart"
  [ "$got" -eq "$accepted" ] || exit 1
fi
