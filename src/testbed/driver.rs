//! The traffic driver: production-shaped Quay and Clair load from a small TOML traffic model.
//!
//! `loadtape demo` records traffic and replays it, so it needs traffic that looks like a
//! registry's day rather than a benchmark loop: many pulls, few pushes, Quay API v1 calls from
//! the UI and automation, and Quay's calls to Clair. Real clients arrive as *sessions* (one
//! connection, a few requests with think times between them) in an open model, with bursts and
//! a daily swell, and they are stateful: a push follows the upload `Location`s the registry
//! hands out, a pull reads what was pushed, Clair fetches the layers it indexes. A tape of that
//! is what stateful replay has to cope with, so the driver makes it.
//!
//! One seed gives the same story every run: all randomness comes from a splitmix64 generator
//! split into named streams (arrival instants, session kinds, one stream per session), never
//! from the clock or the OS, so the same sessions start at the same offsets and make the same
//! choices and the same layer bytes. What still depends on timing is which images exist when a
//! session chooses one (an image is pullable once its manifest is in), and latencies.
//!
//! `drive` first pushes the seed images one after another (later sessions need them), then
//! starts sessions at absolute instants from the arrival schedule, each a task with its own
//! HTTP/1.1 connection, kept alive within the session and closed at its end, as skopeo does.
//! Sessions hand one small `Event` per request to the driver through a bounded channel; only
//! the driver tallies them into `Driven`.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::mix;
use crate::percent::encode;
use crate::replay::auth::{challenge_params, sign_jwt};
use crate::replay::state::location_path;

/// What traffic to make. Every field has a default, so a model file names only what it changes
/// (`sessions-per-second = 50`, `[mix]`, `[burst]`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TrafficModel {
    /// Mean session arrivals per second (Poisson, open model), before shaping.
    pub sessions_per_second: f64,
    /// Shares of session kinds (normalised).
    pub mix: Mix,
    /// Mean think time between a session's requests, ms (exponential).
    pub think_ms: f64,
    /// Amplitude (0..1) of a sinusoidal rate over the run: one "day" per run.
    pub diurnal: f64,
    /// Bursts: every `every-s` seconds, for `for-s` seconds, the rate is multiplied by `factor`
    /// (`factor = 1` turns them off).
    pub burst: Option<Burst>,
    /// Images pushed at the start: what later pulls, API calls and Clair sessions read.
    pub images: usize,
    /// Layers per pushed image.
    pub layers: usize,
    /// Layer sizes in KiB, `[min, max]`, uniform.
    pub layer_kib: (u32, u32),
    /// The namespace (Quay organisation) repositories live in.
    pub namespace: String,
}

impl Default for TrafficModel {
    fn default() -> TrafficModel {
        TrafficModel {
            sessions_per_second: 20.0,
            mix: Mix::default(),
            think_ms: 15.0,
            diurnal: 0.3,
            burst: Some(Burst::default()),
            images: 4,
            layers: 3,
            layer_kib: (2, 48),
            namespace: "demo".to_string(),
        }
    }
}

/// Shares of session kinds; only their ratios matter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mix {
    pub pull: f64,
    pub push: f64,
    pub api: f64,
    pub clair: f64,
}

impl Default for Mix {
    fn default() -> Mix {
        Mix {
            pull: 0.70,
            push: 0.05,
            api: 0.15,
            clair: 0.10,
        }
    }
}

impl Mix {
    fn shares(&self) -> [(Kind, f64); 4] {
        let Mix {
            pull,
            push,
            api,
            clair,
        } = *self;
        [
            (Kind::Pull, pull),
            (Kind::Push, push),
            (Kind::Api, api),
            (Kind::Clair, clair),
        ]
    }
}

/// A recurring burst of arrivals (a CI fleet waking up, a deployment rolling out).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Burst {
    pub every_s: f64,
    pub for_s: f64,
    pub factor: f64,
}

impl Default for Burst {
    fn default() -> Burst {
        Burst {
            every_s: 7.0,
            for_s: 1.0,
            factor: 3.0,
        }
    }
}

impl Burst {
    /// Bursts start at `every_s`, `2 * every_s`, ...: a run starts calm.
    fn on_at(&self, t: f64) -> bool {
        t >= self.every_s && t % self.every_s < self.for_s
    }
}

impl TrafficModel {
    /// A model from TOML; the error names the key or value that is wrong.
    pub fn from_toml(text: &str) -> Result<TrafficModel, String> {
        let model: TrafficModel =
            toml::from_str(text).map_err(|e| format!("traffic model: {}", e.to_string().trim()))?;
        model.check().map_err(|e| format!("traffic model: {e}"))?;
        Ok(model)
    }

