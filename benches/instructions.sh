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
#
# Every request carries a Quay-shaped bearer JWT, as registry clients' do (BEARER=0: none).
#
# Needs nginx, valgrind (Debian packages) and oha (`cargo install --locked oha`). Profiles are left in
# $OUT (default target/instructions): `callgrind_annotate --inclusive=yes FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}
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
  valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.callgrind" "$@" > "$work/$name.log" 2>&1 &
  local pid=$!
  wait_for "$port"
  oha -n "$N" -c 8 --no-tui "${auth[@]}" "http://127.0.0.1:$port/data" > /dev/null
  kill "-$signal" "$pid"
  wait "$pid" || true
  local total
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$OUT/$name.callgrind")
  python3 -c "print(f'  {\"$name\":22} {$total / $N:9.0f} instructions per request')"
  echo "$name $total" >> "$work/totals"
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
