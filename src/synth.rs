//! Synthetic traffic, scaled up from real exchanges.
//!
//! Benchmarks and tests need millions of exchanges that look like production: real paths,
//! real header sets, real status mixes, but fresh digests, upload ids and timings, so that
//! nothing compresses better than real traffic would. [`Synth`] takes template exchanges
//! (from the shipped Quay/Clair captures, say) and stamps out variations of them,
//! deterministically from a seed.

use crate::har::{har_to_records, ImportOptions, BUILTIN_SESSIONS};
use crate::redact::Redactor;
use crate::tape::codec::digest_in_text;
use crate::tape::{Body, Exchange, HeaderValue, Headers, Nanos, Record, Stored, Timing};

/// The exchanges of the built-in Quay and Clair session, as templates.
pub fn builtin_templates() -> Vec<Exchange> {
    let redactor = Redactor::default();
    BUILTIN_SESSIONS
        .iter()
        .flat_map(|(name, bytes)| {
            har_to_records(bytes, name, &redactor, &ImportOptions::default())
                .expect("the built-in session imports")
                .records
        })
        .filter_map(|r| match r {
            Record::Exchange(e) => Some(*e),
            _ => None,
        })
        .collect()
}

/// Stamps out exchanges from templates. See the module docs.
pub struct Synth {
    templates: Vec<Exchange>,
    /// Cumulative weights, parallel to `templates`.
    weights: Vec<u64>,
    rng: u64,
    next_id: u64,
    now: Nanos,
    mean_gap_ns: u64,
    keep_bodies: bool,
    /// Cumulative Zipf weights of the blob catalogue; empty: every request names a new digest.
    catalogue: Vec<f64>,
    catalogue_seed: u64,
}

impl Synth {
    /// `rate` exchanges per second on average; bodies are kept only with `keep_bodies`
    /// (otherwise they are metadata: length and digest).
    pub fn new(templates: Vec<Exchange>, rate: f64, seed: u64, keep_bodies: bool) -> Synth {
        assert!(
            !templates.is_empty(),
            "Synth needs at least one template exchange"
        );
        let mut total = 0;
        let weights = templates
            .iter()
            .map(|e| {
                // Pulls dominate a registry's traffic.
                let path = e.request.path();
                total += if path.contains("/blobs/") && !path.contains("/uploads") {
                    12
                } else if path.contains("/manifests/") {
                    8
                } else {
                    1
                };
                total
            })
            .collect();
        Synth {
            templates,
            weights,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            next_id: 1,
            now: 0,
            mean_gap_ns: (1e9 / rate.max(1e-3)) as u64,
            keep_bodies,
            catalogue: Vec::new(),
            catalogue_seed: seed,
        }
    }

    /// Draws digests from a catalogue of `blobs` distinct blobs with Zipf popularity (s = 1),
    /// as pulls do: the layers of popular images are fetched again and again. Without it every
    /// request names a digest never seen before (the worst case for compression).
    pub fn with_catalogue(mut self, blobs: usize) -> Synth {
        let mut total = 0.0;
        self.catalogue = (1..=blobs.max(1))
            .map(|k| {
                total += 1.0 / k as f64;
                total
            })
            .collect();
        self
    }

    fn rand(&mut self) -> u64 {
        // splitmix64: fast, and plenty for shaping traffic.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn hex_digest(&mut self) -> String {
        let words: [u64; 4] = match self.catalogue.last() {
            None => [self.rand(), self.rand(), self.rand(), self.rand()],
            Some(&total) => {
                let u = (self.rand() >> 11) as f64 / (1u64 << 53) as f64 * total;
                let k = self.catalogue.partition_point(|&c| c < u) as u64;
                let mut state = self.catalogue_seed ^ k.wrapping_mul(0x2545_F491_4F6C_DD1D);
                std::array::from_fn(|_| {
                    state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^ (z >> 31)
                })
            }
        };
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for w in words {
            s.push_str(&format!("{w:016x}"));
        }
        s
    }

