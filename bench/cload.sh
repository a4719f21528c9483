#!/usr/bin/env bash
# Flotilla beside Qpid Dispatch Router, measured with the same neutral
# client (C Proton: ../shared/tools/cload.c), runs of the two interleaved.
# Scenarios: one router and a two-router chain, at saturation (100 B and
# 1 KiB, unsettled) and at a fixed 10k msg/s; five saturating rounds on the
# chain (latency and RSS must stay flat). Prints markdown rows for
# bench/RESULTS.md: medians of RUNS runs.
#
#   bench/cload.sh [SECONDS] [RUNS]            (default 5 s, 3 runs)
#   QDR_RUN=/path/run-qdrouterd.sh bench/cload.sh   also run qdrouterd: a
#       script that runs `qdrouterd -c CONFIG` in the foreground with what
#       it needs in its environment (qdrouterd 1.19 is not packaged for
#       Debian: build it from its source; nothing of it is committed here).
#   CLOAD=/path/to/cload     the client (else built from ../shared/tools/cload.c)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
runs=${2:-3}
bin=$PWD/target/release/flotilla
cargo build --release -q
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; rm -rf "$tmp"; }
trap cleanup EXIT

cload=${CLOAD:-$tmp/cload}
if [ -z "${CLOAD:-}" ]; then
  gcc -O2 -o "$cload" ../shared/tools/cload.c -l:libqpid-proton-core.so.10 -l:libqpid-proton-proactor.so.1
fi
echo "0123456789abcdef-bench-mesh-secret" > "$tmp/mesh-secret"

wait_port() { for _ in $(seq 200); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
wait_log() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.05; done; echo "no '$2' in $1" >&2; exit 1; }

# Flotilla: one router on 27001; a chain A (27002, inter-router 27101) and B (27003).
flotilla_one() { "$bin" router --amqp 127.0.0.1:27001 2> "$tmp/f1.log" & pids+=($!); wait_port 27001; }
flotilla_chain() {
  "$bin" router --amqp 127.0.0.1:27002 --inter-router 127.0.0.1:27101 --router-id A --mesh-secret-file "$tmp/mesh-secret" 2> "$tmp/fa.log" & pids+=($!)
  "$bin" router --amqp 127.0.0.1:27003 --router-id B --peer 127.0.0.1:27101 --mesh-secret-file "$tmp/mesh-secret" 2> "$tmp/fb.log" & pids+=($!)
  wait_log "$tmp/fa.log" 'mesh routes routes=\["B via B'
}
qdr_conf() { # NAME ID MODE PORT [inter-router listener | connector port]
  local extra=""
  if [ "$3" = interior ] && [ -n "${5:-}" ]; then
    extra="listener {
  host: 127.0.0.1
  port: $5
  role: inter-router
  authenticatePeer: no
  saslMechanisms: ANONYMOUS
}"
  elif [ -n "${6:-}" ]; then
    extra="connector {
  name: up
  host: 127.0.0.1
  port: $6
  role: inter-router
  saslMechanisms: ANONYMOUS
}"
  fi
  cat > "$tmp/$1.conf" <<EOF
router {
  mode: $3
  id: $2
  workerThreads: 2
  defaultDistribution: balanced
}
listener {
  host: 127.0.0.1
  port: $4
  role: normal
  authenticatePeer: no
  saslMechanisms: ANONYMOUS
}
$extra
address {
  prefix: q
  distribution: balanced
}
log {
  module: DEFAULT
  enable: warning+
}
EOF
}
qdr_one() { qdr_conf q1 QA standalone 28001; "$QDR_RUN" "$tmp/q1.conf" 2> "$tmp/q1.log" & pids+=($!); wait_port 28001; }
qdr_chain() {
  qdr_conf qa A interior 28002 28101; qdr_conf qb B interior 28003 "" 28101
  "$QDR_RUN" "$tmp/qa.conf" 2> "$tmp/qa.log" & pids+=($!); wait_port 28101
  "$QDR_RUN" "$tmp/qb.conf" 2> "$tmp/qb.log" & pids+=($!); wait_port 28003
  sleep 2 # qdrouterd has no log line to wait for at warning level; its route settles within a HELLO
}
stop_all() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null; done; pids=(); }

cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