    /// What `from_toml` and `drive` refuse, said as the TOML key.
    fn check(&self) -> Result<(), String> {
        let burst = self.burst.clone().unwrap_or_default();
        let mut numbers = vec![
            (
                "sessions-per-second".to_string(),
                self.sessions_per_second,
                0.0,
                f64::MAX,
            ),
            ("think-ms".into(), self.think_ms, 0.0, f64::MAX),
            ("diurnal".into(), self.diurnal, 0.0, 1.0),
            (
                "burst.every-s".into(),
                burst.every_s,
                f64::MIN_POSITIVE,
                f64::MAX,
            ),
            ("burst.for-s".into(), burst.for_s, 0.0, f64::MAX),
            ("burst.factor".into(), burst.factor, 0.0, f64::MAX),
        ];
        for (kind, share) in self.mix.shares() {
            numbers.push((format!("mix.{}", kind.name()), share, 0.0, f64::MAX));
        }
        for (name, value, min, max) in numbers {
            if !(min..=max).contains(&value) {
                let range = match max {
                    f64::MAX if min > 0.0 => "a number above 0".to_string(),
                    f64::MAX => "a number of at least 0".to_string(),
                    max => format!("between {min} and {max}"),
                };
                return Err(format!("{name} must be {range}, not {value}"));
            }
        }
        if self.mix.shares().iter().all(|(_, share)| *share == 0.0) {
            return Err("mix: at least one share must be above 0".into());
        }
        if self.images == 0 || self.layers == 0 {
            return Err("images and layers must be at least 1: pulls need something".into());
        }
        let (min, max) = self.layer_kib;
        if min == 0 || min > max {
            return Err(format!(
                "layer-kib must be [min, max] KiB, 0 < min <= max, not [{min}, {max}]"
            ));
        }
        let quay = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        if self.namespace.is_empty() || !self.namespace.chars().all(quay) {
            let namespace = &self.namespace;
            return Err(format!(
                "namespace must be a Quay organisation name (a-z, 0-9, . _ -), not {namespace:?}"
            ));
        }
        Ok(())
    }

    /// Session arrivals per second `t` seconds into a run of `length` seconds.
    fn rate(&self, t: f64, length: f64) -> f64 {
        let day = self.diurnal * (2.0 * PI * t / length).sin();
        let burst = match &self.burst {
            Some(burst) if burst.on_at(t) => burst.factor,
            _ => 1.0,
        };
        self.sessions_per_second * (1.0 + day) * burst
    }
}

/// Who the driver is to the registry, Quay's API and Clair.
#[derive(Clone)]
pub struct Credentials {
    /// Registry account: Basic credentials on `/v2/auth`.
    pub user: String,
    pub password: String,
    /// Quay API v1 OAuth bearer token.
    pub api_token: String,
    /// Clair's pre-shared key and the issuer Quay signs its HS256 JWTs as.
    pub clair_psk: Vec<u8>,
    pub clair_issuer: String,
}

impl Credentials {
    /// What a [`super::Config::standard`] testbed accepts.
    pub fn standard() -> Credentials {
        Credentials {
            user: super::USER.into(),
            password: super::PASSWORD.into(),
            api_token: super::API_TOKEN.into(),
            clair_psk: super::PSK.to_vec(),
            clair_issuer: "quay".into(),
        }
    }
}

/// Where to send traffic, for how long, shaped by which model, as whom.
#[derive(Clone)]
pub struct DriveOptions {
    /// Where requests go: the recording proxy, or the testbed itself.
    pub target: SocketAddr,
    /// The Host header sent (the testbed's public name: token realms come back with it).
    pub host: String,
    /// Base URL Clair fetches layers from, `{storage}{digest}`, e.g.
    /// `http://127.0.0.1:PORT/_storage/`: Quay hands Clair presigned storage URLs, not
    /// registry paths.
    pub storage: String,
    /// Session arrivals stop this long after the seed images are pushed; running sessions
    /// finish.
    pub duration: Duration,
    pub seed: u64,
    pub model: TrafficModel,
    pub credentials: Credentials,
}

