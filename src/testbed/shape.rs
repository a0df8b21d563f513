//! How the testbed answers in time and in failure: latency per endpoint class, periodic stalls,
//! bursts of 502s. Real Quay and Clair have these shapes (see `shared/quay-clair.md`): bcrypt
//! makes every token request and API v1 call cost ~200 ms; Clair's first index of a manifest is
//! slow and heavy-tailed; Clair's database disk saturates now and then, and the index path stalls
//! with it; nginx answers 502 in bursts when Quay's app is CPU-starved.
//!
//! Everything is deterministic given the seed and the order of requests *per class*: the k-th
//! request of a class gets the k-th latency sample, the k-th of an error rule the k-th verdict.
//! A replay that sends each class's requests again, in whatever interleaving, meets the same
//! distribution and the same number of 502s: comparing it with its recording compares the
//! replay, not the dice. Stalls are by time since the testbed's first request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A testbed's shape; the default answers at once and never fails.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Shape {
    #[serde(default)]
    pub seed: u64,
    /// The first rule whose `class` the endpoint class contains gives the latency.
    #[serde(default)]
    pub latency: Vec<Latency>,
    #[serde(default)]
    pub stall: Vec<Stall>,
    #[serde(default)]
    pub errors: Vec<ErrorBurst>,
}

/// Log-normal latency: `median-ms`, spread `sigma` (0: fixed; 1: a heavy tail, p99 ~10x median).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Latency {
    /// Text the endpoint class contains (`index_report`, `GET /v2/auth`, `/api/v1/`).
    pub class: String,
    pub median_ms: f64,
    #[serde(default)]
    pub sigma: f64,
}

/// For `for-s` seconds every `every-s`, matching requests take `adds-ms` longer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Stall {
    pub class: String,
    pub every_s: f64,
    pub for_s: f64,
    pub adds_ms: f64,
}

/// Of every `every` matching requests, the last `burst` answer `status` (502 by default) at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ErrorBurst {
    pub class: String,
    pub every: u64,
    pub burst: u64,
    #[serde(default = "bad_gateway")]
    pub status: u16,
}

fn bad_gateway() -> u16 {
    502
}

impl Shape {
    /// Quay and Clair as observed (`shared/quay-clair.md`), a stall on Clair's index path and
    /// 502 bursts on the API: what the demo and the benchmarks answer with.
    pub fn quay_clair(seed: u64) -> Shape {
        let l = |class: &str, median_ms: f64, sigma: f64| Latency {
            class: class.into(),
            median_ms,
            sigma,
        };
        Shape {
            seed,
            // First match wins: Clair's paths hold `/api/v1/` too, Quay's API classes start
            // with ` /api/v1/` after the method.
            latency: vec![
                // bcrypt on every Basic token request and OAuth API call.
                l("GET /v2/auth", 180.0, 0.15),
                l(" /api/v1/", 180.0, 0.2),
                // The slow, heavy-tailed first index; cheap reads.
                l("POST /indexer/api/v1/index_report", 60.0, 0.8),
                l("/indexer/api/v1/index_report/", 2.5, 0.3),
                l("/indexer/api/v1/index_state", 1.0, 0.2),
                l("/matcher/api/v1/vulnerability_report/", 15.0, 0.5),
                l("/manifests/", 6.0, 0.4),
                l("/blobs/uploads/", 8.0, 0.4),
                l("/blobs/", 2.0, 0.5),
                l("GET /v2/", 1.5, 0.2),
            ],
            stall: vec![Stall {
                class: "POST /indexer/api/v1/index_report".into(),
                every_s: 8.0,
                for_s: 1.0,
                adds_ms: 400.0,
            }],
            errors: vec![ErrorBurst {
                class: "PUT /api/v1/repository/".into(),
                every: 20,
                burst: 2,
                status: 502,
            }],
        }
    }

    /// The same shape with the latency of classes containing `class` multiplied by `factor` (a
    /// slower candidate: "Clair's index is 3x slower").
    pub fn slower(mut self, class: &str, factor: f64) -> Shape {
        for rule in &mut self.latency {
            if rule.class.contains(class) {
                rule.median_ms *= factor;
            }
        }
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        for l in &self.latency {
            if !(l.median_ms >= 0.0 && l.sigma >= 0.0 && l.median_ms.is_finite()) {
                return Err(format!(
                    "latency for {:?}: median-ms and sigma must be positive numbers",
                    l.class
                ));
            }
        }
        for s in &self.stall {
            if !(s.every_s > 0.0 && s.for_s >= 0.0 && s.for_s < s.every_s) {
                return Err(format!(
                    "stall for {:?}: for-s must be shorter than every-s, both positive",
                    s.class
                ));
            }
        }
        for e in &self.errors {
            if e.every == 0 || e.burst > e.every || !(100..=599).contains(&e.status) {
                return Err(format!(
                    "errors for {:?}: burst must be at most every (> 0), status an HTTP status",
                    e.class
                ));
            }
        }
        Ok(())
    }
}

/// A shape in use: per-rule counters, the clock of stalls.
pub(super) struct Shaping {
    shape: Shape,
    latency_seen: Vec<AtomicU64>,
    errors_seen: Vec<AtomicU64>,
    start: OnceLock<Instant>,
}

