#!/usr/bin/env bash
# Router throughput and latency, measured with `flotilla bench`, side by side
# with the peer-to-peer ceiling (the same tool with no router between) and,
# when installed, RabbitMQ's AMQP 1.0 plugin (anchor). Prints a markdown
# table for bench/RESULTS.md.
#
#   bench/router.sh [SECONDS]          (default 10 s per scenario)
#   RABBIT=1 bench/router.sh           also measure RabbitMQ (../shared/anchors/rabbitmq.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
bin=target/release/flotilla
cargo build --release -q
tmp=$(mktemp -d)
cleanup() { [ -n "${rpid:-}" ] && kill "$rpid" 2>/dev/null; [ -n "${RABBIT:-}" ] && ../shared/anchors/rabbitmq.sh stop "$tmp/rabbit" >/dev/null 2>&1; rm -rf "$tmp"; }
trap cleanup EXIT

start_router() {
  "$bin" router --amqp 127.0.0.1:0 2> "$tmp/router.log" &
  rpid=$!
  for _ in $(seq 100); do grep -q listening "$tmp/router.log" && break; sleep 0.05; done
  port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$tmp/router.log" | head -1 | cut -d: -f2)
}

# CPU time (user+sys, in clock ticks) a process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run NAME ARGS... : one bench run; prints a table row.
run() {
  local name=$1; shift
  local before after json
  before=$( [ -n "${rpid:-}" ] && cpu_ticks "$rpid" || echo 0)
  json=$("$bin" bench --json --duration "$secs" "$@" 2>/dev/null)
  after=$( [ -n "${rpid:-}" ] && cpu_ticks "$rpid" || echo 0)
  python3 - "$name" "$json" "$before" "$after" "$secs" "$(getconf CLK_TCK)" <<'PY'
import json, sys
name, j, before, after, secs, tck = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
cpu_s = (after - before) / tck
per_msg = (cpu_s * 1e6 / j["received"]) if j["received"] and cpu_s else None
core = cpu_s / j["seconds"] * 100 if cpu_s else None
print("| %s | %d | %.0f | %.1f | %.1f | %.1f | %s | %s |" % (
    name, j["received"], j["receive_rate"], j["p50_us"], j["p99_us"], j["p999_us"],
    "%.2f" % per_msg if per_msg else "—", "%.0f %%" % core if core is not None else "—"))
PY
}

echo "| scenario | received | msg/s | p50 µs | p99 µs | p99.9 µs | router CPU µs/msg | router CPU |"
echo "|---|---|---|---|---|---|---|---|"
rpid=
run "peer to peer, 100 B, unsettled (ceiling)" --listen 127.0.0.1:0 --size 100
run "peer to peer, 1 KiB, unsettled (ceiling)" --listen 127.0.0.1:0 --size 1024
run "peer to peer, fixed 10k msg/s, 100 B" --listen 127.0.0.1:0 --size 100 --rate 10000
start_router
url="amqp://127.0.0.1:$port"
run "1 router, 100 B, unsettled" --url "$url" --size 100
run "1 router, 1 KiB, unsettled" --url "$url" --size 1024
run "1 router, 100 B, pre-settled" --url "$url" --size 100 --presettled
run "1 router, fixed 10k msg/s, 100 B" --url "$url" --size 100 --rate 10000
run "1 router, 4 senders → 4 receivers, 100 B" --url "$url" --size 100 --senders 4 --receivers 4
kill "$rpid"; wait "$rpid" 2>/dev/null || true; rpid=
if [ -n "${RABBIT:-}" ]; then
  ../shared/anchors/rabbitmq.sh start "$tmp/rabbit" 25672 21883 >/dev/null
  curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' -d '{"durable":false}' \
    "http://127.0.0.1:25675/api/queues/%2F/bench" >/dev/null
  rurl="amqp://guest:guest@127.0.0.1:25672"
  rpid=$(cat "$tmp/rabbit/rabbit.pid")
  run "RabbitMQ 3.10 AMQP 1.0, transient queue, 100 B, unsettled" --url "$rurl" --address /amq/queue/bench --size 100
  run "RabbitMQ 3.10 AMQP 1.0, transient queue, fixed 10k msg/s" --url "$rurl" --address /amq/queue/bench --size 100 --rate 10000
fi