/// What a drive did.
#[derive(Debug, Default)]
pub struct Driven {
    /// Sessions by kind: "pull", "push" (seed images included), "api", "clair".
    pub sessions: BTreeMap<&'static str, u64>,
    /// Requests sent, answered or not.
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Answers a session did not expect ("STATUS METHOD PATH", and why when the status was
    /// right but the answer was not), at most `UNEXPECTED_KEPT`. 502s, which the testbed gives
    /// under configured faults as Quay's nginx does, end a session but are not unexpected.
    pub unexpected: Vec<String>,
    /// Requests that got no response (connection errors, timeouts).
    pub failed: u64,
}

impl Driven {
    /// `2284 requests in 342 sessions (49 api, 38 clair, 240 pull, 15 push)`.
    pub fn describe(&self) -> String {
        format!(
            "{} requests in {} sessions ({})",
            self.requests,
            self.sessions.values().sum::<u64>(),
            self.sessions
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

const UNEXPECTED_KEPT: usize = 50;
/// Events in flight from sessions to the tally; a full queue holds sessions back briefly.
const EVENT_QUEUE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Generous: a stalled Clair index still answers within it, so only a hung target fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a session takes its optional steps.
const HEAD_MANIFEST_FIRST: f64 = 0.10;
const REUSED_LAYER: f64 = 0.20;
const PERMISSION_CHANGE: f64 = 0.20;
const STATE_REVALIDATED: f64 = 0.50;
const REPORT_REVALIDATED: f64 = 0.30;
/// Share of Clair sessions that start by asking Clair to index a known manifest again, as
/// Quay's security worker does when it rescans: Clair answers from its index then.
const REINDEXED: f64 = 0.60;
/// Popularity skew: image rank r is chosen with weight 1 / (r + 1)^s.
const ZIPF_EXPONENT: f64 = 1.2;

const REGISTRY_AGENT: &str = "containers/5.32.2 (github.com/containers/image)";
const API_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 quay-ui/3.12";
const CLAIR_AGENT: &str = "Quay/3.12.0";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// What skopeo accepts for a manifest.
const MANIFEST_ACCEPT: &str = concat!(
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, ",
    "application/vnd.docker.distribution.manifest.v2+json, ",
    "application/vnd.docker.distribution.manifest.list.v2+json",
);

/// Names of the random streams a seed is split into: a new draw in one never shifts another.
const ARRIVALS: u64 = 1;
const KINDS: u64 = 2;
const SEED_IMAGES: u64 = 3;
const SESSIONS: u64 = 4;

/// The session kinds a seed and model start, in order, for the first `n` arrivals. `drive`
/// draws from the same stream, so this is what it runs.
pub fn plan_sessions(model: &TrafficModel, seed: u64, n: usize) -> Vec<&'static str> {
    Kinds::new(model, seed).take(n).map(Kind::name).collect()
}

/// Drives traffic at `options.target` and tallies what came back; `progress`, if given, counts
/// requests done. Errors only on options that cannot make a request (an invalid model, a host
/// or credential that is no header value); what the target answers is in `Driven`. Call
/// inside a tokio runtime.
pub async fn drive(options: DriveOptions, progress: Option<&AtomicU64>) -> std::io::Result<Driven> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    options
        .model
        .check()
        .map_err(|e| invalid(format!("traffic model: {e}")))?;
    let value = |what: &str, text: String| {
        HeaderValue::from_str(&text)
            .map_err(|_| invalid(format!("{what} is not a valid header value")))
    };
    let credentials = &options.credentials;
    let basic = format!("{}:{}", credentials.user, credentials.password);
    let basic = base64::engine::general_purpose::STANDARD.encode(basic);
    let shared = Arc::new(Shared {
        host: value("host", options.host.clone())?,
        basic: value("the registry account", format!("Basic {basic}"))?,
        api: value("the API token", format!("Bearer {}", credentials.api_token))?,
        catalog: Mutex::default(),
        options,
    });
    let (seed, model) = (shared.options.seed, shared.options.model.clone());
    let (events, mut received) = mpsc::channel(EVENT_QUEUE);
    let mut tally = Tally {
        driven: Driven::default(),
        progress,
    };

    // The seed images, one after another: pushing them in order keeps the layers they reuse
    // from each other the same every run.
    for i in 0..model.images {
        let rng = Rng::stream(seed, SEED_IMAGES, i as u64);
        let mut session = Session::new(shared.clone(), events.clone(), rng);
        let repository = format!("{}/app{i}", model.namespace);
        tally.started(Kind::Push);
        let push = session.push(repository, "v1".into());
        let _ = until(push, &mut received, &mut tally).await;
    }

    let start = tokio::time::Instant::now();
    let arrivals = Arrivals::new(&model, seed, shared.options.duration.as_secs_f64());
    let mut sessions = JoinSet::new();
    for (index, (at, kind)) in arrivals.zip(Kinds::new(&model, seed)).enumerate() {
        let due = tokio::time::sleep_until(start + Duration::from_secs_f64(at));
        until(due, &mut received, &mut tally).await;
        tally.started(kind);
        let rng = Rng::stream(seed, SESSIONS, index as u64);
        let session = Session::new(shared.clone(), events.clone(), rng);
        sessions.spawn(session.run(kind, index));
        while sessions.try_join_next().is_some() {}
    }
    // Every session holds a sender: the queue ends when the last one does.
    drop(events);
    while let Some(event) = received.recv().await {
        tally.add(event);
    }
    while sessions.join_next().await.is_some() {}
    Ok(tally.driven)
}

/// Runs `work` while tallying events, so that sessions never wait on a full queue for long.
async fn until<F: Future>(
    work: F,
    events: &mut mpsc::Receiver<Event>,
    tally: &mut Tally<'_>,
) -> F::Output {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            Some(event) = events.recv() => tally.add(event),
        }
    }
}

