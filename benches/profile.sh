#!/usr/bin/env bash
# Where loadtape record's CPU goes, per request: perf samples (cpu-clock, which this VM
# samples although it has no hardware counters) of the recorder under wrk, beside an nginx
# origin serving 1 KiB, for each of the given builds and modes in alternating rounds. Prints,
# for each run, the user-space and kernel CPU per request and each thread's; then, for the
# first and second runs of the last round, the user-space symbols whose time per request
# differs most. What found the allocator collecting blocks freed on the writer's core, and
# the reference count passed between cores with every record (benches/README.md).
#
#   bash benches/profile.sh                       # this tree's build, capture on then off
#   bash benches/profile.sh old:on new:on         # two builds (paths to binaries), alternating
#
# A SPEC is BINARY[:MODE], MODE `on` (the default) or `off` (--sample 0); a BINARY of `.` is
# this tree's release build. ROUNDS=2 DURATION=8 (seconds) TOP=30 by default.
#
# Needs nginx, wrk and perf (Debian packages nginx, wrk, linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8}
TOP=${TOP:-30}
[ $# -gt 0 ] || set -- .:on .:off

source benches/common.sh
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"
need perf "apt-get install linux-perf"

setup
start_origin

# run NAME BINARY MODE: the recorder under wrk for DURATION s, sampled for DURATION-1 s after a
# second of warm-up; leaves NAME.data (perf) and NAME.rps in $work.
run() {
  local extra=() recorder
  [ "$3" = off ] && extra=(--sample 0)
  LOADTAPE_LOG=warn "$2" record --listen 127.0.0.1:18002 --upstream http://127.0.0.1:18000 \
    --out "$work/tape-$1" "${extra[@]}" > /dev/null 2>&1 &
  recorder=$!
  wait_for 18002
  wrk -t2 -c64 -d3s "${auth[@]}" http://127.0.0.1:18002/data > /dev/null
  checked_wrk -t2 -c64 -d"${DURATION}s" "${auth[@]}" http://127.0.0.1:18002/data > "$work/$1.wrk" &
  local driver=$!
  sleep 1
  perf record -q -e cpu-clock -F 2999 -p "$recorder" -o "$work/$1.data" -- sleep $((DURATION - 1)) \
    > /dev/null 2>&1
  wait "$driver"
  kill "$recorder"
  wait "$recorder" 2> /dev/null || true
  rm -rf "$work/tape-$1"
  awk '/Requests\/sec/ {print $2}' "$work/$1.wrk" > "$work/$1.rps"
}

# report NAME: ns per request by kind and by thread; NAME.syms: ns per request by symbol.
report() {
  local rps seconds=$((DURATION - 1))
  rps=$(cat "$work/$1.rps")
  perf report -i "$work/$1.data" --stdio --sort comm,dso,sym -F sample,comm,dso,sym 2> /dev/null |
    python3 -c '
import sys, collections
name, rps, seconds, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
per = 1e9 / (2999 * seconds) / rps
kinds, threads, syms = collections.Counter(), collections.Counter(), collections.Counter()
for line in sys.stdin:
    if line.startswith("#") or not line.strip():
        continue
    count, thread, dso, rest = line.split(None, 3)
    ns = int(count) * per
    kernel = "kernel" in dso
    kinds["kernel" if kernel else "user"] += ns
    threads[thread] += ns
    if not kernel:
        syms[rest.split("]", 1)[-1].strip()] += ns
print(f"{name}: {rps:.0f} req/s, user {kinds['"'"'user'"'"']:.0f} ns + kernel {kinds['"'"'kernel'"'"']:.0f} ns a request;",
      ", ".join(f"{t} {ns:.0f}" for t, ns in sorted(threads.items())))
with open(out, "w") as f:
    for sym, ns in syms.items():
        f.write(f"{ns:.1f}\t{sym}\n")
' "$1" "$rps" "$seconds" "$work/$1.syms"
}

loadtape_of() { if [ "$1" = . ]; then echo "$loadtape"; else echo "$1"; fi; }

names=()
for round in $(seq "$ROUNDS"); do
  names=()
  for spec in "$@"; do
    binary=${spec%%:*}
    mode=on
    [[ $spec == *:* ]] && mode=${spec#*:}
    name="$(basename "$binary")-$mode-$round"
    [ "$binary" = . ] && name="this-$mode-$round"
    run "$name" "$(loadtape_of "$binary")" "$mode"
    report "$name"
    names+=("$name")
  done
done

if [ ${#names[@]} -ge 2 ]; then
  echo
  echo "user-space ns a request, ${names[0]} against ${names[1]} (the largest differences):"
  python3 - "$work/${names[0]}.syms" "$work/${names[1]}.syms" "$TOP" <<'EOF'
import sys
def load(path):
    d = {}
    for line in open(path):
        ns, sym = line.rstrip("\n").split("\t", 1)
        d[sym] = d.get(sym, 0) + float(ns)
    return d
a, b, top = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
rows = sorted(((a.get(s, 0) - b.get(s, 0), a.get(s, 0), b.get(s, 0), s) for s in set(a) | set(b)),
              key=lambda r: -abs(r[0]))
print(f"  total {sum(r[0] for r in rows):+.0f} ns")
for d, x, y, s in rows[:top]:
    print(f"  {d:+7.0f} {x:7.0f} {y:7.0f}  {s[:100]}")
EOF
fi