# one SEND_PORT RECV_PORT SIZE [send args] -> "rate p50 p99 cpu%"
one() {
  local sp=$1 rp=$2 size=$3; shift 3
  local before after
  "$cload" recv "127.0.0.1:$rp" q --credit 1000 > "$tmp/recv.json" & local r=$!
  sleep 0.3
  before=$(cpu_ticks "${pids[@]}")
  "$cload" send "127.0.0.1:$sp" q "$secs" "$size" "$@" > "$tmp/send.json"
  wait "$r"
  after=$(cpu_ticks "${pids[@]}")
  python3 - "$tmp/recv.json" "$tmp/send.json" "$before" "$after" "$secs" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = json.load(open(sys.argv[2]))
assert r["recv"] == s["accepted"], (r, s)
cpu = (int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[6]) / float(sys.argv[5]) * 100
print(r["rate"], r["p50_us"], r["p99_us"], round(cpu))
PY
}

median() { python3 -c "import sys,statistics as st; v=[float(x) for x in sys.argv[1:]]; print('%g' % st.median(v))" "$@"; }

# row NAME SETUP_F SETUP_Q SEND_F RECV_F SEND_Q RECV_Q SIZE [send args]
row() {
  local name=$1 sf=$2 sq=$3 fs=$4 fr=$5 qs=$6 qr=$7 size=$8; shift 8
  local F=() Q=()
  for _ in $(seq "$runs"); do
    $sf; F+=("$(one "$fs" "$fr" "$size" "$@")"); stop_all
    if [ -n "${QDR_RUN:-}" ]; then $sq; Q+=("$(one "$qs" "$qr" "$size" "$@")"); stop_all; fi
  done
  col() { local i=$1; shift; median $(for x in "$@"; do echo "$x" | cut -d' ' -f"$i"; done); }
  local fr50 fp50 fp99 fcpu
  fr50=$(col 1 "${F[@]}"); fp50=$(col 2 "${F[@]}"); fp99=$(col 3 "${F[@]}"); fcpu=$(col 4 "${F[@]}")
  if [ -n "${QDR_RUN:-}" ]; then
    local qr50 qp50 qp99 qcpu
    qr50=$(col 1 "${Q[@]}"); qp50=$(col 2 "${Q[@]}"); qp99=$(col 3 "${Q[@]}"); qcpu=$(col 4 "${Q[@]}")
    echo "| $name | $qr50 | $fr50 | $(python3 -c "print('%.1f×' % ($fr50/$qr50))") | $qp50 / $fp50 | $qp99 / $fp99 | $qcpu / $fcpu % |"
  else
    echo "| $name | — | $fr50 | — | — / $fp50 | — / $fp99 | — / $fcpu % |"
  fi
}

# The ceiling at a fixed rate: the same C Proton sender straight to a
# listening peer (`flotilla bench --listen`, which times cload's messages).
p2p=()
for _ in $(seq "$runs"); do
  "$bin" bench --listen 127.0.0.1:27009 --senders 0 --duration $((secs + 3)) --json > "$tmp/p2p.json" 2>/dev/null & bp=$!
  wait_port 27009
  "$cload" send 127.0.0.1:27009 q "$secs" 100 --rate 10000 > /dev/null
  wait "$bp"
  p2p+=("$(python3 -c "import json; print(json.load(open('$tmp/p2p.json'))['p50_us'])")")
done
echo "Peer to peer (no router), fixed 10k msg/s, 100 B: p50 $(median "${p2p[@]}") µs"
echo
echo "| scenario | qdrouterd msg/s | Flotilla msg/s | ratio | p50 µs qdrouterd / Flotilla | p99 µs | router CPU qdrouterd / Flotilla |"
echo "|---|---|---|---|---|---|---|"
row "1 router, 100 B" flotilla_one qdr_one 27001 27001 28001 28001 100
row "1 router, 1 KiB" flotilla_one qdr_one 27001 27001 28001 28001 1024
row "1 router, fixed 10k msg/s, 100 B" flotilla_one qdr_one 27001 27001 28001 28001 100 --rate 10000
row "2-router chain, 100 B" flotilla_chain qdr_chain 27003 27002 28003 28002 100
row "2-router chain, fixed 10k msg/s, 100 B" flotilla_chain qdr_chain 27003 27002 28003 28002 100 --rate 10000

# Five rounds in a row on the same chain: latency and router B's RSS.
echo
echo "| round | Flotilla msg/s | p50 µs | p99 µs | router B RSS KiB |"
echo "|---|---|---|---|---|"
flotilla_chain
for i in 1 2 3 4 5; do
  read -r rate p50 p99 _ <<< "$(one 27003 27002 100)"
  echo "| $i | $rate | $p50 | $p99 | $(awk '/VmRSS/ {print $2}' "/proc/${pids[1]}/status") |"
done
stop_all