/// One request's outcome, from a session to the driver.
enum Event {
    Answered(u16),
    Failed,
    Unexpected(String),
}

struct Tally<'a> {
    driven: Driven,
    progress: Option<&'a AtomicU64>,
}

impl Tally<'_> {
    fn started(&mut self, kind: Kind) {
        *self.driven.sessions.entry(kind.name()).or_default() += 1;
    }

    fn add(&mut self, event: Event) {
        let driven = &mut self.driven;
        match event {
            Event::Answered(status) => *driven.statuses.entry(status).or_default() += 1,
            Event::Failed => driven.failed += 1,
            Event::Unexpected(what) => {
                if driven.unexpected.len() < UNEXPECTED_KEPT {
                    driven.unexpected.push(what);
                }
                return;
            }
        }
        driven.requests += 1;
        if let Some(progress) = self.progress {
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// splitmix64: tiny, fast and plenty for traffic choices.
struct Rng(u64);

impl Rng {
    /// Stream `name`, item `index`, of `seed`.
    fn stream(seed: u64, name: u64, index: u64) -> Rng {
        Rng(mix(mix(seed ^ mix(name)) ^ index))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in 0..n (n > 0); the modulo bias is far below anything a traffic mix shows.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// A rank in 0..n (n > 0), rank 0 the most popular.
    fn zipf(&mut self, n: usize) -> usize {
        let weight = |rank: usize| (rank as f64 + 1.0).powf(-ZIPF_EXPONENT);
        let mut left = self.unit() * (0..n).map(weight).sum::<f64>();
        for rank in 0..n {
            left -= weight(rank);
            if left < 0.0 {
                return rank;
            }
        }
        n - 1
    }
}

/// splitmix64's finaliser.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pull,
    Push,
    Api,
    Clair,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pull => "pull",
            Kind::Push => "push",
            Kind::Api => "api",
            Kind::Clair => "clair",
        }
    }
}

/// Session kinds drawn by the mix's shares.
struct Kinds {
    rng: Rng,
    shares: [(Kind, f64); 4],
}

impl Kinds {
    fn new(model: &TrafficModel, seed: u64) -> Kinds {
        let shares = model
            .mix
            .shares()
            .map(|(kind, share)| (kind, share.max(0.0)));
        let rng = Rng::stream(seed, KINDS, 0);
        Kinds { rng, shares }
    }
}

impl Iterator for Kinds {
    type Item = Kind;

    fn next(&mut self) -> Option<Kind> {
        let total: f64 = self.shares.iter().map(|(_, share)| share).sum();
        let mut left = self.rng.unit() * total;
        for (kind, share) in self.shares {
            if left < share {
                return Some(kind);
            }
            left -= share;
        }
        // Rounding at the top end: the last kind with a share.
        let last = self.shares.iter().rev().find(|(_, share)| *share > 0.0);
        Some(last.map_or(Kind::Pull, |(kind, _)| *kind))
    }
}

/// Arrival instants, in seconds from the start, of a Poisson process whose rate follows the
/// model: candidates at the peak rate, each kept with probability rate(t) / peak (thinning).
/// Instants are absolute, so a session that starts late never shifts the ones after it.
struct Arrivals<'a> {
    model: &'a TrafficModel,
    rng: Rng,
    length: f64,
    peak: f64,
    at: f64,
}

