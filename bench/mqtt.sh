#!/usr/bin/env bash
# MQTT benchmark of issue #11 ("Performance"): the same rumqttc load
# (`flotilla bench --mqtt`) against Flotilla and the anchors in one run.
# Flotilla runs as separate processes: publishers on one gateway, subscribers
# on another, both on one router, with a broker behind it (zero-config: an
# undeclared topic is a broker topic). Mosquitto 2.0 (Debian) runs with
# anonymous access on loopback; RabbitMQ's MQTT plugin when TARGETS has
# `rabbit` (../shared/anchors/rabbitmq.sh installs it if missing).
#
#   bench/mqtt.sh [SECONDS]        (default 10 s per throughput scenario)
#
# Prints one markdown table for bench/RESULTS.md.
#
# Environment:
#   TARGETS="flotilla mosquitto"   which servers to measure (add `rabbit`)
#   IDLE=10000                     idle connections for the memory scenario
#   OFFLINE=100000                 QoS 1 messages queued for an offline session
#   FLOTILLA_BIN=target/release/flotilla   NO_BUILD=1 skips cargo build --release
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
targets=${TARGETS:-flotilla mosquitto}
idle_n=${IDLE:-10000}
offline_n=${OFFLINE:-100000}
bin=${FLOTILLA_BIN:-target/release/flotilla}
anchors=../shared/anchors

[ -n "${NO_BUILD:-}" ] || cargo build --release -q
[ -x "$bin" ] || { echo "mqtt.sh: no $bin (build it: cargo build --release)" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

tmp=$(mktemp -d)
pids=()
rabbit_dir=
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -z "$rabbit_dir" ] || "$anchors/rabbitmq.sh" stop "$rabbit_dir" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits for `listening proto="P"` in LOG and prints the port.
port_of() {
  local log=$1 proto=$2 i
  for i in $(seq 1 200); do
    if grep -q "listening proto=\"$proto\"" "$log" 2>/dev/null; then
      grep -o "listening proto=\"$proto\" addr=[0-9.]*:[0-9]*" "$log" | head -1 | sed 's/.*://'
      return
    fi
    sleep 0.05
  done
  echo "mqtt.sh: no $proto listener in $log" >&2
  cat "$log" >&2
  exit 1
}

wait_log() {
  local log=$1 pattern=$2 count=${3:-1} i
  for i in $(seq 1 200); do
    [ "$(grep -c "$pattern" "$log" 2>/dev/null || true)" -ge "$count" ] && return
    sleep 0.05
  done
  echo "mqtt.sh: no '$pattern' in $log" >&2
  exit 1
}

secret=$tmp/mesh-secret
head -c 32 /dev/urandom | base64 > "$secret"

start_flotilla() {
  local d=$tmp/flotilla
  mkdir -p "$d"
  "$bin" router --amqp 127.0.0.1:0 --mesh-secret-file "$secret" 2> "$d/router.log" & pids+=($!)
  local rp
  rp=$(port_of "$d/router.log" amqp)
  "$bin" broker --amqp 127.0.0.1:0 --data-dir "$d/broker" --router "127.0.0.1:$rp" --mesh-secret-file "$secret" 2> "$d/broker.log" & pids+=($!)
  wait_log "$d/router.log" "broker connected (route container)"
  "$bin" mqtt-gateway --mqtt 127.0.0.1:0 --router "127.0.0.1:$rp" --mesh-secret-file "$secret" \
    --max-connection-rate 0 --max-connections 20000 --gateway-id gw-pub 2> "$d/gw-pub.log" & pids+=($!)
  gw_pub_pid=$!
  "$bin" mqtt-gateway --mqtt 127.0.0.1:0 --router "127.0.0.1:$rp" --mesh-secret-file "$secret" \
    --max-connection-rate 0 --max-connections 20000 --gateway-id gw-sub 2> "$d/gw-sub.log" & pids+=($!)
  gw_sub_pid=$!
  pub_url=mqtt://127.0.0.1:$(port_of "$d/gw-pub.log" mqtt)
  sub_url=mqtt://127.0.0.1:$(port_of "$d/gw-sub.log" mqtt)
  wait_log "$d/router.log" "gateway=true" 4
  server_pid=$gw_sub_pid
}

start_mosquitto() {
  local d=$tmp/mosquitto port=$((20000 + RANDOM % 20000))
  mkdir -p "$d"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n' "$port" > "$d/m.conf"
  mosquitto -c "$d/m.conf" > "$d/m.log" 2>&1 & pids+=($!)
  server_pid=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
  pub_url=mqtt://127.0.0.1:$port
  sub_url=$pub_url
}

start_rabbit() {
  rabbit_dir=$tmp/rabbit
  local amqp=$((26000 + RANDOM % 1000)) mqtt
  mqtt=$((amqp + 10))
  "$anchors/rabbitmq.sh" start "$rabbit_dir" "$amqp" "$mqtt" >&2
  server_pid=$(cat "$rabbit_dir/rabbit.pid")
  pub_url=mqtt://guest:guest@127.0.0.1:$mqtt
  sub_url=$pub_url
}

