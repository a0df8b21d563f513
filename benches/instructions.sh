#!/usr/bin/env bash
# User-space instructions per proxied request: nginx as a reverse proxy beside `loadtape
# record` with capture on and off, each under valgrind's callgrind, the same requests through
# each to one nginx origin.
#
# Throughput and CPU time on a shared VM swing by 10-20% between runs (benches/proxy.sh
# alternates rounds to see through it); an instruction count does not move between runs, so a
# change of a few percent shows, and callgrind's per-function profile says where it went. It
# counts user space only: the kernel's TCP work (about 60% of a proxy's CPU on loopback, and
# the same for both) is not in it, and an instruction is not a cycle (`rep movsb` counts per
# byte, SIMD as one), so read the ratios, not the absolute figures.
#
#   bash benches/instructions.sh           # N=20000 requests, 8 connections
#   CACHE=1 bash benches/instructions.sh   # also simulated cache misses, thread by thread
#
# With CACHE=1 callgrind simulates the caches (32 KiB L1i and L1d, 64-byte lines) and keeps
# each thread apart: per request, instructions and L1 misses (I1mr: instruction fetches, D1mr,
# D1mw: data) of every busy thread. What a request runs once, straight through, costs a
# fetched line of code per few instructions; what a loop runs is fetched once. Capture's
# cost is mostly the former (benches/README.md, the thirteenth session), so count lines, not
# only instructions.
#
# Every request carries a Quay-shaped bearer JWT, as registry clients' do (BEARER=0: none).
#
# Needs nginx, valgrind (Debian packages) and oha (`cargo install --locked oha`). Profiles are left in
# $OUT (default target/instructions): `callgrind_annotate --inclusive=yes FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}
CACHE=${CACHE:-0}
OUT=${OUT:-target/instructions}

source benches/common.sh
need nginx "apt-get install nginx"
need valgrind "apt-get install valgrind"
need oha "cargo install --locked oha"

setup
mkdir -p "$OUT"

single="worker_processes 1; master_process off; daemon off;"
nginx_conf origin 18100 18100 "location / { root $work/www; }" "$single"
nginx -c "$work/origin.conf" &
pids+=($!)
# As benches/proxy.sh configures it ($NGINX_PROXY, from common.sh).
nginx_conf proxy 18101 18100 "$NGINX_PROXY" "$single"

wait_for 18100

# measure NAME PORT STOP-SIGNAL COMMAND...: instructions per request of COMMAND under callgrind.
measure() {
  local name=$1 port=$2 signal=$3
  shift 3
  local sim=()
  [ "$CACHE" = 1 ] && sim=(--cache-sim=yes --separate-threads=yes)
  valgrind --tool=callgrind "${sim[@]}" --callgrind-out-file="$OUT/$name.callgrind" "$@" > "$work/$name.log" 2>&1 &
  local pid=$!
  wait_for "$port"
  oha -n "$N" -c 8 --no-tui "${auth[@]}" "http://127.0.0.1:$port/data" > /dev/null
  kill "-$signal" "$pid"
  wait "$pid" || true
  # One file per thread with CACHE=1 (NAME.callgrind-01, -02...), one in all without.
  python3 - "$name" "$N" "$OUT" "$work/totals" <<'EOF'
import glob, sys
name, n, out, totals = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
threads = []
for path in sorted(glob.glob(f"{out}/{name}.callgrind*")):
    events = summary = None
    for line in open(path):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            summary = [int(x) for x in line.split()[1:]]
            break
    if events and summary:
        threads.append((path.rsplit("-", 1)[-1] if "callgrind-" in path else "all", dict(zip(events, summary))))
total = sum(t["Ir"] for _, t in threads)
print(f"  {name:22} {total / n:9.0f} instructions per request")
open(totals, "a").write(f"{name} {total}\n")
if threads and "I1mr" in threads[0][1]:
    for thread, t in threads:
        if t["Ir"] < total / 100:
            continue
        print(f"    thread {thread}: {t['Ir'] / n:7.0f} instructions, L1 misses: {t['I1mr'] / n:5.0f} I1mr {t['D1mr'] / n:5.0f} D1mr {t['D1mw'] / n:5.0f} D1mw")
EOF
}

export LOADTAPE_LOG=warn
echo "user-space instructions per request, $N requests of 1 KiB through each (callgrind):"
measure nginx-proxy 18101 QUIT nginx -c "$work/proxy.conf"
measure loadtape-capture-on 18102 INT \
  $loadtape record --listen 127.0.0.1:18102 --upstream http://127.0.0.1:18100 --out "$work/on" --threads 1
measure loadtape-capture-off 18103 INT \
  $loadtape record --listen 127.0.0.1:18103 --upstream http://127.0.0.1:18100 --out "$work/off" --threads 1 --sample 0
python3 - "$work/totals" <<'EOF'
import sys
t = dict(l.split() for l in open(sys.argv[1]))
n = float(t["nginx-proxy"])
print(f"  capture on / nginx:  {float(t['loadtape-capture-on']) / n:.2f}x")
print(f"  capture off / nginx: {float(t['loadtape-capture-off']) / n:.2f}x")
EOF
