//! The testbed answers as Quay's registry, Quay's API and Clair do on the wire: driven here by
//! an in-process HTTP client, and by skopeo pushing and pulling a real image.

mod common;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loadtape::testbed::{Config, RegistryAuth, Testbed};
use serde_json::{json, Value};
use sha2::Digest;

const USER: &str = "alice";
const PASSWORD: &str = "secret";

fn config(registry_auth: RegistryAuth) -> Config {
    Config {
        accounts: vec![(USER.into(), PASSWORD.into())],
        registry_auth,
        api_tokens: vec!["api-token".into()],
        ..Config::default()
    }
}

/// A client of one testbed: targets without a scheme are its paths, and every request carries
/// `headers`.
#[derive(Clone)]
struct Peer {
    base: String,
    headers: Vec<(String, String)>,
    http2: bool,
}

impl Peer {
    fn of(testbed: &Testbed) -> Peer {
        let base = format!("http://{}", testbed.addr);
        Peer {
            base,
            headers: Vec::new(),
            http2: false,
        }
    }

    fn with(&self, name: &str, value: &str) -> Peer {
        let mut peer = self.clone();
        peer.headers.push((name.into(), value.into()));
        peer
    }

    async fn get(&self, target: &str) -> Answer {
        self.send("GET", target, "").await
    }

