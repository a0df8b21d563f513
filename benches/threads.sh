#!/usr/bin/env bash
# CPU per request of each of loadtape record's threads (the proxy threads, the tape writer),
# capture on and off in alternating rounds under wrk: where the capture's CPU goes, which an
# instruction count does not show (a cache line passed between cores costs time, not
# instructions). It found the shared counters and queue that cost the proxy threads 2-3 µs per
# request with capture on (benches/README.md). Times are the scheduler's (schedstat): on a CPU,
# and waiting for one.
#
#   bash benches/threads.sh            # ROUNDS=2 DURATION=8s
#
# Needs nginx and wrk (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8s}

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"

setup
start_origin

# thread_times PID: "name run-ns wait-ns" for each of PID's threads, from the scheduler's own
# account (/proc/.../schedstat: time on a CPU, time waiting for one), in nanoseconds where
# /proc's stat counts clock ticks.
thread_times() {
  for task in /proc/"$1"/task/*; do
    echo "$(tr ' ' _ < "$task/comm") $(awk '{print $1, $2}' "$task/schedstat")"
  done
}

for round in $(seq "$ROUNDS"); do
  for mode in on off; do
    extra=()
    [ "$mode" = off ] && extra=(--sample 0)
    LOADTAPE_LOG=warn $loadtape record --listen 127.0.0.1:18002 --upstream http://127.0.0.1:18000 \
      --out "$work/$mode$round" "${extra[@]}" > /dev/null 2>&1 &
    recorder=$!
    pids+=("$recorder")
    wait_for 18002
    wrk -t2 -c64 -d2s "${auth[@]}" "http://127.0.0.1:18002/data" > /dev/null
    before=$(thread_times "$recorder")
    out=$(wrk -t2 -c64 -d"$DURATION" "${auth[@]}" "http://127.0.0.1:18002/data")
    after=$(thread_times "$recorder")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    echo "round $round, capture $mode: $(awk '/Requests\/sec/ {print $2}' <<<"$out") req/s"
    python3 - "$requests" <<PYEOF
import sys
n = int(sys.argv[1])
def parse(text):
    d = {}
    for line in text.strip().splitlines():
        name, run, wait = line.split()
        r, w = d.get(name, (0, 0))
        d[name] = (r + int(run), w + int(wait))
    return d
b, a = parse("""$before"""), parse("""$after""")
for name in sorted(a):
    if name.startswith(("proxy-", "tape-writer")):
        run, wait = (x - y for x, y in zip(a[name], b.get(name, (0, 0))))
        print(f"  {name:12} {run / 1e3 / n:6.2f} us/request on a CPU, {wait / 1e3 / n:6.2f} waiting for one")
PYEOF
    kill -INT "$recorder"
    wait "$recorder" || true
  done
done