/// What the shape says of one request.
pub(super) struct Verdict {
    pub delay: Duration,
    /// Answer this status at once instead.
    pub fail: Option<u16>,
}

impl Shaping {
    pub fn new(shape: Shape) -> Shaping {
        Shaping {
            latency_seen: shape.latency.iter().map(|_| AtomicU64::new(0)).collect(),
            errors_seen: shape.errors.iter().map(|_| AtomicU64::new(0)).collect(),
            shape,
            start: OnceLock::new(),
        }
    }

    pub fn judge(&self, class: &str) -> Verdict {
        let start = *self.start.get_or_init(Instant::now);
        for (i, e) in self.shape.errors.iter().enumerate() {
            if class.contains(e.class.as_str()) {
                let k = self.errors_seen[i].fetch_add(1, Ordering::Relaxed);
                if k % e.every >= e.every - e.burst {
                    return Verdict {
                        delay: Duration::ZERO,
                        fail: Some(e.status),
                    };
                }
                break;
            }
        }
        let mut ms = 0.0;
        if let Some((i, l)) = self
            .shape
            .latency
            .iter()
            .enumerate()
            .find(|(_, l)| class.contains(l.class.as_str()))
        {
            let k = self.latency_seen[i].fetch_add(1, Ordering::Relaxed);
            let u = unit(self.shape.seed, i as u64, k);
            let z = crate::report::verdict::normal_quantile(u);
            ms += l.median_ms * (l.sigma * z).exp();
        }
        let elapsed = start.elapsed().as_secs_f64();
        for s in &self.shape.stall {
            if class.contains(s.class.as_str()) && elapsed % s.every_s < s.for_s {
                ms += s.adds_ms;
            }
        }
        Verdict {
            delay: Duration::from_secs_f64(ms.max(0.0) / 1000.0),
            fail: None,
        }
    }
}

/// A uniform number in (0, 1) for (seed, rule, k): splitmix64 of the three.
fn unit(seed: u64, rule: u64, k: u64) -> f64 {
    let x = super::mix(
        seed.wrapping_add(rule.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(k.wrapping_mul(0xD1B5_4A32_D192_ED03)),
    );
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_follows_its_median_and_spread_and_repeats_per_class() {
        let shape = Shape {
            seed: 3,
            latency: vec![Latency {
                class: "index_report".into(),
                median_ms: 50.0,
                sigma: 0.8,
            }],
            ..Shape::default()
        };
        let sample = |s: &Shaping| -> Vec<f64> {
            (0..2000)
                .map(|_| {
                    s.judge("POST /indexer/api/v1/index_report")
                        .delay
                        .as_secs_f64()
                        * 1e3
                })
                .collect()
        };
        let (a, b) = (Shaping::new(shape.clone()), Shaping::new(shape));
        let mut xs = sample(&a);
        // The same seed, the same sequence: a replay meets the recording's distribution.
        assert_eq!(xs, sample(&b));
        xs.sort_by(f64::total_cmp);
        let median = xs[1000];
        assert!((40.0..60.0).contains(&median), "{median}");
        // Heavy tail: p99 ~ median * e^(0.8 * 2.33) ~ 6.4x.
        let p99 = xs[1980];
        assert!(p99 > 4.0 * median, "{p99} vs {median}");
        // Other classes are not delayed.
        assert_eq!(a.judge("GET /v2/").delay, Duration::ZERO);
    }

    #[test]
    fn error_bursts_come_in_runs_of_their_size() {
        let s = Shaping::new(Shape {
            errors: vec![ErrorBurst {
                class: "/api/v1/".into(),
                every: 10,
                burst: 3,
                status: 502,
            }],
            ..Shape::default()
        });
        let failed: Vec<bool> = (0..30)
            .map(|_| s.judge("PUT /api/v1/repository/x").fail.is_some())
            .collect();
        assert_eq!(failed.iter().filter(|f| **f).count(), 9);
        assert!(failed[7] && failed[8] && failed[9] && !failed[6] && !failed[10]);
        assert!(Shape::quay_clair(1).validate().is_ok());
        // Clair's classes are not Quay's API, though both paths hold `/api/v1/`.
        let quay = Shaping::new(Shape::quay_clair(1));
        let index = quay.judge("POST /indexer/api/v1/index_report").delay;
        assert!(index < Duration::from_millis(150) || index > Duration::from_millis(400));
        let median = |class: &str| {
            let s = Shaping::new(Shape::quay_clair(1));
            let mut v: Vec<Duration> = (0..101).map(|_| s.judge(class).delay).collect();
            v.sort();
            v[50].as_secs_f64() * 1e3
        };
        assert!((1.5..4.0).contains(&median("GET /indexer/api/v1/index_report/{digest}")));
        assert!((150.0..220.0).contains(&median("GET /api/v1/user/")));
        let slower = Shape::quay_clair(1).slower("POST /indexer/api/v1/index_report", 3.0);
        assert_eq!(
            slower
                .latency
                .iter()
                .find(|l| l.class == "POST /indexer/api/v1/index_report")
                .unwrap()
                .median_ms,
            180.0
        );
    }
}
