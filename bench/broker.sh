#!/usr/bin/env bash
# Broker benchmark of issue #4 ("Performance"): durable 1 KiB messages sent
# unsettled (the producer counts accepts), measured with `flotilla bench` in
# one run against the Flotilla broker direct, the Flotilla broker behind a
# router, and RabbitMQ 3.10 with a durable classic queue (the anchor, see
# ../shared/anchors/README.md). Prints one markdown table for
# bench/RESULTS.md with ratios vs RabbitMQ.
#
#   bench/broker.sh [STEADY_SECONDS] [FILL_COUNT]      (default 10 s, 200000)
#
# Per target: (a) steady 1 producer + 1 consumer, delivered msg/s; (b) fill
# FILL_COUNT with no consumer, accepted msg/s; (c) drain them (`--senders 0`),
# msg/s from the first message to the last; (d) send → accept latency p50/p99
# at a fixed RATE, no consumer; (e) fsync + fdatasync calls of the server
# process during (b), per accepted message (perf stat -p: only threads that
# exist when perf attaches are counted; the script warns if new ones appear);
# (f) four queues at once, each 1 producer + 1 consumer (four `flotilla
# bench` processes, one thread each), delivered msg/s in total: for the
# Flotilla broker with one queue task and with two (`--queue-shards`).
#
# Environment:
#   SIZE=1024  RATE=1000  LAT_SECONDS=10     body size, latency run
#   TARGETS="direct router rabbit"           which targets to measure
#   RABBIT_PORT=26672                        RabbitMQ AMQP port (+1..+3 used too)
#   FLOTILLA_BIN=target/release/flotilla     NO_BUILD=1 skips cargo build --release
#   BENCH_TIMEOUT=1800                       seconds before one bench run is killed
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
fill=${2:-200000}
size=${SIZE:-1024}
rate=${RATE:-1000}
lat_secs=${LAT_SECONDS:-10}
targets=${TARGETS:-direct router rabbit}
rabbit_port=${RABBIT_PORT:-26672}
bench_timeout=${BENCH_TIMEOUT:-1800}
bin=${FLOTILLA_BIN:-target/release/flotilla}
anchors=../shared/anchors

[ -n "${NO_BUILD:-}" ] || cargo build --release -q
[ -x "$bin" ] || { echo "broker.sh: no $bin (build it: cargo build --release)" >&2; exit 1; }

