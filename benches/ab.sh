#!/usr/bin/env bash
# Two builds of `loadtape record` side by side: is a change faster? Each build runs as its own
# recorder in front of the same nginx origin (1 KiB), and wrk saturates one, then the other,
# in alternating rounds; each round gives the second build's requests/s and CPU per request
# (user + system, all threads, from /proc) over the first's. Ratios are taken within a round,
# where both builds met the same phase of the machine: on this shared VM, runs an hour apart
# differ by more than most changes do, and a ratio against nginx from another run says little
# about a change (benches/README.md). Prints each round, then the median of the
# rounds' ratios with a bootstrap 95% interval of it.
#
#   bash benches/ab.sh OLD NEW             # binaries; `.` is this tree's release build
#   ROUNDS=10 DURATION=6 ARGS="--sample 0" bash benches/ab.sh /tmp/loadtape-old .
#
# Needs nginx and wrk (Debian packages nginx, wrk).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-6}
ARGS=${ARGS:-}
[ $# -eq 2 ] || { echo "usage: bash benches/ab.sh OLD-BINARY NEW-BINARY (. for this tree's build)" >&2; exit 2; }

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"

setup
start_origin

bins=("$@")
recorders=()
for i in 0 1; do
  [ "${bins[$i]}" = . ] && bins[$i]=$loadtape
  [ -x "${bins[$i]}" ] || { echo "benches/ab.sh: ${bins[$i]} is not an executable" >&2; exit 2; }
  # shellcheck disable=SC2086 # ARGS is a list of flags
  LOADTAPE_LOG=warn "${bins[$i]}" record --listen "127.0.0.1:1801$i" \
    --upstream http://127.0.0.1:18000 --out "$work/tape-$i" $ARGS > /dev/null 2>&1 &
  pids+=($!)
  recorders+=($!)
done
wait_for 18010
wait_for 18011

hz=$(getconf CLK_TCK)
results=$work/rounds
echo "A: ${bins[0]}  B: ${bins[1]}  ($ROUNDS rounds of ${DURATION}s, wrk -t2 -c64${ARGS:+, $ARGS})"
for round in $(seq "$ROUNDS"); do
  declare -A measured=()
  # A first in odd rounds, B first in even ones: whatever the first of a pair leaves behind
  # (its tape writer's last frames, a warmer cache) falls on each build alike.
  order="0 1"
  [ $((round % 2)) = 0 ] && order="1 0"
  for i in $order; do
    before=$(cpu_ticks "${recorders[$i]}")
    out=$(checked_wrk -t2 -c64 -d"${DURATION}s" "${auth[@]}" "http://127.0.0.1:1801$i/data")
    after=$(cpu_ticks "${recorders[$i]}")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    cpu=$(python3 -c "print(f'{($after - $before) / $hz * 1e6 / $requests:.2f}')")
    measured[$i]="$rps $cpu"
  done
  line="$round ${measured[0]} ${measured[1]}"
  echo "$line" >> "$results"
  read -r _ rps_a cpu_a rps_b cpu_b <<<"$line"
  echo "round $round  A $rps_a req/s $cpu_a us/req  B $rps_b req/s $cpu_b us/req"
done

python3 - "$results" <<'EOF'
import statistics, sys
sys.path.insert(0, "benches")
from median_ci import median_ci

rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1])]

def summary(name, ratios, better):
    low, high = median_ci(ratios)
    wins = sum(better(r) for r in ratios)
    print(f"  {name:28} {statistics.median(ratios):.3f}x [{min(ratios):.2f}..{max(ratios):.2f}] "
          f"per round, 95% CI of the median {low:.3f}..{high:.3f}, B better in {wins} of {len(ratios)}")

print("B / A, each round's ratio:")
summary("requests/s", [r[2] / r[0] for r in rows], lambda x: x > 1)
summary("CPU per request", [r[3] / r[1] for r in rows], lambda x: x < 1)
EOF
