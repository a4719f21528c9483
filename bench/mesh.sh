#!/usr/bin/env bash
# Mesh benchmarks with `flotilla bench`: a 2-router chain (sender on one
# router, receiver on the other) at saturation and at a fixed 10k msg/s,
# and failover time in a diamond (A-B-D, A-C-D): receiver on D, sender on
# A at a fixed rate, kill -9 of the router on the path, time from the kill
# to the first message that arrives over the other path.
#
#   bench/mesh.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
bin=$PWD/target/release/flotilla
cargo build --release -q
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

# start NAME ARGS... : a router; sets PORT_<NAME> and IR_<NAME>
start() {
  local name=$1; shift
  "$bin" router --amqp 127.0.0.1:0 --router-id "$name" "$@" 2> "$tmp/$name.log" &
  pids+=($!); eval "PID_$name=$!"
  for _ in $(seq 100); do grep -q 'proto="amqp"' "$tmp/$name.log" && break; sleep 0.05; done
  eval "PORT_$name=$(grep -o 'proto="amqp" addr=127.0.0.1:[0-9]*' "$tmp/$name.log" | cut -d: -f2)"
  eval "IR_$name=$(grep -o 'proto="inter-router" addr=127.0.0.1:[0-9]*' "$tmp/$name.log" | cut -d: -f2 || true)"
}
# converged NAME N : wait until NAME's routes list N routers
converged() {
  for _ in $(seq 200); do
    local n
    n=$(grep 'mesh routes' "$tmp/$1.log" | tail -1 | grep -o ' via ' | wc -l || true)
    [ "${n:-0}" -ge "$2" ] && return 0
    sleep 0.05
  done
  echo "no convergence on $1" >&2; return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

row() {
  python3 - "$@" <<'PY'
import json, sys
name, j, cpu, secs, tck = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print("| %s | %d | %.0f | %.1f | %.1f | %.1f | %.0f %% |" % (name, j["received"], j["receive_rate"], j["p50_us"], j["p99_us"], j["p999_us"], cpu / tck / j["seconds"] * 100))
PY
}

start A --inter-router 127.0.0.1:0
start B --peer "127.0.0.1:$IR_A"
converged A 1; converged B 1
echo "| scenario | received | msg/s | p50 µs | p99 µs | p99.9 µs | both routers' CPU |"
echo "|---|---|---|---|---|---|---|"
for scenario in "2-router chain, 100 B, unsettled|--size 100" "2-router chain, fixed 10k msg/s, 100 B|--size 100 --rate 10000"; do
  name=${scenario%%|*}; args=${scenario#*|}
  before=$(( $(cpu_ticks "$PID_A") + $(cpu_ticks "$PID_B") ))
  # shellcheck disable=SC2086
  json=$(python3 - "$bin" "$PORT_A" "$PORT_B" "$secs" $args <<'PY'
import subprocess, sys
bin, pa, pb, secs, *args = sys.argv[1:]
# Receiver on B (a bench with no senders would not do), so: our bench's
# receiver connects to B and its sender to A, via --url for each side.
r = subprocess.run([bin, "bench", "--json", "--duration", secs, "--url", "amqp://127.0.0.1:" + pa,
                    "--receiver-url", "amqp://127.0.0.1:" + pb, *args], capture_output=True, text=True)
print(r.stdout.strip())
PY
)
  after=$(( $(cpu_ticks "$PID_A") + $(cpu_ticks "$PID_B") ))
  row "$name" "$json" "$((after - before))" "$secs" "$(getconf CLK_TCK)"
done
kill -9 "$PID_A" "$PID_B"

# Failover: diamond A-B-D, A-C-D.
start A --inter-router 127.0.0.1:0
start D --inter-router 127.0.0.1:0
start B --inter-router 127.0.0.1:0 --peer "127.0.0.1:$IR_A" --peer "127.0.0.1:$IR_D"
start C --inter-router 127.0.0.1:0 --peer "127.0.0.1:$IR_A" --peer "127.0.0.1:$IR_D"
converged A 3; converged D 3
python3 bench/failover.py "$bin" "$PORT_A" "$PORT_D" "$tmp/A.log" "$PID_B" "$PID_C"