impl Arrivals<'_> {
    fn new(model: &TrafficModel, seed: u64, length: f64) -> Arrivals<'_> {
        let burst = model.burst.as_ref().map_or(1.0, |b| b.factor.max(1.0));
        let peak = model.sessions_per_second * (1.0 + model.diurnal) * burst;
        Arrivals {
            model,
            rng: Rng::stream(seed, ARRIVALS, 0),
            length,
            peak,
            at: 0.0,
        }
    }
}

impl Iterator for Arrivals<'_> {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        if self.peak <= 0.0 {
            return None;
        }
        loop {
            self.at += self.rng.exponential(1.0 / self.peak);
            if self.at >= self.length {
                return None;
            }
            if self.rng.unit() * self.peak < self.model.rate(self.at, self.length) {
                return Some(self.at);
            }
        }
    }
}

/// A blob by digest and size, as a manifest references it.
#[derive(Clone)]
struct Blob {
    digest: String,
    size: usize,
}

impl Blob {
    fn of(bytes: &[u8]) -> Blob {
        Blob {
            digest: super::sha256(bytes),
            size: bytes.len(),
        }
    }
}

/// An image the registry holds.
struct Image {
    repository: String,
    tag: String,
    /// The manifest's digest.
    manifest: String,
    layers: Vec<Blob>,
}

/// What sessions learn from each other, as clients of one registry would: the images pushed
/// (pullable once their manifest is in), the manifests Clair indexed, and the index state Quay
/// saw last. Locked for a few operations at a time, never across an await.
#[derive(Default)]
struct Catalog {
    images: Vec<Arc<Image>>,
    indexed: Vec<String>,
    index_state: Option<HeaderValue>,
}

/// What every session shares.
struct Shared {
    options: DriveOptions,
    /// Header values made once from the options.
    host: HeaderValue,
    basic: HeaderValue,
    api: HeaderValue,
    catalog: Mutex<Catalog>,
}

impl Shared {
    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        super::lock(&self.catalog)
    }

    fn jwt(&self) -> HeaderValue {
        let credentials = &self.options.credentials;
        sign_jwt(&credentials.clair_psk, &credentials.clair_issuer)
    }
}

/// How a client authenticates its requests: not at all yet, with a fixed header (a registry
/// token once it has one, the API's OAuth token), or with a fresh Clair JWT each time, as Quay
/// signs its calls to Clair.
enum Credential {
    None,
    Fixed(HeaderValue),
    Jwt,
}

/// One client and its connection, opened on first use and again if the server closed it
/// between requests (as Go's transport, which skopeo uses, does); closed when dropped.
struct Client {
    agent: &'static str,
    credential: Credential,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    fn new(agent: &'static str, credential: Credential) -> Client {
        Client {
            agent,
            credential,
            sender: None,
        }
    }

    async fn send(&mut self, target: SocketAddr, request: Request) -> Result<Answer, String> {
        let exchange = async {
            let sender = match self.sender.take() {
                Some(sender) if !sender.is_closed() => sender,
                _ => connect(target).await?,
            };
            let sender = self.sender.insert(sender);
            sender.ready().await.map_err(|e| e.to_string())?;
            let response = sender.send_request(request).await;
            let (parts, body) = response.map_err(|e| e.to_string())?.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            let (status, headers) = (parts.status.as_u16(), parts.headers);
            Ok(Answer {
                status,
                headers,
                body,
                request: String::new(),
            })
        };
        let late = || format!("no answer within {REQUEST_TIMEOUT:?}");
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(late()))
    }
}

type Request = http::Request<Full<Bytes>>;