    async fn send(&self, method: &str, target: &str, body: impl Into<Bytes>) -> Answer {
        let url = match target.starts_with("http") {
            true => target.to_string(),
            false => format!("{}{target}", self.base),
        };
        let mut req = http::Request::builder().method(method).uri(url);
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        let client = Client::builder(TokioExecutor::new())
            .http2_only(self.http2)
            .build_http();
        let response = client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Asserts the status and error code (the registry's `errors[0].code`, Clair's `code`).
    fn expect(&self, status: u16, code: &str) {
        let body = self.json();
        let got = body["errors"][0]["code"]
            .as_str()
            .or(body["code"].as_str())
            .unwrap_or("");
        let text = String::from_utf8_lossy(&self.body);
        assert_eq!((self.status, got), (status, code), "answered {text}");
    }
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// `Bearer <token>` for the account, from the testbed's `/v2/auth`.
async fn bearer(testbed: &Testbed) -> String {
    let peer = Peer::of(testbed).with("authorization", &basic(USER, PASSWORD));
    let answer = peer
        .get("/v2/auth?account=alice&scope=repository:org/app:pull,push")
        .await;
    answer.expect(200, "");
    format!("Bearer {}", answer.json()["token"].as_str().unwrap())
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", common::net::hex(&sha2::Sha256::digest(bytes)))
}

/// An HS256 JWT over `claims`, as Quay signs its calls to Clair.
fn jwt(key: &[u8], claims: Value) -> String {
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let signed = format!("{header}.{}", b64.encode(claims.to_string()));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(signed.as_bytes());
    format!(
        "Bearer {signed}.{}",
        b64.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn a_client_is_challenged_then_admitted_with_a_token_from_v2_auth() {
    let testbed = Testbed::start(config(RegistryAuth::Token)).await.unwrap();
    let peer = Peer::of(&testbed);
    let realm = format!(
        r#"Bearer realm="{}/v2/auth",service="{}""#,
        peer.base, testbed.addr
    );
    let ping = peer.get("/v2/").await;
    ping.expect(401, "UNAUTHORIZED");
    assert_eq!(ping.header("www-authenticate"), realm);
    // HTTP/2 has no Host header: the realm names the URI's authority.
    let h2 = Peer {
        http2: true,
        ..peer.clone()
    }
    .get("/v2/")
    .await;
    assert_eq!(h2.header("www-authenticate"), realm);

    // A fresh token per call, and only `token` (as Quay answers).
    let token = bearer(&testbed).await;
    assert_ne!(token, bearer(&testbed).await);
    let auth = "/v2/auth?account=alice&service=testbed";
    let answer = peer
        .with("authorization", &basic(USER, PASSWORD))
        .get(auth)
        .await;
    assert_eq!(
        answer
            .json()
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["token"]
    );
    let wrong = peer
        .with("authorization", &basic(USER, "guess"))
        .get(auth)
        .await;
    wrong.expect(401, "UNAUTHORIZED");
    assert_eq!(wrong.header("www-authenticate"), realm);

    // Without credentials: a token that passes the ping and grants nothing.
    let anonymous = peer.get(auth).await.json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let anonymous = peer.with("authorization", &format!("Bearer {anonymous}"));
    anonymous.get("/v2/").await.expect(200, "");
    let refused = anonymous.get("/v2/org/app/tags/list").await;
    refused.expect(401, "UNAUTHORIZED");
    let scope = format!(r#"{realm},scope="repository:org/app:pull""#);
    assert_eq!(refused.header("www-authenticate"), scope);
    let pushing = anonymous
        .send("POST", "/v2/org/app/blobs/uploads/", "")
        .await;
    assert!(pushing
        .header("www-authenticate")
        .ends_with(r#":org/app:pull,push""#));

    // A token not issued here is refused; one issued here is admitted.
    let forged = peer.with("authorization", "Bearer access.00.c2lnbmF0dXJl");
    forged
        .get("/v2/org/app/tags/list")
        .await
        .expect(401, "UNAUTHORIZED");
    let admitted = peer.with("authorization", &token);
    admitted
        .get("/v2/org/app/tags/list")
        .await
        .expect(404, "NAME_UNKNOWN");
}

#[tokio::test]
async fn basic_mode_wants_credentials_on_every_request_and_none_mode_wants_nothing() {
    let testbed = Testbed::start(config(RegistryAuth::Basic)).await.unwrap();
    let refused = Peer::of(&testbed).get("/v2/").await;
    refused.expect(401, "UNAUTHORIZED");
    assert_eq!(
        refused.header("www-authenticate"),
        r#"Basic realm="registry""#
    );
    let peer = Peer::of(&testbed).with("authorization", &basic(USER, PASSWORD));
    peer.get("/v2/").await.expect(200, "");

    let testbed = Testbed::start(config(RegistryAuth::None)).await.unwrap();
    Peer::of(&testbed)
        .get("/v2/org/app/tags/list")
        .await
        .expect(404, "NAME_UNKNOWN");
}

#[tokio::test]
async fn a_chunked_push_pulls_back_byte_identical_and_stale_upload_states_are_refused() {
    let testbed = Testbed::start(config(RegistryAuth::Token)).await.unwrap();
    let peer = Peer::of(&testbed).with("authorization", &bearer(&testbed).await);
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let blob_digest = digest(&blob);

    let started = peer
        .send("POST", "/v2/org/team/app/blobs/uploads/", "")
        .await;
    started.expect(202, "");
    assert_eq!(started.header("range"), "0-0");
    let uuid = started.header("docker-upload-uuid");
    let location = started.header("location");
    let session = format!("{}/v2/org/team/app/blobs/uploads/{uuid}?_state=", peer.base);
    assert!(location.starts_with(&session), "{location}");

    let first = peer.send("PATCH", location, blob[..100_000].to_vec()).await;
    first.expect(202, "");
    assert_eq!(
        (first.header("range"), first.header("docker-upload-uuid")),
        ("0-99999", uuid)
    );
    assert_ne!(first.header("location"), location);
    // The first Location is stale now; without `_state` it is none at all.
    let stale = peer.send("PATCH", location, blob[100_000..].to_vec()).await;
    stale.expect(400, "BLOB_UPLOAD_INVALID");
    let bare = location.split('?').next().unwrap();
    peer.send("PATCH", bare, "x")
        .await
        .expect(400, "BLOB_UPLOAD_INVALID");
    let unknown = location.replace(uuid, "00000000-0000-4000-8000-000000000000");
    peer.send("PATCH", &unknown, "x")
        .await
        .expect(404, "BLOB_UPLOAD_UNKNOWN");

    let second = peer.send(
        "PATCH",
        first.header("location"),
        blob[100_000..250_000].to_vec(),
    );
    let second = second.await;
    assert_eq!(second.header("range"), "0-249999");
    // The digest as clients percent-encode it.
    let encoded = blob_digest.replace(':', "%3A");
    let close = format!("{}&digest={encoded}", second.header("location"));
    let done = peer.send("PUT", &close, blob[250_000..].to_vec()).await;
    done.expect(201, "");
    let url = format!("{}/v2/org/team/app/blobs/{blob_digest}", peer.base);
    assert_eq!(done.header("location"), url);
    assert_eq!(done.header("docker-content-digest"), blob_digest);

    let pulled = peer.get(&url).await;
    assert_eq!(
        (pulled.status, pulled.header("content-type")),
        (200, "application/octet-stream")
    );
    assert!(
        pulled.body == blob,
        "the pulled blob differs from the pushed one"
    );
    let head = peer.send("HEAD", &url, "").await;
    assert_eq!(
        (head.status, head.header("content-length"), head.body.len()),
        (200, "300000", 0)
    );
    assert_eq!(head.header("docker-content-digest"), blob_digest);
    let missing = format!("/v2/org/team/app/blobs/{}", digest(b"never pushed"));
    assert_eq!(peer.send("HEAD", &missing, "").await.status, 404);
}

#[tokio::test]
async fn content_that_does_not_match_its_digest_is_refused_and_mounts_need_the_blob() {
    let testbed = Testbed::start(config(RegistryAuth::None)).await.unwrap();
    let peer = Peer::of(&testbed);
    let started = peer.send("POST", "/v2/org/app/blobs/uploads/", "").await;
    let close = format!(
        "{}&digest={}",
        started.header("location"),
        digest(b"other bytes")
    );
    peer.send("PUT", &close, "these bytes")
        .await
        .expect(400, "DIGEST_INVALID");
    let blob = format!("/v2/org/app/blobs/{}", digest(b"other bytes"));
    peer.get(&blob).await.expect(404, "BLOB_UNKNOWN");

    // A monolithic upload is checked the same way.
    let monolithic = |d: &str| format!("/v2/org/app/blobs/uploads/?digest={d}");
    let wrong = peer.send("POST", &monolithic(&digest(b"a")), "b").await;
    wrong.expect(400, "DIGEST_INVALID");
    let right = peer.send("POST", &monolithic(&digest(b"b")), "b").await;
    right.expect(201, "");
    assert_eq!(right.header("docker-content-digest"), digest(b"b"));

    let mount = |d: &str| format!("/v2/org/copy/blobs/uploads/?mount={d}&from=org/app");
    peer.send("POST", &mount(&digest(b"b")), "")
        .await
        .expect(201, "");
    peer.send("POST", &mount(&digest(b"c")), "")
        .await
        .expect(202, "");
}

#[tokio::test]
async fn manifests_must_reference_known_blobs_and_are_served_by_tag_and_digest() {
    let testbed = Testbed::start(config(RegistryAuth::None)).await.unwrap();
    let peer = Peer::of(&testbed);
    let config_digest = testbed.preload_blob(Bytes::from_static(b"{}"));
    let layer = b"layer bytes";
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer), "size": 11}],
    })
    .to_string();
    let refused = peer
        .send("PUT", "/v2/org/app/manifests/v1", manifest.clone())
        .await;
    refused.expect(400, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(
        refused.json()["errors"][0]["detail"]["digest"],
        digest(layer)
    );

    testbed.preload_blob(Bytes::from_static(layer));
    let put = peer
        .send("PUT", "/v2/org/app/manifests/v1", manifest.clone())
        .await;
    put.expect(201, "");
    let manifest_digest = digest(manifest.as_bytes());
    let location = format!("/v2/org/app/manifests/{manifest_digest}");
    assert_eq!(put.header("location"), location);
    assert_eq!(put.header("docker-content-digest"), manifest_digest);
    for reference in ["v1", &manifest_digest] {
        let got = peer
            .get(&format!("/v2/org/app/manifests/{reference}"))
            .await;
        assert_eq!((got.status, got.body.as_ref()), (200, manifest.as_bytes()));
        let content_type = "application/vnd.oci.image.manifest.v1+json";
        assert_eq!(got.header("content-type"), content_type);
        assert_eq!(got.header("docker-content-digest"), manifest_digest);
    }
    let tags = peer.get("/v2/org/app/tags/list").await.json();
    assert_eq!(tags, json!({"name": "org/app", "tags": ["v1"]}));

    // An index must name manifests this repository holds.
    let index = |digest: &str| {
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "digest": digest, "size": 1}]})
        .to_string()
    };
    let unknown = peer
        .send("PUT", "/v2/org/app/manifests/all", index(&digest(b"x")))
        .await;
    unknown.expect(400, "MANIFEST_BLOB_UNKNOWN");
    let known = peer
        .send("PUT", "/v2/org/app/manifests/all", index(&manifest_digest))
        .await;
    known.expect(201, "");

    peer.send("DELETE", &location, "").await.expect(202, "");
    peer.get("/v2/org/app/manifests/v1")
        .await
        .expect(404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn quay_api_wants_its_token_and_sees_the_registrys_repositories() {
    let testbed = Testbed::start(config(RegistryAuth::None)).await.unwrap();
    let anonymous = Peer::of(&testbed);
    assert_eq!(anonymous.get("/api/v1/user/").await.status, 401);
    let basic = anonymous.with("authorization", &basic(USER, PASSWORD));
    assert_eq!(basic.get("/api/v1/user/").await.status, 401);
    let api = anonymous.with("authorization", "Bearer api-token");
    assert_eq!(api.get("/api/v1/user/").await.json()["username"], USER);

    let create = json!({"namespace": "org", "repository": "web", "visibility": "private",
                        "description": "the web app"});
    let created = api
        .send("POST", "/api/v1/repository", create.to_string())
        .await;
    assert_eq!(created.status, 201);
    let again = api
        .send("POST", "/api/v1/repository", create.to_string())
        .await;
    assert_eq!(again.status, 400);

    // A push creates a repository, and its tag shows in the API.
    let config_digest = testbed.preload_blob(Bytes::from_static(b"{}"));
    let manifest = json!({"schemaVersion": 2, "config": {"digest": config_digest}, "layers": []});
    let pushed = anonymous
        .send("PUT", "/v2/org/app/manifests/v1", manifest.to_string())
        .await;
    let manifest_digest = pushed.header("docker-content-digest");
    let listed = api.get("/api/v1/repository?namespace=org").await.json();
    let names: Vec<&Value> = listed["repositories"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = names.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app", "web"]);
    let repository = api
        .get("/api/v1/repository/org/app?includeTags=true")
        .await
        .json();
    assert_eq!(repository["tags"]["v1"]["manifest_digest"], manifest_digest);
    let tags = api.get("/api/v1/repository/org/app/tag/").await.json();
    assert_eq!(tags["tags"][0]["name"], "v1");
    assert_eq!(
        (&tags["page"], &tags["has_additional"]),
        (&json!(1), &json!(false))
    );

    let permission = "/api/v1/repository/org/app/permissions/user/bob";
    let granted = api.send("PUT", permission, r#"{"role":"read"}"#).await;
    assert_eq!(
        (granted.status, &granted.json()["role"]),
        (200, &json!("read"))
    );
    assert_eq!(api.send("DELETE", permission, "").await.status, 204);
    let elsewhere = "/api/v1/repository/org/none/permissions/user/bob";
    assert_eq!(
        api.send("PUT", elsewhere, r#"{"role":"read"}"#)
            .await
            .status,
        404
    );

    assert_eq!(
        api.send("DELETE", "/api/v1/repository/org/app", "")
            .await
            .status,
        204
    );
    assert_eq!(api.get("/api/v1/repository/org/app").await.status, 404);
    assert_eq!(api.get("/api/v1/repository/org/app/tag/").await.status, 404);
}

/// Clair fetches layers from the testbed's own token-mode registry with the Authorization that
/// Quay puts in each layer's `headers` (as Quay on local storage does; on object storage it
/// hands Clair presigned URLs instead).
#[tokio::test]
async fn clair_indexes_by_fetching_every_layer_and_keys_its_answers_on_its_state() {
    let psk = b"clair pre-shared key".to_vec();
    let config = Config {
        clair_psk: Some(psk.clone()),
        ..config(RegistryAuth::Token)
    };
    let testbed = Testbed::start(config).await.unwrap();
    let later = chrono::Utc::now().timestamp() + 300;
    let clair = Peer::of(&testbed).with(
        "authorization",
        &jwt(&psk, json!({"iss": "quay", "exp": later})),
    );
    let registry = bearer(&testbed).await;
    let layers = ["one", "two"].map(|l| testbed.preload_blob(Bytes::from(l)));
    let manifest = digest(b"manifest");
    let request = |layers: &[String]| {
        let layers: Vec<Value> = layers
            .iter()
            .map(|d| {
                let uri = format!("{}/v2/org/app/blobs/{d}", clair.base);
                json!({"hash": d, "uri": uri, "headers": {"Authorization": [registry]}})
            })
            .collect();
        json!({"hash": manifest, "layers": layers}).to_string()
    };

    let state = clair.get("/indexer/api/v1/index_state").await;
    assert_eq!(
        state.header("content-type"),
        "application/vnd.clair.index_state.v1+json"
    );
    let etag = state.header("etag");
    assert_eq!(
        etag,
        format!("\"{}\"", state.json()["state"].as_str().unwrap())
    );
    assert_eq!(etag.len(), 34);
    let unchanged = clair
        .with("if-none-match", etag)
        .get("/indexer/api/v1/index_state")
        .await;
    assert_eq!((unchanged.status, unchanged.body.len()), (304, 0));

    let vulnerabilities = format!("/matcher/api/v1/vulnerability_report/{manifest}");
    clair.get(&vulnerabilities).await.expect(404, "not-found");
    let malformed = clair
        .get("/matcher/api/v1/vulnerability_report/sha256:xyz")
        .await;
    malformed.expect(400, "bad-request");

    let index = "/indexer/api/v1/index_report";
    let report = format!("{index}/{manifest}");
    clair
        .send("POST", index, "{not json")
        .await
        .expect(400, "bad-request");
    let unreachable = [layers[0].clone(), digest(b"not in the registry")];
    let failed = clair.send("POST", index, request(&unreachable)).await;
    failed.expect(500, "internal-error");
    let message = failed.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&format!("/v2/org/app/blobs/{}", unreachable[1])),
        "{message}"
    );

    let indexed = clair.send("POST", index, request(&layers)).await;
    indexed.expect(201, "");
    assert_eq!(indexed.header("etag"), etag);
    assert_eq!(indexed.header("location"), report);
    let body = indexed.json();
    assert_eq!(
        (&body["manifest_hash"], &body["state"]),
        (&json!(manifest), &json!("IndexFinished"))
    );
    let fetched = testbed.served_count("GET /v2/{repo}/blobs/{digest}", 200);
    assert_eq!(fetched, 3, "each layer, and the failed request's first");

    let again = clair
        .with("if-none-match", etag)
        .send("POST", index, request(&layers))
        .await;
    assert_eq!(again.status, 412);
    let got = clair.get(&report).await;
    assert_eq!(
        (got.status, got.header("etag"), got.json()),
        (200, etag, body)
    );
    let unchanged = clair.with("if-none-match", etag).get(&report).await;
    assert_eq!(unchanged.status, 304);

    let matched = clair.get(&vulnerabilities).await;
    assert_eq!(
        (matched.status, matched.header("cache-control")),
        (200, "max-age=21600")
    );
    assert_eq!(matched.json()["vulnerabilities"], json!({}));

    assert_eq!(clair.send("DELETE", &report, "").await.status, 204);
    assert_eq!(clair.send("DELETE", &report, "").await.status, 204);
    let gone = clair.get(&report).await;
    gone.expect(404, "not-found");
    assert_eq!(gone.json()["message"], "index report not found");
    // The bulk delete answers with the digests it deleted.
    clair
        .send("POST", index, request(&layers))
        .await
        .expect(201, "");
    let listed = json!([manifest, digest(b"never indexed")]).to_string();
    let bulk = clair.send("DELETE", index, listed).await;
    assert_eq!((bulk.status, bulk.json()), (200, json!([manifest])));
}

#[tokio::test]
async fn clair_refuses_jwts_not_signed_with_its_key_or_from_an_unknown_issuer_or_expired() {
    let psk = b"the right key".to_vec();
    let config = Config {
        clair_psk: Some(psk.clone()),
        ..config(RegistryAuth::Token)
    };
    let testbed = Testbed::start(config).await.unwrap();
    let state = |jwt: &str| Peer::of(&testbed).with("authorization", jwt);
    let later = chrono::Utc::now().timestamp() + 300;
    for admitted in [json!({"iss": "quay", "exp": later}), json!({"iss": "quay"})] {
        let answer = state(&jwt(&psk, admitted))
            .get("/indexer/api/v1/index_state")
            .await;
        assert_eq!(answer.status, 200);
    }
    for refused in [
        jwt(b"the wrong key", json!({"iss": "quay", "exp": later})),
        jwt(&psk, json!({"iss": "someone", "exp": later})),
        jwt(&psk, json!({"iss": "quay", "exp": later - 600})),
        "Bearer not.a.jwt".to_string(),
        String::new(),
    ] {
        let answer = state(&refused).get("/indexer/api/v1/index_state").await;
        assert_eq!((answer.status, answer.body.len()), (401, 0), "{refused}");
        assert!(answer.headers.get("www-authenticate").is_none());
    }
}

/// `skopeo ARGS...` with a private HOME (no auth files or blob-info cache from the machine);
/// fails the test with skopeo's words.
async fn skopeo(home: &std::path::Path, args: &[&str]) {
    common::net::require("skopeo", "skopeo");
    let out = tokio::process::Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .env("HOME", home)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_an_image_with_a_token_and_pulls_it_back_identical() {
    use common::registry::{blob, oci_image};
    let testbed = Testbed::start(config(RegistryAuth::Token)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = oci_image(&dir.path().join("image"), &[200_000, 30_000, 1_000], 5);
    let creds = format!("{USER}:{PASSWORD}");
    let remote = format!("docker://{}/org/app:v1", testbed.addr);
    let source = format!("oci:{}:v1", image.layout.display());
    let push = [
        "copy",
        "--dest-creds",
        &creds,
        "--dest-tls-verify=false",
        &source,
        &remote,
    ];
    skopeo(dir.path(), &push).await;
    let pulled = dir.path().join("pulled");
    let destination = format!("oci:{}:v1", pulled.display());
    let pull = [
        "copy",
        "--src-creds",
        &creds,
        "--src-tls-verify=false",
        &remote,
        &destination,
    ];
    skopeo(dir.path(), &pull).await;

    // The pulled manifest names the same layers, and every blob came back byte for byte.
    let index: Value =
        serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap()).unwrap();
    let manifest = blob(&pulled, index["manifests"][0]["digest"].as_str().unwrap());
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let layers: Vec<&Value> = manifest["layers"].as_array().unwrap().iter().collect();
    let layers: Vec<&str> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(layers, image.layers);
    for digest in image.layers.iter().chain([&image.config, &image.manifest]) {
        assert!(
            blob(&pulled, digest) == blob(&image.layout, digest),
            "blob {digest} differs"
        );
    }

    // skopeo went through the token flow and a real chunked push, then pulled.
    let counts = testbed.served();
    assert!(testbed.served_count("GET /v2/", 401) >= 2, "{counts:?}");
    assert!(testbed.served_count("GET /v2/auth", 200) >= 2, "{counts:?}");
    let uploads = testbed.served_count("PUT /v2/{repo}/blobs/uploads/{uuid}", 201);
    assert_eq!(uploads, 4, "three layers and a config: {counts:?}");
    assert_eq!(
        testbed.served_count("PUT /v2/{repo}/manifests/{tag}", 201),
        1,
        "{counts:?}"
    );
    assert_eq!(
        testbed.served_count("GET /v2/{repo}/blobs/{digest}", 200),
        4,
        "{counts:?}"
    );
}
