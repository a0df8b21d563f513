#!/usr/bin/env bash
# The recording proxy beside nginx, each held to a CPU limit, as in a Kubernetes pod with
# `resources.limits.cpu`: throughput is then the limit over the CPU a proxy spends per request.
#
# In benches/proxy.sh the proxies take what they want of two cores shared with wrk and the
# origin, and throughput follows a proxy's CPU only weakly (capture off spends 5-9% less CPU
# than capture on and forwards 0-3% more). Here each proxy (nginx's workers together; loadtape's
# threads, the tape writer's included) runs in a cgroup of its own with a CFS quota of CAP% of
# one core, small enough that wrk and the origin never run short: what decides its requests/s
# is its CPU per request, capture's share of it included. Rounds alternate nginx, loadtape with
# capture on and with capture off (every other round in the reverse order); each round's
# ratios, then their medians with a bootstrap 95% interval.
#
#   bash benches/capped.sh          # CAP=50 (% of a core) PERIOD=100000 (µs, the kernel's and
#                                   # Kubernetes' default) ROUNDS=8 DURATION=6 (s)
#   ARGS="--threads 2" bash benches/capped.sh   # flags for both recorders
#   BASE=/tmp/loadtape-old bash benches/capped.sh  # and another build's capture on beside
#                                                  # this one's, in the same rounds
#
# Needs nginx and wrk (Debian packages), root, and a writable cgroup cpu controller (v2's
# cpu.max or v1's cpu.cfs_quota_us).
set -euo pipefail
cd "$(dirname "$0")/.."

CAP=${CAP:-50}
PERIOD=${PERIOD:-100000}
ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-6}
ARGS=${ARGS:-}
BASE=${BASE:-}

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"

# Where CPU-limited groups go: cgroup v2 when its cpu controller is on, else v1's cpu hierarchy.
if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
  cgroot=/sys/fs/cgroup
  limit() { echo "$((PERIOD * CAP / 100)) $PERIOD" > "$1/cpu.max"; }
elif [ -w /sys/fs/cgroup/cpu/cgroup.procs ]; then
  cgroot=/sys/fs/cgroup/cpu
  limit() { echo "$PERIOD" > "$1/cpu.cfs_period_us"; echo "$((PERIOD * CAP / 100))" > "$1/cpu.cfs_quota_us"; }
else
  echo "benches/capped.sh needs a writable cgroup cpu controller (run as root)" >&2
  exit 2
fi
groups=()
setup
# After common.sh's cleanup has stopped the processes, their groups go too.
trap 'cleanup; for g in "${groups[@]}"; do rmdir "$g" 2>/dev/null || true; done' EXIT
start_origin

# in_group NAME COMMAND...: runs COMMAND (in place of this shell: `$!` is its pid) in a group
# of its own, limited.
in_group() {
  local g=$cgroot/loadtape-bench-$$-$1
  shift
  exec sh -c "echo \$\$ > $g/cgroup.procs && exec \"\$@\"" sh "$@"
}
names="nginx on off"
ports="18001 18002 18003"
if [ -n "$BASE" ]; then
  names="$names base"
  ports="$ports 18004"
fi
for name in $names; do
  g=$cgroot/loadtape-bench-$$-$name
  mkdir -p "$g"
  limit "$g"
  groups+=("$g")
done

nginx_conf proxy 18001 18000 "$NGINX_PROXY"
in_group nginx nginx -c "$work/proxy.conf" -g 'daemon off;' > /dev/null 2>&1 &
pids+=($!)
nginx_pid=$!
# shellcheck disable=SC2086 # ARGS is a list of flags
LOADTAPE_LOG=warn in_group on $loadtape record --listen 127.0.0.1:18002 \
  --upstream http://127.0.0.1:18000 --out "$work/on" $ARGS > /dev/null 2>&1 &
pids+=($!)
on_pid=$!
# shellcheck disable=SC2086
LOADTAPE_LOG=warn in_group off $loadtape record --listen 127.0.0.1:18003 \
  --upstream http://127.0.0.1:18000 --out "$work/off" --sample 0 $ARGS > /dev/null 2>&1 &
pids+=($!)
off_pid=$!
if [ -n "$BASE" ]; then
  # shellcheck disable=SC2086
  LOADTAPE_LOG=warn in_group base "$BASE" record --listen 127.0.0.1:18004 \
    --upstream http://127.0.0.1:18000 --out "$work/base" $ARGS > /dev/null 2>&1 &
  pids+=($!)
  base_pid=$!
fi
for port in $ports; do
  wait_for "$port"
done

hz=$(getconf CLK_TCK)
results=$work/results
: > "$results"
echo "each proxy held to $CAP% of a core (CFS period ${PERIOD} µs); wrk -t2 -c64, $ROUNDS rounds of ${DURATION}s${ARGS:+; loadtape $ARGS}"
for round in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086 # a list of ports
  for port in $(round_order "$round" $ports); do
    case $port in
      18001) procs=$(pgrep -P "$nginx_pid" | tr '\n' ' '); name="nginx reverse proxy" ;;
      18002) procs=$on_pid; name="loadtape, capture on" ;;
      18003) procs=$off_pid; name="loadtape, capture off" ;;
      18004) procs=$base_pid; name="$BASE, capture on" ;;
    esac
    # shellcheck disable=SC2086 # a list of pids
    before=$(cpu_ticks $procs)
    out=$(checked_wrk -t2 -c64 -d"${DURATION}s" --latency "${auth[@]}" "http://127.0.0.1:$port/data")
    # shellcheck disable=SC2086
    after=$(cpu_ticks $procs)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(python3 -c "print(f'{($after - $before) / $hz * 1e6 / $requests:.2f}')")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$port $round $rps $cpu" >> "$results"
    echo "round $round  $name: $rps req/s  cpu $cpu us/req  p99 $p99"
  done
done

python3 - "$results" "$BASE" <<'EOF'
import statistics, sys
sys.path.insert(0, "benches")
from median_ci import median_ci
by = {}
for port, rnd, rps, cpu in (l.split() for l in open(sys.argv[1])):
    by.setdefault(port, []).append((float(rps), float(cpu)))
def line(what, ratios):
    low, high = median_ci(ratios)
    print(f"  {what:40} {statistics.median(ratios):.2f}x [{min(ratios):.2f}..{max(ratios):.2f}] per round, 95% CI of the median {low:.2f}..{high:.2f}")
print()
for port, name in (("18001", "nginx reverse proxy"), ("18002", "loadtape, capture on"), ("18003", "loadtape, capture off")):
    r = by[port]
    print(f"  {name:24} {statistics.median(x[0] for x in r):8.0f} req/s  cpu {statistics.median(x[1] for x in r):.1f} us/req")
ratio = lambda a, b, i=0: [x[i] / y[i] for x, y in zip(by[a], by[b])]
line("loadtape (capture on) / nginx proxy:", ratio("18002", "18001"))
line("loadtape (capture off) / nginx proxy:", ratio("18003", "18001"))
line("capture on / capture off:", ratio("18002", "18003"))
if sys.argv[2]:
    r = by["18004"]
    print(f"  {'BASE, capture on':24} {statistics.median(x[0] for x in r):8.0f} req/s  cpu {statistics.median(x[1] for x in r):.1f} us/req")
    line("capture on / BASE's capture on:", ratio("18002", "18004"))
    line("  its CPU a request:", ratio("18002", "18004", 1))
EOF
