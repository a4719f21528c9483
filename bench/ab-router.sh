#!/usr/bin/env bash
# Two builds of the router side by side (interleaved), one router, C
# Proton's client (../shared/tools/cload.c) saturating with 100 B unsettled
# messages for 5 s per round. Prints "build rate p50_us p99_us" per round.
#
#   bench/ab-router.sh OLD_BINARY NEW_BINARY [ROUNDS]    (CLOAD=path/to/cload)
set -euo pipefail
old=$1 new=$2 rounds=${3:-4}
cload=${CLOAD:-/tmp/cload}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
[ -x "$cload" ] || gcc -O2 -o "$cload" "$(dirname "$0")/../../shared/tools/cload.c" -l:libqpid-proton-core.so.10 -l:libqpid-proton-proactor.so.1
for _ in $(seq "$rounds"); do
  for which in old new; do
    "${!which}" router --amqp 127.0.0.1:27001 2>/dev/null & p=$!
    for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/27001) 2>/dev/null && break; sleep 0.05; done
    "$cload" recv 127.0.0.1:27001 q --credit 1000 > "$tmp/recv.json" & r=$!
    sleep 0.3
    "$cload" send 127.0.0.1:27001 q 5 100 > /dev/null
    wait "$r"
    kill "$p"; wait "$p" 2>/dev/null || true
    echo "$which $(python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(d['rate'], d['p50_us'], d['p99_us'])" "$tmp/recv.json")"
  done
done
