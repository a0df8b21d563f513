#!/usr/bin/env bash
# The recording proxy beside nginx, in one run on loopback.
#
# An nginx origin serves a 1 KiB file. wrk drives it, in alternating rounds, straight to the
# origin, through nginx as a reverse proxy, and through `loadtape record` with capture on and
# off (--sample 0: forwarding only). Then oha, open-loop (--latency-correction), measures
# latency at half of nginx's saturated throughput through nginx and through loadtape with
# capture on and off, and gives the differences within each round with an interval of their
# median. With SOAK=300 it also records under load for 5 minutes and samples loadtape's
# resident memory beside its tape queue (from its /metrics). Every request carries
# `Authorization: Bearer` with a Quay-shaped JWT, as registry clients' requests do (BEARER=0
# for none, the shape of runs before 2026-11-26's fourth session).
#
# Open-loop latency is computed from oha's per-request CSV (benches/oha_csv.py): from the
# intended send (the figure that counts), and from the actual send.
#
# Beside throughput it reports CPU time per request of each proxy (user + system, from
# /proc, all its threads and worker processes): on a shared 2-core VM where wrk, the origin
# and the proxy compete for the same cores, throughput swings by 10-15% between runs, while
# the CPU a proxy spends per request is what decides its share and varies far less.
#
# Each ratio is given per round (median [min..max]) with a bootstrap 95% interval of its median:
# with five rounds that interval is nearly the range; more rounds (ROUNDS=10) narrow it.
#
#   bash benches/proxy.sh            # ROUNDS=5 DURATION=10s CONNS=64 by default
#   OPEN=0 bash benches/proxy.sh     # no open loop
#   RATE=18000 bash benches/proxy.sh # no saturated rounds: the open loop at that rate
#   RATE=1 OPEN=0 SOAK=300 bash benches/proxy.sh   # the soak alone
#   OPEN_ROUNDS=30 OPEN_DURATION=3s  # the open loop's own rounds (by default ROUNDS, DURATION)
#
# Needs nginx and wrk (Debian packages) and oha (`cargo install --locked oha`).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
SOAK=${SOAK:-0}
OPEN=${OPEN:-1}
# The open loop compares latencies, which drift between rounds more than throughput does:
# more, shorter rounds pair them better (30 of 3 s gave a p50 interval of +-0.04 ms).
OPEN_ROUNDS=${OPEN_ROUNDS:-$ROUNDS}
OPEN_DURATION=${OPEN_DURATION:-$DURATION}
RATE=${RATE:-}

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"
need oha "cargo install --locked oha"

setup

# start_nginx NAME PORT SERVER WORKERS: an nginx in front of the origin on 18000.
start_nginx() {
  nginx_conf "$1" "$2" 18000 "$3" "worker_processes $4;"
  nginx -c "$work/$1.conf" -g 'daemon off;' &
  pids+=($!)
}
start_nginx origin 18000 "location / { root $work/www; }" 1
proxy_pid_file=$work/proxy.pid
start_nginx proxy 18001 "$NGINX_PROXY" auto
# The admin endpoint, for the soak's queue and drops: off the request's path, as in staging.
LOADTAPE_LOG=warn $loadtape record --listen 127.0.0.1:18002 --upstream http://127.0.0.1:18000 --out "$work/on" --admin-listen 127.0.0.1:18012 &
pids+=($!)
on_pid=$!
LOADTAPE_LOG=warn $loadtape record --listen 127.0.0.1:18003 --upstream http://127.0.0.1:18000 --out "$work/off" --sample 0 &
pids+=($!)
off_pid=$!
for port in 18000 18001 18002 18003; do
  wait_for "$port"
done

# CPU ticks (user + system) of the process serving a port, with its worker processes.
ticks() {
  local top
  case $1 in
    18000) top=$(cat "$work/origin.pid") ;;
    18001) top=$(cat "$proxy_pid_file") ;;
    18002) top=$on_pid ;;
    18003) top=$off_pid ;;
  esac
  # shellcheck disable=SC2046 # a list of pids
  cpu_ticks "$top" $(pgrep -P "$top")
}
hz=$(getconf CLK_TCK)

declare -A names=([18000]="nginx origin (direct)" [18001]="nginx reverse proxy" [18002]="loadtape, capture on" [18003]="loadtape, capture off")
results="$work/results"
: > "$results"
if [ -n "$RATE" ]; then
  echo "$RATE" > "$results.half"
  ROUNDS_SATURATED=0
else
  ROUNDS_SATURATED=$ROUNDS
fi
for round in $(seq "$ROUNDS_SATURATED"); do
  for port in $(round_order "$round" 18000 18001 18002 18003); do
    before=$(ticks $port)
    out=$(checked_wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "${auth[@]}" "http://127.0.0.1:$port/data")
    after=$(ticks $port)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(python3 -c "print(f'{($after - $before) / $hz * 1e6 / $requests:.2f}')")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$port $round $rps $p50 $p99 $cpu" >> "$results"
    echo "round $round  ${names[$port]}: $rps req/s  p50 $p50  p99 $p99  cpu ${cpu} us/req"
  done
done

[ -n "$RATE" ] || python3 - "$results" <<'EOF'
import statistics, sys
sys.path.insert(0, "benches")
from median_ci import median_ci
rows = [l.split() for l in open(sys.argv[1])]
def ms(v):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit): return float(v[: -len(unit)]) * f
    return float(v)