tmp=$(mktemp -d)
res=$tmp/results
mkdir -p "$res"
pids=()            # every Flotilla / perf process this script started
rabbit_dir=        # set once RabbitMQ was started
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$rabbit_dir" ]; then
    local beam
    beam=$(cat "$rabbit_dir/rabbit.pid" 2>/dev/null || true)
    "$anchors/rabbitmq.sh" stop "$rabbit_dir" >/dev/null 2>&1 || true
    if [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null; then kill -9 "$beam" 2>/dev/null || true; fi
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { echo "broker.sh: $*" >&2; }

# wait_for LOG PATTERN PID: until LOG has PATTERN (10 s), or PID died.
wait_for() {
  local _
  for _ in $(seq 200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { say "process $3 exited; its log:"; cat "$1" >&2; return 1; }
    sleep 0.05
  done
  say "timed out waiting for '$2' in $1"; return 1
}

# The port from a Flotilla `listening` log line.
port_of() { grep -o 'addr=127.0.0.1:[0-9]*' "$1" | head -1 | cut -d: -f2; }

# start_broker NAME [ARGS...]: a Flotilla broker on a fresh data dir; sets
# broker_pid and broker_port.
start_broker() {
  local name=$1; shift
  "$bin" broker --amqp 127.0.0.1:0 --data-dir "$tmp/$name-data" "$@" 2> "$tmp/$name-broker.log" &
  broker_pid=$!; pids+=("$broker_pid")
  wait_for "$tmp/$name-broker.log" listening "$broker_pid"
  broker_port=$(port_of "$tmp/$name-broker.log")
}

# ---- perf: syncs of one process ---------------------------------------------
sync_events=syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync
perf_problem=
if ! command -v perf >/dev/null; then
  perf_problem="perf is not installed"
elif ! out=$(perf stat -x, -e "$sync_events" -- true 2>&1) ||
     ! grep -q '^[0-9][0-9]*,.*sys_enter_fdatasync' <<<"$out"; then
  perf_problem="perf stat -e $sync_events does not work here: $(head -c 200 <<<"$out" | tr '\n' ' ')"
fi
[ -z "$perf_problem" ] || say "syncs per message will not be measured: $perf_problem"

# The thread ids of a process, one a line.
threads_of() { local t; for t in "/proc/$1/task/"*; do if [ -e "$t" ]; then echo "${t##*/}"; fi; done; }

# perf_start PID FILE / perf_stop FILE: count syncs of PID in between.
perf_start() {
  [ -z "$perf_problem" ] || return 0
  threads_of "$1" > "$2.threads"
  perf stat -x, -o "$2" -e "$sync_events" -p "$1" 2>/dev/null &
  perf_pid=$!; pids+=("$perf_pid")
  sleep 0.5    # let perf attach before the load starts
  perf_of=$1
}
perf_stop() {
  [ -z "$perf_problem" ] || return 0
  kill -INT "$perf_pid" 2>/dev/null || true
  wait "$perf_pid" 2>/dev/null || true
  # "<not counted>": the process never ran while perf watched, so 0.
  awk -F, '/sys_enter_f(data)?sync/ { n += ($1 ~ /^[0-9]+$/) ? $1 : 0 } END { print n + 0 }' "$1" > "$1.syncs"
  if threads_of "$perf_of" | grep -vxFf "$1.threads" | grep -q .; then
    say "warning: pid $perf_of started threads during the fill; perf -p does not count their syncs"
  fi
}

# ---- one target ---------------------------------------------------------------
# bench TARGET SCENARIO ARGS...: one `flotilla bench --json` run into
# $res/TARGET.SCENARIO.json (its progress into a log); never fails the script.
bench() {
  local t=$1 s=$2; shift 2
  say "$t: $s: flotilla bench $*"
  if timeout -k 10 "$bench_timeout" "$bin" bench --json "$@" > "$res/$t.$s.json" 2> "$tmp/$t.$s.log"; then
    say "$t: $s: $(cat "$res/$t.$s.json")"
  else
    say "$t: $s: flotilla bench failed (exit $?); last lines:"; tail -5 "$tmp/$t.$s.log" >&2
    rm -f "$res/$t.$s.json"
  fi
}

# measure TARGET URL ADDRESS_PREFIX SERVER_PID: scenarios (a)-(e).
measure() {
  local t=$1 url=$2 q=$3 pid=$4
  local common=(--url "$url" --size "$size" --durable)
  bench "$t" steady "${common[@]}" --address "${q}steady" --duration "$secs"
  perf_start "$pid" "$res/$t.perf"
  bench "$t" fill "${common[@]}" --address "${q}fill" --receivers 0 --count "$fill"
  perf_stop "$res/$t.perf"
  bench "$t" drain --url "$url" --address "${q}fill" --senders 0 --count "$fill"
  bench "$t" latency "${common[@]}" --address "${q}lat" --receivers 0 --rate "$rate" --duration "$lat_secs"
}

# four TARGET URL PREFIX: (f), four queues PREFIXfour0..3 at once.
four() {
  local t=$1 url=$2 q=$3 i ps=()
  say "$t: four queues: 4 x flotilla bench --threads 1 --duration $secs"
  for i in 0 1 2 3; do
    timeout -k 10 "$bench_timeout" "$bin" bench --json --threads 1 --url "$url" --size "$size" --durable \
      --address "${q}four$i" --duration "$secs" > "$res/$t.four$i.json" 2> "$tmp/$t.four$i.log" &
    ps+=($!)
  done
  for i in "${ps[@]}"; do wait "$i" || true; done
}

has_target() { [[ " $targets " == *" $1 "* ]]; }
notes=()

# ---- Flotilla broker, direct ----------------------------------------------------
if has_target direct; then
  start_broker direct
  measure direct "amqp://127.0.0.1:$broker_port" "" "$broker_pid"
  kill "$broker_pid"; wait "$broker_pid" 2>/dev/null || true
  # (f) with one queue task, then with two, on fresh brokers.
  if "$bin" broker --help | grep -q -- '--queue-shards'; then
    for n in 1 2; do
      start_broker "shards$n" --queue-shards "$n"
      four "shards$n" "amqp://127.0.0.1:$broker_port" ""
      kill "$broker_pid"; wait "$broker_pid" 2>/dev/null || true
    done
  fi
fi

# ---- Flotilla broker behind a router ----------------------------------------------
# The router link-routes addresses declared with type `queue` (in its
# --config) to a broker that connected to it (`flotilla broker --router
# HOST:PORT`, issue #4 "Through the mesh"); the broker gets the same
# --config when it has that option. Skipped until the broker has --router.
if has_target router; then
  if ! "$bin" broker --help | grep -q -- '--router'; then
    notes+=("Flotilla behind a router: skipped, \`flotilla broker --help\` has no \`--router\` option yet.")
    say "router: skipped (flotilla broker has no --router option)"
  else
    cat > "$tmp/router.yaml" <<'YAML'
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: steady}
spec: {address: steady, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: fill}
spec: {address: fill, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: lat}
spec: {address: lat, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: probe}
spec: {address: probe, type: queue}
YAML
    # Brokers prove they are components with the mesh secret.
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/mesh-secret"
    "$bin" router --amqp 127.0.0.1:0 --config "$tmp/router.yaml" --mesh-secret-file "$tmp/mesh-secret" 2> "$tmp/router.log" &
    router_pid=$!; pids+=("$router_pid")
    wait_for "$tmp/router.log" listening "$router_pid"
    router_url="amqp://127.0.0.1:$(port_of "$tmp/router.log")"
    broker_args=(--router "127.0.0.1:$(port_of "$tmp/router.log")" --mesh-secret-file "$tmp/mesh-secret")
    if "$bin" broker --help | grep -q -- '--config'; then broker_args+=(--config "$tmp/router.yaml"); fi
    start_broker router "${broker_args[@]}"
    # Routed once a message to a queue address is accepted through the router.
    routed=
    for _ in $(seq 30); do
      if timeout 5 "$bin" send probe --count 1 --timeout 3 --url "$router_url" >/dev/null 2>&1; then
        routed=1; break
      fi
      sleep 0.5
    done
    if [ -n "$routed" ]; then
      timeout 10 "$bin" receive probe --count 1 --timeout 3 --url "$router_url" >/dev/null 2>&1 || true
      measure router "$router_url" "" "$broker_pid"
    else
      notes+=("Flotilla behind a router: the broker did not become reachable through the router in 30 s (see its log).")
      say "router: no route to the broker; router log:"; tail -5 "$tmp/router.log" >&2
    fi
    kill "$broker_pid" "$router_pid"
    wait "$broker_pid" "$router_pid" 2>/dev/null || true
  fi
fi

# ---- RabbitMQ 3.10, durable classic queues ---------------------------------------
if has_target rabbit; then
  rabbit_dir=$tmp/rabbit
  if "$anchors/rabbitmq.sh" start "$rabbit_dir" "$rabbit_port" $((rabbit_port + 10)) > "$tmp/rabbit.start" 2>&1; then
    for q in steady fill lat four0 four1 four2 four3; do "$anchors/rabbitmq.sh" queue "$rabbit_dir" "$q" classic >/dev/null; done
    rabbit_version=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo "?")
    measure rabbit "amqp://guest:guest@127.0.0.1:$rabbit_port" /amq/queue/ "$(cat "$rabbit_dir/rabbit.pid")"
    four rabbit "amqp://guest:guest@127.0.0.1:$rabbit_port" /amq/queue/
  else
    notes+=("RabbitMQ: did not start: $(tail -1 "$tmp/rabbit.start")")
    say "rabbit: did not start:"; cat "$tmp/rabbit.start" >&2
  fi