async fn connect(target: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let connecting = tokio::net::TcpStream::connect(target);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await;
    let stream = stream.map_err(|_| format!("connecting to {target} timed out"))?;
    let stream = stream.map_err(|e| format!("connecting to {target}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let handshake = http1::handshake(TokioIo::new(stream)).await;
    let (sender, connection) = handshake.map_err(|e| e.to_string())?;
    // Ends when the client drops its sender.
    tokio::spawn(connection);
    Ok(sender)
}

/// A request a session is about to send: method, origin-form target, headers, body.
struct Call {
    method: Method,
    target: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Call {
    fn new(method: Method, target: impl Into<String>) -> Call {
        let (target, headers, body) = (target.into(), Vec::new(), Bytes::new());
        Call {
            method,
            target,
            headers,
            body,
        }
    }

    fn get(target: impl Into<String>) -> Call {
        Call::new(Method::GET, target)
    }

    fn with(mut self, name: HeaderName, value: HeaderValue) -> Call {
        self.headers.push((name, value));
        self
    }

    fn body(self, content_type: &'static str, body: impl Into<Bytes>) -> Call {
        let mut call = self.with(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        call.body = body.into();
        call
    }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
    /// "METHOD path", for messages.
    request: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// A session stopped early; what stopped it is already recorded.
struct Ended;

mod sessions;

use sessions::Session;

/// Pseudo-random bytes of a seeded size in `kib`: incompressible, as gzipped layers are.
fn layer_bytes(rng: &mut Rng, (min, max): (u32, u32)) -> Bytes {
    let (min, max) = (min as usize * 1024, max as usize * 1024);
    let mut bytes = vec![0u8; min + rng.below(max - min + 1)];
    for chunk in bytes.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    Bytes::from(bytes)
}

/// An OCI image config for `layers` (their digests stand in for the uncompressed diff ids),
/// created at a seeded instant in 2024 so that the same seed makes the same digest.
fn image_config(rng: &mut Rng, repository: &str, layers: &[Blob]) -> Bytes {
    let created = 1_704_067_200 + rng.below(366 * 86_400) as i64;
    let created = chrono::DateTime::from_timestamp(created, 0).unwrap_or_default();
    let created = created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let app = repository.rsplit('/').next().unwrap_or(repository);
    let diff_ids: Vec<&str> = layers.iter().map(|b| b.digest.as_str()).collect();
    let path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    let config = json!({"architecture": "amd64", "os": "linux", "created": created,
        "config": {"Env": [path], "Entrypoint": [format!("/usr/local/bin/{app}")]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    Bytes::from(config.to_string())
}

/// The OCI image manifest of `config` and `layers`.
fn image_manifest(config: &Blob, layers: &[Blob]) -> Bytes {
    fn descriptor(media_type: &str, blob: &Blob) -> Value {
        json!({"mediaType": media_type, "digest": blob.digest, "size": blob.size})
    }
    let layers: Vec<Value> = layers.iter().map(|b| descriptor(OCI_LAYER, b)).collect();
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config), "layers": layers});
    Bytes::from(manifest.to_string())
}

/// The path and query of a URL (absolute or already relative): requests go to the target,
/// whatever host a realm or Location names.
fn origin_form(url: &str) -> String {
    location_path(url).unwrap_or_else(|| url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_follow_the_rate_and_stop_at_the_run_length() {
        let model = TrafficModel {
            diurnal: 0.0,
            burst: None,
            ..TrafficModel::default()
        };
        let arrivals: Vec<f64> = Arrivals::new(&model, 1, 100.0).collect();
        assert!((1800..2200).contains(&arrivals.len()), "{}", arrivals.len());
        assert!(arrivals.windows(2).all(|w| w[0] <= w[1]) && arrivals.iter().all(|&t| t < 100.0));
        let bursty = TrafficModel {
            diurnal: 0.0,
            ..TrafficModel::default()
        };
        let arrivals: Vec<f64> = Arrivals::new(&bursty, 1, 70.0).collect();
        let (burst, calm) = arrivals
            .iter()
            .partition::<Vec<f64>, _>(|&&t| Burst::default().on_at(t));
        // 9 burst seconds at x3 against 61 calm ones.
        let ratio = burst.len() as f64 / 9.0 / (calm.len() as f64 / 61.0);
        assert!((2.3..3.7).contains(&ratio), "{ratio}");
    }

    #[test]
    fn challenge_parameters_and_locations_are_read_as_clients_read_them() {
        let challenge =
            r#"realm="http://q:8080/v2/auth",service="q:8080",scope="repository:a/b:pull,push""#;
        let params = challenge_params(challenge);
        assert_eq!(params[0], ("realm".into(), "http://q:8080/v2/auth".into()));
        assert_eq!(params[2].1, "repository:a/b:pull,push");
        assert_eq!(
            origin_form("http://q:8080/v2/a/blobs/uploads/u?_state=s"),
            "/v2/a/blobs/uploads/u?_state=s"
        );
        assert_eq!(
            origin_form("/v2/a/blobs/uploads/u"),
            "/v2/a/blobs/uploads/u"
        );
    }

    #[test]
    fn zipf_favours_the_first_ranks() {
        let mut rng = Rng::stream(3, SESSIONS, 0);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[rng.zipf(10)] += 1;
        }
        assert!(
            counts[0] > 3 * counts[4] && counts[4] > counts[9],
            "{counts:?}"
        );
    }
}
