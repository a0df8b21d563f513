"""Latency from oha's per-request CSV (`oha --output-format csv`), for benches/proxy.sh.

    python3 benches/oha_csv.py FILE.csv        one round: percentiles, and when the client sent late
    python3 benches/oha_csv.py --summary DIR   every PORT-ROUND.csv in DIR: medians over rounds

Two latencies per request, both in milliseconds:

* from intended send: `request-duration`, which oha with --latency-correction counts from the
  instant the request was due (open loop, no coordinated omission). It is what oha's summary
  prints, and the figure the targets are about.
* from send: `Response-delay`, from the instant oha sent the request to its first byte (the
  1 KiB body follows in the same segment): what the proxy and the origin took for it.

Their difference is how late the client sent. It sends late for two reasons, which the second
of the run it happened in tells apart:

* its own pauses: oha keeps every result in one growing vector, and each time it doubles (at
  32768, 65536, 131072 requests: 1.6, 3.2, 6.5 s at 20k requests a second) jemalloc copies it
  into fresh pages and the client stops sending and reading for 5-20 ms (30-60 ms when that
  memory is backed by huge pages). Every request due meanwhile is late, through any proxy.
* all its connections (-c) waiting on answers: when answers slow down (in the first moments of
  a run, as connections open), requests queue in the client. That is the server's doing, and
  the open-loop figure rightly counts it.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from median_ci import median_ci  # noqa: E402 (beside this file)


def load(path):
    """(start s, first byte ms, duration ms) per request, in order of sending."""
    rows = []
    with open(path) as f:
        next(f)
        for line in f:
            start, _dns, _dial, first_byte, duration, _bytes, status = line.split(",")
            if not 200 <= int(status) < 400:
                sys.exit(f"{path}: a request answered {status.strip()}: the figures would be of errors")
            rows.append((float(start), float(first_byte) * 1e3, float(duration) * 1e3))
    if not rows:
        sys.exit(f"{path}: no successful requests (is the proxy up?)")
    return rows


def pct(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def figures(rows):
    duration = sorted(r[2] for r in rows)
    sent = sorted(r[1] for r in rows)
    return {
        "p50": pct(duration, 0.50),
        "p99": pct(duration, 0.99),
        "sent_p50": pct(sent, 0.50),
        "sent_p99": pct(sent, 0.99),
    }


def pauses(rows, over_ms=5.0):
    """Requests the client sent more than `over_ms` late, by second of the run."""
    late = {}
    for start, first_byte, duration in rows:
        if duration - first_byte > over_ms:
            second = int(start)
            late[second] = late.get(second, 0) + 1
    return late


def one(path):
    rows = load(path)
    f = figures(rows)
    late = pauses(rows)
    where = ", ".join(f"{n} in second {s}" for s, n in sorted(late.items(), key=lambda x: -x[1])[:3])
    print(
        f"p50 {f['p50']:.2f} ms p99 {f['p99']:.2f} ms from intended send; "
        f"p50 {f['sent_p50']:.2f} ms p99 {f['sent_p99']:.2f} ms from send"
        + (f"; sent >5 ms late: {sum(late.values())} ({where})" if late else "")
    )


def summary(directory):
    names = {"18001": "nginx reverse proxy", "18002": "loadtape, capture on", "18003": "loadtape, capture off"}
    by = {}
    for name in sorted(os.listdir(directory), key=lambda n: [int(x) for x in n.removesuffix(".csv").split("-")]):
        port, _round = name.removesuffix(".csv").split("-")
        by.setdefault(port, []).append(figures(load(os.path.join(directory, name))))
    for port, rounds in sorted(by.items()):
        def spread(key):
            v = [r[key] for r in rounds]
            return f"{statistics.median(v):.2f} ms [{min(v):.2f}..{max(v):.2f}]"

        print(f"  {names.get(port, port):24} from intended send: p50 {spread('p50')}  p99 {spread('p99')}")
        print(f"  {'':24} from send:          p50 {spread('sent_p50')}  p99 {spread('sent_p99')}")
    # Differences within each round (the rounds drift more than the proxies differ), their
    # median and its bootstrap interval: "no worse than nginx's" holds where the interval's
    # high end is at or below zero, or within what the interval says the run can tell.
    pairs = [("18002", "18001", "capture on - nginx"), ("18003", "18001", "capture off - nginx"), ("18002", "18003", "capture on - off")]
    print("  differences per round (ms: median [min..max], 95% interval of the median; lower is better for the first):")
    for a, b, label in pairs:
        if a not in by or b not in by:
            continue
        for key, what in (("p50", "p50"), ("p99", "p99"), ("sent_p50", "p50 from send"), ("sent_p99", "p99 from send")):
            d = [x[key] - y[key] for x, y in zip(by[a], by[b])]
            low, high = median_ci(d)
            below = sum(1 for v in d if v < 0)
            print(f"    {label:20} {what:14} {statistics.median(d):+.3f} [{min(d):+.2f}..{max(d):+.2f}]  interval {low:+.3f}..{high:+.3f}  below in {below} of {len(d)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
    elif len(sys.argv) == 2:
        one(sys.argv[1])
    else:
        sys.exit(__doc__)
