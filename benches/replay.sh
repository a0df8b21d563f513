#!/usr/bin/env bash
# The replayer beside oha, h2load and wrk, in one run against the same nginx origin on loopback.
#
# A tape is recorded first: wrk's traffic to a 1 KiB file, through `loadtape record`. Then, at
# each rate in RATES, for DURATION each:
#   loadtape replay --rate R --connections pooled --loop   (open model; schedule lag reported)
#   oha -q R --latency-correction                          (open model, corrected latency)
#   h2load --h1 --rps (per client)                          (rate-limited clients)
# and wrk's closed-loop maximum for context. The table gives, per rate, the rate achieved and
# p99 latency counted from the intended send time (loadtape, oha), loadtape's own dispatch lag
# p99, and h2load's mean and max. The verdict line: the highest rate at which each keeps its
# p99 under 1 ms.
#
#   bash benches/replay.sh                 # RATES="5000 ... 30000" DURATION=10 ROUNDS=3
#   MEMORY=10000000 bash benches/replay.sh # also replays 10 M requests, sampling resident memory
#
# Needs nginx, wrk and h2load (Debian packages nginx, wrk, nghttp2-client) and oha
# (`cargo install --locked oha`).
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"5000 10000 15000 20000 25000 30000"}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
MEMORY=${MEMORY:-0}

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"
need h2load "apt-get install nghttp2-client"
need oha "cargo install --locked oha"
need jq "apt-get install jq"

setup
cat > "$work/origin.conf" <<EOF
worker_processes 1;
pid $work/origin.pid;
error_log $work/origin-error.log;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/body;
  server { listen 127.0.0.1:18100; location / { root $work/www; } }
}
EOF
nginx -c "$work/origin.conf" -g 'daemon off;' &
pids+=($!)
wait_for 18100
origin=http://127.0.0.1:18100

# The tape: 3 seconds of wrk through the recorder.
LOADTAPE_LOG=warn $loadtape record --listen 127.0.0.1:18101 --upstream $origin --out "$work/tape" &
rec=$!
wait_for 18101
wrk -t2 -c32 -d3s http://127.0.0.1:18101/data >/dev/null
kill -TERM $rec
wait $rec || true
records=$($loadtape inspect --json "$work/tape" | jq .records)
echo "tape: $records recorded requests (GET /data)"

max=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" $origin/data | awk '/Requests\/sec/ {print $2}')
printf '\nwrk closed loop (%s connections): %.0f req/s\n\n' "$CONNS" "$max"

# ROUNDS rounds; in each, every rate, loadtape and oha back to back (this VM's speed drifts by
# tens of percent over minutes: only side-by-side figures compare). Medians over the rounds.
results="$work/results"
: > "$results"
for round in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    lt=$($loadtape replay "$work/tape" --target $origin --rate "$rate" --connections pooled --loop \
          --duration "${DURATION}s" --json 2>/dev/null)
    echo "loadtape $rate $(jq -r --argjson d "$DURATION" '[(.summary.all.replayed.count / $d | floor), .summary.all.replayed.p99_us, .summary.send_lag_p99_us, .summary.dispatch_lag_p99_us] | @tsv' <<<"$lt")" >> "$results"

    oha_json=$(oha -z "${DURATION}s" -q "$rate" --latency-correction -c "$CONNS" --no-tui --output-format json $origin/data)
    echo "oha $rate $(jq -r '[(.summary.requestsPerSec | floor), (.latencyPercentiles.p99 * 1000000 | floor), 0, 0] | @tsv' <<<"$oha_json")" >> "$results"

    per_client=$(( rate / CONNS )); [ "$per_client" -lt 1 ] && per_client=1
    h2=$(h2load --h1 -c "$CONNS" -t 2 --rps="$per_client" -D "$DURATION" $origin/data 2>&1 || true)
    h2_rate=$(awk '/^finished in/ {gsub(",", "", $4); print int($4)}' <<<"$h2")
    h2_mean=$(awk '/^time for request:/ {print $5}' <<<"$h2")
    echo "h2load $rate $h2_rate $h2_mean 0 0" >> "$results"
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { awk -v t="$1" -v r="$2" -v c="$3" '$1 == t && $2 == r {print $c}' "$results" | median; }
printf '\nmedians of %s rounds, %s s each\n' "$ROUNDS" "$DURATION"
printf '%-7s | %-44s | %-20s | %-16s\n' "rate" "loadtape: achieved, p99, send lag p99 (clock's)" "oha: achieved, p99" "h2load: achieved, mean"
best_lag=0; best_lt=0; best_oha=0
for rate in $RATES; do
  lt_rate=$(col loadtape "$rate" 3); lt_p99=$(col loadtape "$rate" 4); lt_lag=$(col loadtape "$rate" 5); lt_clock=$(col loadtape "$rate" 6)
  oha_rate=$(col oha "$rate" 3); oha_p99=$(col oha "$rate" 4)
  h2_rate=$(awk -v r="$rate" '$1 == "h2load" && $2 == r {print $3}' "$results" | median)
  h2_mean=$(awk -v r="$rate" '$1 == "h2load" && $2 == r {print $4}' "$results" | head -1)
  printf '%-7s | %7s/s %7s µs %7s µs (%5s µs)       | %7s/s %7s µs   | %7s/s %s\n' \
    "$rate" "$lt_rate" "$lt_p99" "$lt_lag" "$lt_clock" "$oha_rate" "$oha_p99" "$h2_rate" "$h2_mean"
  held() { [ "$2" -lt 1000 ] && [ "$1" -ge $(( rate * 98 / 100 )) ]; }
  if held "$lt_rate" "$lt_lag"; then best_lag=$rate; fi
  if held "$lt_rate" "$lt_p99"; then best_lt=$rate; fi
  if held "$oha_rate" "$oha_p99"; then best_oha=$rate; fi
done
printf '\nhighest rate held (within 2%%) with p99 under 1 ms:\n'
printf '  loadtape send lag (actual minus intended send time): %s\n' "$best_lag"
printf '  loadtape latency from the intended send time:         %s\n' "$best_lt"
printf '  oha latency, corrected (--latency-correction):        %s\n' "$best_oha"

if [ "$MEMORY" -gt 0 ]; then
  top=$(echo $RATES | tr ' ' '\n' | sort -n | tail -1)
  echo "replaying $MEMORY requests at $top/s, sampling resident memory every 5 s"
  $loadtape replay "$work/tape" --target $origin --rate "$top" --connections pooled --loop \
    --limit "$MEMORY" --json > "$work/memory.json" 2>/dev/null &
  lt=$!
  peak=0
  while kill -0 $lt 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' /proc/$lt/status 2>/dev/null || echo 0)
    [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    sleep 5
  done
  echo "peak resident memory: $(( peak / 1024 )) MiB over $(jq '.summary.all.replayed.count' "$work/memory.json") requests"
fi