    /// The next exchange.
    pub fn next_exchange(&mut self) -> Exchange {
        let pick = self.rand() % self.weights.last().expect("templates are not empty");
        let i = self.weights.partition_point(|&w| w <= pick);
        let mut e = self.templates[i].clone();
        // Exponential gaps: a Poisson arrival process at the configured rate.
        let u = (self.rand() >> 11) as f64 / (1u64 << 53) as f64;
        self.now += (-(1.0 - u).ln() * self.mean_gap_ns as f64) as u64;
        e.id = self.next_id;
        e.connection = self.next_id;
        self.next_id += 1;
        let jitter = |v: u64, r: u64| v / 2 + r % (v.max(1));
        let r = self.rand();
        e.timing = Timing {
            start: self.now,
            request_done: jitter(e.timing.request_done, r),
            response_head: e.timing.response_head.map(|h| jitter(h, r >> 8)),
            response_done: jitter(e.timing.response_done, r >> 16),
        };
        // Fresh ids everywhere the template had some.
        let digest = self.hex_digest();
        let uuid = format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            self.rand() as u32,
            self.rand() as u16,
            self.rand() as u16 & 0xfff,
            self.rand() as u16 & 0xfff,
            self.rand() & 0xffff_ffff_ffff
        );
        e.request.target = replace_ids(&e.request.target, &digest, &uuid);
        e.request.headers = rewrite_headers(&e.request.headers, &digest, &uuid);
        // Registries are content-addressed: a body's sha256 is the digest its request names
        // (a blob GET, an upload's `?digest=`) or that the response declares.
        let named = digest_in_text(&e.request.target);
        let request_digest = match named {
            Some(d) if e.request.target.contains("digest=") => d,
            _ => self.random_digest(),
        };
        self.refresh_body(&mut e.request.body, request_digest);
        if let Ok(resp) = e.response.as_mut() {
            resp.headers = rewrite_headers(&resp.headers, &digest, &uuid);
            let declared = resp
                .headers
                .get_str("docker-content-digest")
                .and_then(digest_in_text);
            let response_digest = match declared.or(named) {
                Some(d) => d,
                None => self.random_digest(),
            };
            self.refresh_body(&mut resp.body, response_digest);
        }
        e
    }

    fn random_digest(&mut self) -> [u8; 32] {
        let mut d = [0u8; 32];
        for chunk in d.chunks_mut(8) {
            chunk.copy_from_slice(&self.rand().to_le_bytes());
        }
        d
    }

    fn refresh_body(&self, body: &mut Body, digest: [u8; 32]) {
        if body.len == 0 {
            return;
        }
        body.sha256 = Some(digest);
        if !self.keep_bodies {
            body.stored = Stored::None;
        }
    }
}

impl Iterator for Synth {
    type Item = Exchange;

    fn next(&mut self) -> Option<Exchange> {
        Some(self.next_exchange())
    }
}

/// Replaces every `sha256:<64 hex>` by `digest` and every UUID by `uuid`.
fn replace_ids(text: &str, digest: &str, uuid: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if rest.len() >= 71
            && rest.starts_with("sha256:")
            && rest.as_bytes()[7..71].iter().all(u8::is_ascii_hexdigit)
        {
            out.push_str(digest);
            rest = &rest[71..];
        } else if rest.get(..36).is_some_and(crate::endpoint::is_uuid) {
            out.push_str(uuid);
            rest = &rest[36..];
        } else {
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn rewrite_headers(headers: &Headers, digest: &str, uuid: &str) -> Headers {
    let mut out = Headers::new();
    for (name, value) in headers.iter() {
        match value {
            HeaderValue::Plain(v) => match std::str::from_utf8(v) {
                Ok(text) => out.push(name, replace_ids(text, digest, uuid)),
                Err(_) => out.push(name, v),
            },
            HeaderValue::Redacted(r) => out.push_redacted(name, r.clone()),
        }
    }
    out
}
