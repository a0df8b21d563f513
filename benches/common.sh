# Sourced by the bench scripts: what each does before its own work.
#
#   need COMMAND HOW     stops with what to install when COMMAND is missing
#   setup                builds loadtape ($loadtape; LOADTAPE=path takes that binary instead),
#                        makes a work directory ($work) with a 1 KiB file to serve
#                        ($work/www/data), and kills what was started (pids+=($!)) and removes
#                        $work on exit
#   nginx_conf NAME PORT ORIGIN_PORT SERVER [MAIN]
#                        writes $work/NAME.conf: nginx on PORT with SERVER as its server block,
#                        `origin` the nginx on ORIGIN_PORT (kept connections), MAIN top-level
#                        directives
#   start_origin         an nginx origin (one worker) serving $work/www on port 18000, in the
#                        background, ready when it returns
#   wait_for PORT        returns once http://127.0.0.1:PORT/data answers; stops the script when
#                        nothing does within a minute
#   round_order ROUND ITEM...
#                        the items in this order in odd rounds, reversed in even ones: a
#                        target's place in a round moved its requests/s by ~4% (the last of
#                        four was favoured in benches/capped.sh), which a fixed order puts in
#                        every ratio
#   cpu_ticks PID...     the CPU time (user + system, in clock ticks) the processes have taken
#   checked_wrk ARGS...  runs wrk and prints its report; stops the script when a response was not
#                        2xx/3xx or a socket failed (a bench of error pages measures nothing)
#   $NGINX_PROXY         the server block of the nginx reverse proxy loadtape is measured against
#   "${auth[@]}"         the arguments that make wrk or oha send `Authorization: Bearer` with a
#                        JWT shaped as Quay's (829 bytes: RS256, an access claim, a 256-byte
#                        signature), as every registry client does on every request; none with
#                        BEARER=0

# Quay's registry JWTs: a header, claims naming the repository and actions, a 256-byte
# signature. The same token on every request, as one client session sends it.
jwt_part() { printf '%s' "$1" | base64 -w 0 | tr '+/' '-_' | tr -d '='; }
bearer=$(jwt_part '{"alg":"RS256","typ":"JWT","kid":"quay"}').$(jwt_part \
  '{"iss":"quay","aud":"quay.example.com","nbf":1764100000,"iat":1764100000,"exp":1764103600,"sub":"someuser","access":[{"type":"repository","name":"org/app","actions":["pull"]}],"context":{"version":2,"entity_kind":"user","entity_reference":"someuser","kind":"user","com.apostille.roots":{"org/app":{"Digest":"","Root":""}}}}').$(head -c 256 /dev/zero | tr '\0' 'k' | base64 -w 0 | tr -d '=')
if [ "${BEARER:-1}" = 1 ]; then auth=(-H "Authorization: Bearer $bearer"); else auth=(); fi

need() {
  command -v "$1" >/dev/null || { echo "benches/$(basename "$0") needs $1: $2" >&2; exit 2; }
}

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

setup() {
  # LOADTAPE=path measures that binary (another build) instead of this tree's.
  if [ -n "${LOADTAPE:-}" ]; then
    loadtape=$LOADTAPE
  else
    cargo build --release --quiet
    loadtape=target/release/loadtape
  fi
  work=$(mktemp -d)
  # nginx's workers run as nobody: mktemp's 0700 left them a 403 for the file to serve, which
  # every bench measured until wait_for (curl -f) refused it.
  chmod 755 "$work"
  pids=()
  trap cleanup EXIT
  mkdir -p "$work/www"
  head -c 1024 /dev/urandom | base64 -w 0 | head -c 1024 > "$work/www/data"
}

nginx_conf() {
  cat > "$work/$1.conf" <<EOF
${5:-}
pid $work/$1.pid;
error_log $work/$1-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$1-body;
  proxy_temp_path $work/$1-proxy;
  upstream origin { server 127.0.0.1:$3; keepalive 128; }
  server { listen 127.0.0.1:$2; $4 }
}
EOF
}

start_origin() {
  nginx_conf origin 18000 18000 "location / { root $work/www; }" "worker_processes 1;"
  nginx -c "$work/origin.conf" -g 'daemon off;' > /dev/null 2>&1 &
  pids+=($!)
  wait_for 18000
}

wait_for() {
  for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$1/data" && return; sleep 0.2; done
  echo "benches/$(basename "$0"): nothing answers on port $1" >&2
  exit 1
}

round_order() {
  local round=$1
  shift
  if [ $((round % 2)) -eq 1 ]; then echo "$*"; else printf '%s\n' "$@" | tac | tr '\n' ' '; fi
}

cpu_ticks() {
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

checked_wrk() {
  local out
  out=$(wrk "$@")
  if grep -qE 'Non-2xx or 3xx responses|Socket errors' <<<"$out"; then
    printf '%s\n' "$out" >&2
    echo "benches/$(basename "$0"): wrk $* had failed requests (above); the figures would be of errors" >&2
    exit 1
  fi
  printf '%s\n' "$out"
}

# Configured as a reverse proxy in front of Quay is (and as loadtape forwards by default): the
# client's Host passed on, X-Forwarded-For, -Proto and -Host added.
# shellcheck disable=SC2016 # nginx's variables, not the shell's
NGINX_PROXY='location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host; }'
