# Sourced by the bench scripts: what each does before its own work.
#
#   need COMMAND HOW     stops with what to install when COMMAND is missing
#   setup                builds loadtape ($loadtape), makes a work directory ($work) with a
#                        1 KiB file to serve ($work/www/data), and kills what was started
#                        (pids+=($!)) and removes $work on exit

need() {
  command -v "$1" >/dev/null || { echo "benches/$(basename "$0") needs $1: $2" >&2; exit 2; }
}

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

setup() {
  cargo build --release --quiet
  loadtape=target/release/loadtape
  work=$(mktemp -d)
  pids=()
  trap cleanup EXIT
  mkdir -p "$work/www"
  head -c 1024 /dev/urandom | base64 -w 0 | head -c 1024 > "$work/www/data"
}
