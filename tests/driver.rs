//! The traffic driver makes production-shaped Quay and Clair traffic against the testbed: every
//! session kind, only answers a client expects, and the same plan for the same seed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use loadtape::testbed::driver::{drive, plan_sessions, Credentials, DriveOptions, TrafficModel};
use loadtape::testbed::{Config, Testbed};

const USER: &str = "alice";
const PASSWORD: &str = "secret";
const API_TOKEN: &str = "api-token";
const PSK: &[u8] = b"clair-pre-shared-key";

/// Quay's way: token-mode registry, an account, an API token, a Clair that checks its JWTs.
async fn testbed() -> Testbed {
    Testbed::start(Config {
        accounts: vec![(USER.into(), PASSWORD.into())],
        api_tokens: vec![API_TOKEN.into()],
        clair_psk: Some(PSK.to_vec()),
        clair_issuers: vec!["quay".into()],
        ..Config::default()
    })
    .await
    .unwrap()
}

fn options(testbed: &Testbed, model: TrafficModel, seconds: f64, seed: u64) -> DriveOptions {
    DriveOptions {
        target: testbed.addr,
        host: testbed.addr.to_string(),
        storage: format!("http://{}/_storage/", testbed.addr),
        duration: Duration::from_secs_f64(seconds),
        seed,
        model,
        credentials: Credentials {
            user: USER.into(),
            password: PASSWORD.into(),
            api_token: API_TOKEN.into(),
            clair_psk: PSK.to_vec(),
            clair_issuer: "quay".into(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_seconds_of_traffic_run_every_session_kind_with_only_expected_answers() {
    let testbed = testbed().await;
    let model = TrafficModel {
        sessions_per_second: 15.0,
        ..TrafficModel::default()
    };
    let progress = AtomicU64::new(0);
    let options = options(&testbed, model.clone(), 3.0, 7);
    let driven = drive(options, Some(&progress)).await.unwrap();

    for kind in ["pull", "push", "api", "clair"] {
        assert!(driven.sessions.get(kind) > Some(&0), "{kind}: {driven:?}");
    }
    assert!(driven.unexpected.is_empty(), "{:#?}", driven.unexpected);
    assert_eq!(driven.failed, 0, "{driven:?}");
    assert_eq!(progress.load(Ordering::Relaxed), driven.requests);
    assert_eq!(driven.statuses.values().sum::<u64>(), driven.requests);
    // About 45 arrivals after the four seed pushes, several requests each; the arrivals are
    // the sessions `plan_sessions` names for the seed.
    let arrivals = driven.sessions.values().sum::<u64>() - 4;
    assert!((30..70).contains(&arrivals), "{driven:?}");
    assert!(driven.requests > 5 * arrivals, "{driven:?}");
    let mut planned = BTreeMap::from([("push", 4)]);
    for kind in plan_sessions(&model, 7, arrivals as usize) {
        *planned.entry(kind).or_default() += 1;
    }
    assert_eq!(planned, driven.sessions);

    // The testbed saw the whole story: challenges, pushes, Clair indexing what was pushed,
    // pulls reading blobs, the API and Clair's reports.
    let counts = testbed.served();
    for (endpoint, status) in [
        ("GET /v2/", 401),
        ("GET /v2/auth", 200),
        ("HEAD /v2/{repo}/blobs/{digest}", 404),
        ("PATCH /v2/{repo}/blobs/uploads/{uuid}", 202),
        ("PUT /v2/{repo}/blobs/uploads/{uuid}", 201),
        ("PUT /v2/{repo}/manifests/{tag}", 201),
        ("GET /v2/{repo}/manifests/{tag}", 200),
        ("GET /v2/{repo}/blobs/{digest}", 200),
        ("POST /indexer/api/v1/index_report", 201),
        ("GET /api/v1/user/", 200),
        ("GET /api/v1/repository/{namespace}/{repo}/tag/", 200),
    ] {
        assert!(
            testbed.served_count(endpoint, status) > 0,
            "{endpoint} {status}: {counts:#?}"
        );
    }
    // Every push went through to its manifest, and Clair indexed it, fetching each of its
    // three layers from storage; Clair sessions' rescans index known manifests again, without
    // fetching.
    let pushes = driven.sessions["push"];
    let indexed = testbed.served_count("POST /indexer/api/v1/index_report", 201);
    let manifests = testbed.served_count("PUT /v2/{repo}/manifests/{tag}", 201);
    let fetched = testbed.served_count("GET /_storage/{digest}", 200);
    assert_eq!((manifests, fetched), (pushes, 3 * pushes), "{counts:#?}");
    assert!(indexed > pushes, "{counts:#?}");
}

#[test]
fn plans_are_the_same_for_a_seed_differ_across_seeds_and_follow_the_mix() {
    let model = TrafficModel::default();
    let plan = plan_sessions(&model, 7, 2_000);
    assert_eq!(plan, plan_sessions(&model, 7, 2_000));
    assert_ne!(plan, plan_sessions(&model, 8, 2_000));
    assert_eq!(plan[..100], plan_sessions(&model, 7, 100)[..]);
    let share = |kind: &str| plan.iter().filter(|k| **k == kind).count() as f64 / 2_000.0;
    assert!((0.60..0.80).contains(&share("pull")), "{}", share("pull"));
    assert!((0.02..0.08).contains(&share("push")), "{}", share("push"));
    assert!((0.10..0.20).contains(&share("api")), "{}", share("api"));
    assert!((0.06..0.14).contains(&share("clair")), "{}", share("clair"));

    let clair_only =
        TrafficModel::from_toml("[mix]\npull = 0\npush = 0\napi = 0\nclair = 2").unwrap();
    assert!(plan_sessions(&clair_only, 7, 50)
        .iter()
        .all(|k| *k == "clair"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_pushes_the_same_images_every_run() {
    // No arrivals: the seed images alone, twice, into two fresh testbeds.
    let model = TrafficModel::from_toml("sessions-per-second = 0\nimages = 3").unwrap();
    let mut tags = Vec::new();
    for seed in [11, 11, 12] {
        let testbed = testbed().await;
        let driven = drive(options(&testbed, model.clone(), 0.0, seed), None)
            .await
            .unwrap();
        assert!(driven.unexpected.is_empty(), "{:#?}", driven.unexpected);
        assert_eq!(driven.sessions["push"], 3);
        tags.push(manifest_digests(&testbed).await);
    }
    assert_eq!(tags[0].len(), 3, "{tags:?}");
    assert_eq!(tags[0], tags[1], "the same seed, the same manifests");
    assert_ne!(tags[0], tags[2], "another seed, other layers");
}

/// The manifest digests of `demo/app*:v1`, as Quay's API lists them.
async fn manifest_digests(testbed: &Testbed) -> Vec<String> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut digests = Vec::new();
    for app in 0..3 {
        let request = http::Request::get(format!(
            "http://{}/api/v1/repository/demo/app{app}/tag/",
            testbed.addr
        ))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(Full::default())
        .unwrap();
        let body = client.request(request).await.unwrap().into_body();
        let body: serde_json::Value =
            serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap();
        digests.extend(
            body["tags"][0]["manifest_digest"]
                .as_str()
                .map(str::to_string),
        );
    }
    digests
}

#[test]
fn a_traffic_model_reads_from_toml_and_names_what_is_wrong() {
    let full = r#"
        sessions-per-second = 50.5
        think-ms = 40
        diurnal = 0.5
        images = 6
        layers = 2
        layer-kib = [1, 8]
        namespace = "acme"

        [mix]
        pull = 8
        push = 1
        api = 1
        clair = 0

        [burst]
        every-s = 30
        for-s = 5
        factor = 4
    "#;
    let model = TrafficModel::from_toml(full).unwrap();
    assert_eq!(model.sessions_per_second, 50.5);
    assert_eq!((model.think_ms, model.diurnal), (40.0, 0.5));
    assert_eq!(
        (model.images, model.layers, model.layer_kib),
        (6, 2, (1, 8))
    );
    assert_eq!(model.namespace, "acme");
    assert_eq!((model.mix.pull, model.mix.clair), (8.0, 0.0));
    let burst = model.burst.unwrap();
    assert_eq!((burst.every_s, burst.for_s, burst.factor), (30.0, 5.0, 4.0));

    // Defaults fill what a model leaves out.
    let partial = TrafficModel::from_toml("[burst]\nfactor = 5").unwrap();
    assert_eq!(partial.sessions_per_second, 20.0);
    assert_eq!(partial.burst.unwrap().every_s, 7.0);

    let unknown = TrafficModel::from_toml("sessions-per-second = 5\nsesions = 3").unwrap_err();
    assert!(unknown.contains("sesions"), "{unknown}");
    let nested = TrafficModel::from_toml("[mix]\npul = 1").unwrap_err();
    assert!(nested.contains("pul"), "{nested}");
    let range = TrafficModel::from_toml("diurnal = 1.5").unwrap_err();
    assert!(
        range.contains("diurnal") && range.contains("1.5"),
        "{range}"
    );
    let sizes = TrafficModel::from_toml("layer-kib = [9, 3]").unwrap_err();
    assert!(sizes.contains("layer-kib"), "{sizes}");
}
