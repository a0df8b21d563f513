#!/usr/bin/env bash
# What the kernel does per proxied request, nginx as a reverse proxy beside `loadtape record`
# (capture on and off), under wrk: system calls by kind (perf's syscall tracepoints on the
# proxy's processes) and TCP segments (`nstat`, the whole machine: the client and the origin
# are the same for every proxy, so a difference is the proxy's). The kernel takes about three
# quarters of a proxy's CPU on loopback; this tells whether a proxy makes it do more.
#
#   bash benches/kernel.sh        # DURATION=4 seconds per proxy
#
# Needs nginx, wrk, perf and nstat (Debian packages nginx, wrk, linux-perf, iproute2).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-4}

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"
need perf "apt-get install linux-perf"
need nstat "apt-get install iproute2"

setup
start_origin
nginx_conf proxy 18001 18000 "$NGINX_PROXY" "worker_processes 2;"
nginx -c "$work/proxy.conf" -g 'daemon off;' > /dev/null 2>&1 &
pids+=($!)
LOADTAPE_LOG=warn $loadtape record --listen 127.0.0.1:18002 --upstream http://127.0.0.1:18000 \
  --out "$work/on" > /dev/null 2>&1 &
pids+=($!)
on=$!
LOADTAPE_LOG=warn $loadtape record --listen 127.0.0.1:18003 --upstream http://127.0.0.1:18000 \
  --out "$work/off" --sample 0 > /dev/null 2>&1 &
pids+=($!)
off=$!
for port in 18001 18002 18003; do
  wait_for "$port"
done

events=()
for call in recvfrom sendto read write readv writev epoll_wait epoll_pwait epoll_ctl futex \
  clock_nanosleep getsockopt setsockopt accept4 close; do
  events+=(-e "syscalls:sys_enter_$call")
done

declare -A names=([18001]="nginx reverse proxy" [18002]="loadtape, capture on" [18003]="loadtape, capture off")
for port in 18001 18002 18003; do
  case $port in
    18001) targets=$(pgrep -P "$(cat "$work/proxy.pid")" | paste -sd,) ;;
    18002) targets=$on ;;
    18003) targets=$off ;;
  esac
  wrk -t2 -c64 -d2s "${auth[@]}" "http://127.0.0.1:$port/data" > /dev/null
  nstat -n
  perf stat -x, -e raw_syscalls:sys_enter "${events[@]}" -p "$targets" -o "$work/stat" -- \
    sleep "$DURATION" > /dev/null 2>&1 &
  counting=$!
  checked_wrk -t2 -c64 -d"${DURATION}s" "${auth[@]}" "http://127.0.0.1:$port/data" > "$work/wrk"
  wait "$counting" || true
  requests=$(awk '/requests in/ {print $1}' "$work/wrk")
  echo "${names[$port]}: $requests requests; per request:"
  awk -F, -v n="$requests" '$3 ~ /sys_enter/ && $1 > 0 {
    name = $3; sub(/.*sys_enter_?/, "", name); if (name == "") name = "all system calls"
    printf "  %-20s %7.3f\n", name, $1 / n }' "$work/stat"
  nstat | awk -v n="$requests" '$1 ~ /^(TcpInSegs|TcpOutSegs|TcpExtDelayedACKs|TcpExtTCPPureAcks)$/ {
    printf "  %-20s %7.3f\n", $1, $2 / n }'
done