stop_target() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  if [ -n "$rabbit_dir" ]; then "$anchors/rabbitmq.sh" stop "$rabbit_dir" >/dev/null 2>&1 || true; rabbit_dir=; fi
}

# run NAME ARGS...: one `flotilla bench --mqtt`, its JSON in $tmp/NAME.json.
run() {
  local name=$1; shift
  timeout 600 "$bin" bench --mqtt "$pub_url" --receiver-url "$sub_url" --json "$@" > "$tmp/$name.json" 2> "$tmp/$name.err" \
    || { echo "mqtt.sh: $name failed:" >&2; cat "$tmp/$name.err" >&2; echo '{}' > "$tmp/$name.json"; }
}

j() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); v=d
for k in sys.argv[2].split("."): v=v.get(k, {}) if isinstance(v, dict) else {}
print(v if v != {} else "-")' "$1" "$2"; }

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start_target() {
  case $1 in
    flotilla) start_flotilla ;;
    mosquitto) start_mosquitto ;;
    rabbit) start_rabbit ;;
    *) echo "mqtt.sh: unknown target $1" >&2; exit 64 ;;
  esac
}

for t in $targets; do
  echo "== $t" >&2
  start_target "$t"
  run "$t-q0-4to1" --senders 4 --receivers 1 --qos 0 --size 100 --duration "$secs" --address bench/q0
  run "$t-q1-4to1" --senders 4 --receivers 1 --qos 1 --size 100 --duration "$secs" --address bench/q1
  run "$t-q1-1k" --senders 1 --receivers 1 --qos 1 --size 1024 --duration "$secs" --address bench/k1
  run "$t-fanout" --senders 1 --receivers 10 --qos 0 --size 100 --duration "$secs" --address bench/fan
  run "$t-lat" --senders 1 --receivers 1 --qos 1 --size 1024 --rate 10000 --duration "$secs" --address bench/lat
  run "$t-offline" --senders 1 --receivers 1 --qos 1 --size 100 --count "$offline_n" --offline --address bench/off
  # Idle connections: the RSS of a fresh server (one process: the
  # subscribers' gateway for Flotilla) before and with them. Fresh, because
  # memory a busy process freed is reused without moving its RSS.
  stop_target
  start_target "$t"
  before=$(rss_kib "$server_pid")
  "$bin" bench --mqtt "$sub_url" --idle "$idle_n" --duration 8 > "$tmp/$t-idle.out" 2>&1 &
  idle_pid=$!
  for _ in $(seq 1 600); do grep -q "idle connections open" "$tmp/$t-idle.out" 2>/dev/null && break; sleep 0.1; done
  sleep 2
  during=$(rss_kib "$server_pid")
  opened=$(grep -o '^[0-9]*' "$tmp/$t-idle.out" | head -1)
  wait "$idle_pid" || true
  echo "{\"opened\": ${opened:-0}, \"perConnKiB\": $(python3 -c "print(round(($during-$before)/max(1,${opened:-0}), 2))")}" > "$tmp/$t-idle.json"
  stop_target
done

echo
echo "| scenario | $(for t in $targets; do printf '%s | ' "$t"; done)"
echo "|---|$(for t in $targets; do printf -- '---|'; done)"
row() {
  local label=$1 f=$2
  printf '| %s |' "$label"
  for t in $targets; do printf ' %s |' "$($f "$t")"; done
  echo
}
q0() { echo "$(j "$tmp/$1-q0-4to1.json" deliveredRate) msg/s, lost $(j "$tmp/$1-q0-4to1.json" lost)"; }
q1() { echo "$(j "$tmp/$1-q1-4to1.json" deliveredRate) msg/s, lost $(j "$tmp/$1-q1-4to1.json" lost)"; }
k1() { echo "$(j "$tmp/$1-q1-1k.json" deliveredRate) msg/s, lost $(j "$tmp/$1-q1-1k.json" lost)"; }
fan() { echo "$(j "$tmp/$1-fanout.json" deliveredRate) deliveries/s"; }
lat() { echo "$(j "$tmp/$1-lat.json" latencyUs.p50) / $(j "$tmp/$1-lat.json" latencyUs.p99) µs"; }
off() { echo "$(j "$tmp/$1-offline.json" delivered) of $(j "$tmp/$1-offline.json" acknowledged) at $(j "$tmp/$1-offline.json" deliveredRate) msg/s, out of order $(j "$tmp/$1-offline.json" outOfOrder)"; }
idl() { echo "$(j "$tmp/$1-idle.json" perConnKiB) KiB ($(j "$tmp/$1-idle.json" opened) open)"; }
row "4→1 QoS 0, 100 B, delivered" q0
row "4→1 QoS 1, 100 B, delivered" q1
row "1→1 QoS 1, 1 KiB, delivered" k1
row "1→10 QoS 0, 100 B, fan-out" fan
row "10k msg/s QoS 1 1 KiB, p50 / p99" lat
row "$offline_n QoS 1 queued offline, drained" off
row "$idle_n idle connections, RSS each" idl