fi

# ---- the table ---------------------------------------------------------------------------
python3 - "$res" "$fill" "$secs" "$size" "$rate" "$lat_secs" "${perf_problem:-}" "${rabbit_version:-}" "${notes[@]}" <<'PY'
import json, os, sys
res, fill, secs, size, rate, lat_secs, perf_problem, rabbit_version = sys.argv[1:9]
notes = list(sys.argv[9:])
fill = int(fill)

def load(t, s):
    try:
        with open(os.path.join(res, f"{t}.{s}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def syncs(t):
    try:
        with open(os.path.join(res, f"{t}.perf.syncs")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None

# Each row: label, function target -> (value or None, text shown, caveat).
def steady(t):
    j = load(t, "steady")
    if not j:
        return None, "failed"
    return j["receive_rate"], f"{j['receive_rate'] / 1000:.1f}k"

def filled(t):
    j = load(t, "fill")
    if not j:
        return None, "failed"
    v = j["accepted"] / j["seconds"] if j["seconds"] else 0
    s = f"{v / 1000:.1f}k"
    if j["accepted"] < fill:
        s += f" (only {j['accepted']:,} of {fill:,} accepted)"
    return v, s

def drained(t):
    j = load(t, "drain")
    if not j:
        return None, "failed"
    s = f"{j['receive_rate'] / 1000:.1f}k"
    if j["received"] < fill:
        s += f" (only {j['received']:,} of {fill:,})"
    return j["receive_rate"], s

def accept(q):
    def f(t):
        j = load(t, "latency")
        if not j or j.get(q) is None:
            return None, "failed"
        return j[q] / 1000, f"{j[q] / 1000:.2f} ms"
    return f

def per_msg(t):
    if perf_problem:
        return None, "n/a (perf)"
    n, j = syncs(t), load(t, "fill")
    if n is None or not j or not j["accepted"]:
        return None, "failed"
    v = n / j["accepted"]
    return v, f"{v:.4f} ({n:,} / {j['accepted']:,})"

def four_total(t):
    parts = [load(t, f"four{i}") for i in range(4)]
    if not all(parts):
        return None
    return sum(p["receive_rate"] for p in parts), [p["receive_rate"] for p in parts]

def four(t):
    # The Flotilla broker's cell is its run with two queue tasks.
    got = four_total("shards2" if t == "direct" else t)
    if got is None:
        return None, "failed" if t in ("direct", "rabbit") else "—"
    total, each = got
    return total, f"{total / 1000:.1f}k ({' + '.join(f'{e / 1000:.0f}k' for e in each)})"

rows = [
    (f"steady 1 → 1 for {secs} s, delivered msg/s", steady),
    (f"fill {fill:,}, accepted msg/s", filled),
    (f"drain {fill:,}, msg/s", drained),
    (f"accept p50 at {rate} msg/s (lower is better)", accept("accept_p50_us")),
    (f"accept p99 at {rate} msg/s (lower is better)", accept("accept_p99_us")),
    ("syncs per message, filling (lower is better)", per_msg),
    (f"4 queues × (1 → 1) for {secs} s, delivered msg/s in total", four),
]
ran = lambda t: any(n.startswith(t + ".") for n in os.listdir(res))
flotilla = [(t, name) for t, name in (("direct", "Flotilla broker"), ("router", "Flotilla via router")) if ran(t)]
rabbit = ran("rabbit")
cols = [name for _, name in flotilla]
if rabbit:
    cols.append(f"RabbitMQ {rabbit_version.split('-')[0]} classic".replace("  ", " "))
    cols += [f"{name} ÷ RabbitMQ" for _, name in flotilla]
print(f"{size} B durable messages, unsettled; `bench/broker.sh {secs} {fill}` (SIZE={size} RATE={rate} LAT_SECONDS={lat_secs})")
print()
if not cols:
    print("No target was measured.")
    for n in notes:
        print()
        print(n)
    sys.exit(1)
print("| scenario | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for label, f in rows:
    cells = []
    values = {}
    for t, _ in flotilla + ([("rabbit", None)] if rabbit else []):
        v, s = f(t)
        values[t] = v
        cells.append(s)
    if rabbit:
        r = values["rabbit"]
        for t, _ in flotilla:
            v = values[t]
            cells.append(f"{v / r:.2f}" if v is not None and r else "—")
    print(f"| {label} | " + " | ".join(cells) + " |")
print()
print("Commands (URL = the target's; ADDR = `steady`, `fill`, `lat`, or `/amq/queue/…` for RabbitMQ):")
print(f"steady `flotilla bench --url URL --size {size} --durable --address ADDR --duration {secs}`;")
print(f"fill `… --receivers 0 --count {fill}`; drain `flotilla bench --url URL --address ADDR --senders 0 --count {fill}`;")
print(f"latency `… --receivers 0 --rate {rate} --duration {lat_secs}` (send → outcome at the producer);")
print("syncs `perf stat -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -p PID` on the broker (RabbitMQ: beam.smp) during the fill;")
print(f"4 queues: four `flotilla bench --threads 1 --url URL --size {size} --durable --address ADDRi --duration {secs}` at once.")
one, two = four_total("shards1"), four_total("shards2")
if one and two:
    print()
    print(f"Queue tasks, 4 queues × (1 → 1): `--queue-shards 1` {one[0] / 1000:.1f}k msg/s, "
          f"`--queue-shards 2` {two[0] / 1000:.1f}k msg/s: × {two[0] / one[0]:.2f}.")
if perf_problem:
    notes.append(f"Syncs not measured: {perf_problem}.")
for n in notes:
    print()
    print(n)
PY