by = {}
for port, rnd, rps, p50, p99, cpu in rows:
    by.setdefault(port, []).append((float(rps), ms(p50), ms(p99), float(cpu)))
names = {"18000": "nginx origin (direct)", "18001": "nginx reverse proxy", "18002": "loadtape, capture on", "18003": "loadtape, capture off"}
print("\nsaturated, wrk closed loop (median of rounds, [min..max]):")
med = {}
for port in ["18000", "18001", "18002", "18003"]:
    r = by[port]
    rps = [x[0] for x in r]
    med[port] = statistics.median(rps)
    print(f"  {names[port]:24} {med[port]:10.0f} req/s [{min(rps):.0f}..{max(rps):.0f}]  p50 {statistics.median(x[1] for x in r):.2f} ms  p99 {statistics.median(x[2] for x in r):.2f} ms  cpu {statistics.median(x[3] for x in r):.1f} us/req")
def ci(ratios):
    low, high = median_ci(ratios)
    return f"95% CI of the median {low:.2f}..{high:.2f}"
on_vs_nginx = [a[0] / b[0] for a, b in zip(by["18002"], by["18001"])]
on_vs_off = [a[0] / b[0] for a, b in zip(by["18002"], by["18003"])]
print(f"  loadtape (capture on) / nginx proxy: {statistics.median(on_vs_nginx):.2f}x [{min(on_vs_nginx):.2f}..{max(on_vs_nginx):.2f}] per round, {ci(on_vs_nginx)}")
print(f"  capture on / capture off:            {statistics.median(on_vs_off):.2f}x [{min(on_vs_off):.2f}..{max(on_vs_off):.2f}] per round, {ci(on_vs_off)}")
cpu_on = [a[3] / b[3] for a, b in zip(by["18002"], by["18001"])]
cpu_off = [a[3] / b[3] for a, b in zip(by["18003"], by["18001"])]
print(f"  CPU per request, loadtape capture on / nginx proxy:  {statistics.median(cpu_on):.2f}x [{min(cpu_on):.2f}..{max(cpu_on):.2f}] per round, {ci(cpu_on)}")
print(f"  CPU per request, loadtape capture off / nginx proxy: {statistics.median(cpu_off):.2f}x [{min(cpu_off):.2f}..{max(cpu_off):.2f}] per round")
open(sys.argv[1] + ".half", "w").write(str(int(med["18001"] / 2)))
EOF

if [ "$OPEN" = 1 ]; then
  rate=$(cat "$results.half")
  echo
  echo "open loop at half of nginx's saturated rate ($rate req/s), oha --latency-correction, $OPEN_ROUNDS alternating rounds of $OPEN_DURATION:"
  echo "  (from intended send: the open-loop latency; from send: what the proxy and origin took once the"
  echo "  client had sent; the difference is the client sending late: benches/oha_csv.py says why)"
  # The first run after the saturating phase sometimes starts slow (answers taking 3-5 ms for its
  # first 0.2 s, seen through nginx and through loadtape, never in later rounds), which queues
  # requests in the client and alone can make a round's p99: a warm-up of each, not counted.
  for port in 18001 18002 18003; do
    oha -z 2s -q "$rate" -c "$CONNS" --latency-correction --no-tui "${auth[@]}" "http://127.0.0.1:$port/data" > /dev/null
  done
  mkdir -p "$work/open"
  for round in $(seq "$OPEN_ROUNDS"); do
    for port in $(round_order "$round" 18001 18002 18003); do
      csv="$work/open/$port-$round.csv"
      oha -z "$OPEN_DURATION" -q "$rate" -c "$CONNS" --latency-correction --no-tui --output-format csv -o "$csv" "${auth[@]}" "http://127.0.0.1:$port/data"
      echo "  round $round  ${names[$port]}: $(python3 benches/oha_csv.py "$csv")"
    done
  done
  python3 benches/oha_csv.py --summary "$work/open"
fi

if [ "$SOAK" -gt 0 ]; then
  echo
  echo "resident memory of loadtape (capture on) under load for ${SOAK}s:"
  wrk -t"$THREADS" -c"$CONNS" -d"${SOAK}s" "${auth[@]}" "http://127.0.0.1:18002/data" > /dev/null &
  load=$!
  for i in $(seq 0 5 "$SOAK"); do
    # The queue's bytes and the drops beside the memory: a step in resident memory with a
    # backlog in the queue is the bounded queue (64 MiB by default) doing its work; one
    # without is something to find.
    metrics=$(curl -s http://127.0.0.1:18012/metrics)
    queue=$(awk '$1 == "loadtape_tape_queue_bytes" {print $2}' <<<"$metrics")
    dropped=$(awk '$1 == "loadtape_tape_records_dropped_total" {print $2}' <<<"$metrics")
    written=$(awk '$1 == "loadtape_tape_records_written_total" {print $2}' <<<"$metrics")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$on_pid/status")
    echo "  t=${i}s rss ${rss} kB  queue ${queue} B  written ${written}  dropped ${dropped}"
    echo "$rss $queue" >> "$work/soak"
    sleep 5
  done
  wait "$load" || true
  awk '{ if (NR == 1 || $1 < lo) lo = $1; if ($1 > hi) hi = $1; if ($2 > q) q = $2 }
       END { printf "  resident memory %.1f..%.1f MB over the run; queue at most %.0f KB (sampled)\n", lo / 1024, hi / 1024, q / 1024 }' "$work/soak"
fi
