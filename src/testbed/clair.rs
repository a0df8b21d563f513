//! Clair v4's indexer and matcher as Quay calls them: a pre-shared-key JWT on every call, an
//! index state that is the ETag of everything, and an index POST that fetches every layer from
//! the URI it is given (the heavy part of real Clair's work, and what makes a replayed index
//! request depend on the registry's live contents). Reports are small and synthetic: one
//! package per layer, no vulnerabilities.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::Mac;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    empty, headed, if_none_match, is_sha256, json, sha256, with_body, Reply, Request, Shared,
};

/// How long a layer fetch may take, connecting included, before the index request fails.
pub(super) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of `POST /indexer/api/v1/index_report`.
#[derive(Deserialize)]
struct IndexRequest {
    hash: String,
    #[serde(default)]
    layers: Vec<LayerRequest>,
}

#[derive(Deserialize)]
struct LayerRequest {
    hash: String,
    uri: String,
    /// Sent with the fetch: Quay passes the registry's Authorization here.
    #[serde(default)]
    headers: HashMap<String, Vec<String>>,
}

pub(super) async fn answer(shared: &Shared, req: &Request) -> Reply {
    if let Some(psk) = &shared.config.clair_psk {
        if !jwt_valid(psk, &shared.config.clair_issuers, req.bearer()) {
            // Clair answers a failed PSK check with nothing at all.
            return empty(StatusCode::UNAUTHORIZED);
        }
    }
    let path = req.path.as_str();
    let report = path.strip_prefix("/indexer/api/v1/index_report/");
    let matched = path.strip_prefix("/matcher/api/v1/vulnerability_report/");
    match (&req.method, path, report, matched) {
        (&Method::GET, "/indexer/api/v1/index_state", _, _) => index_state(shared, req),
        (&Method::POST, "/indexer/api/v1/index_report", _, _) => index(shared, req).await,
        (&Method::DELETE, "/indexer/api/v1/index_report", _, _) => delete_reports(shared, req),
        (&Method::GET, _, Some(digest), _) => index_report(shared, req, digest),
        (&Method::DELETE, _, Some(digest), _) => {
            shared.store().index_reports.remove(digest);
            empty(StatusCode::NO_CONTENT)
        }
        (&Method::GET, _, _, Some(digest)) => vulnerability_report(shared, digest),
        _ => not_found("no such route"),
    }
}

/// Clair's error body.
fn problem(status: StatusCode, code: &str, message: &str) -> Reply {
    json(status, &json!({"code": code, "message": message}))
}

fn bad_request(message: &str) -> Reply {
    problem(StatusCode::BAD_REQUEST, "bad-request", message)
}

fn not_found(message: &str) -> Reply {
    problem(StatusCode::NOT_FOUND, "not-found", message)
}

/// Sets the index state as the ETag, quoted.
fn etagged(shared: &Shared, reply: Reply) -> Reply {
    headed(reply, &[("etag", &format!("\"{}\"", shared.index_state))])
}

fn index_state(shared: &Shared, req: &Request) -> Reply {
    if if_none_match(req, &shared.index_state) {
        return etagged(shared, empty(StatusCode::NOT_MODIFIED));
    }
    let body = Bytes::from(json!({ "state": shared.index_state }).to_string());
    let reply = with_body(
        StatusCode::OK,
        "application/vnd.clair.index_state.v1+json",
        body,
    );
    etagged(shared, reply)
}

async fn index(shared: &Shared, req: &Request) -> Reply {
    let manifest: IndexRequest = match serde_json::from_slice(&req.body) {
        Ok(m) => m,
        Err(e) => return bad_request(&format!("failed to deserialize manifest: {e}")),
    };
    let layers = manifest.layers.iter().map(|l| &l.hash);
    if let Some(bad) = std::iter::once(&manifest.hash)
        .chain(layers)
        .find(|h| !is_sha256(h))
    {
        return bad_request(&format!("malformed digest {bad:?}"));
    }
    let gate = shared.index_lock(&manifest.hash);
    let _indexing = gate.lock().await;
    let known = shared.store().index_reports.get(&manifest.hash).cloned();
    if known.is_some() && if_none_match(req, &shared.index_state) {
        return etagged(shared, empty(StatusCode::PRECONDITION_FAILED));
    }
    // As Clair, a manifest already indexed under the current state is not fetched again.
    let report = match known {
        Some(report) => report,
        None => {
            for layer in &manifest.layers {
                if let Err(why) = fetch(shared, layer).await {
                    return problem(StatusCode::INTERNAL_SERVER_ERROR, "internal-error", &why);
                }
            }
            let report = synthetic_report(&manifest);
            let reports = &mut shared.store().index_reports;
            reports.insert(manifest.hash.clone(), report.clone());
            report
        }
    };
    let location = format!("/indexer/api/v1/index_report/{}", manifest.hash);
    etagged(
        shared,
        headed(
            json(StatusCode::CREATED, &report),
            &[("location", &location)],
        ),
    )
}

/// Fetches a layer whole and checks its digest, as Clair's fetcher does; the error names the
/// URI.
async fn fetch(shared: &Shared, layer: &LayerRequest) -> Result<(), String> {
    let failed = |why: String| format!("fetching layer {} from {}: {why}", layer.hash, layer.uri);
    let mut request = http::Request::get(layer.uri.as_str());
    for (name, value) in layer
        .headers
        .iter()
        .flat_map(|(n, vs)| vs.iter().map(move |v| (n, v)))
    {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| failed(e.to_string()))?;
    let exchange = async {
        let response = shared
            .fetcher
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        match sha256(&body.to_bytes()) {
            got if got == layer.hash || !shared.config.clair_verify_layers => Ok(()),
            got => Err(format!("the content's digest is {got}")),
        }
    };
    match tokio::time::timeout(FETCH_TIMEOUT, exchange).await {
        Ok(done) => done.map_err(failed),
        Err(_) => Err(failed(format!("no answer within {FETCH_TIMEOUT:?}"))),
    }
}

/// A small, well-formed index report: one package per layer, introduced in that layer.
fn synthetic_report(manifest: &IndexRequest) -> Value {
    let mut packages = serde_json::Map::new();
    let mut environments = serde_json::Map::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let id = (i + 1).to_string();
        let package = json!({"id": id, "name": format!("testbed-package-{id}"), "version": "1.0",
                             "kind": "binary", "arch": "x86_64"});
        packages.insert(id.clone(), package);
        let environment = json!([{"package_db": "var/lib/rpm", "introduced_in": layer.hash,
                                  "distribution_id": "", "repository_ids": null}]);
        environments.insert(id, environment);
    }
    json!({"manifest_hash": manifest.hash, "state": "IndexFinished", "packages": packages,
           "distributions": {}, "repository": {}, "environments": environments,
           "success": true, "err": ""})
}

fn index_report(shared: &Shared, req: &Request, digest: &str) -> Reply {
    if !is_sha256(digest) {
        return bad_request("malformed digest");
    }
    let Some(report) = shared.store().index_reports.get(digest).cloned() else {
        return not_found("index report not found");
    };
    if if_none_match(req, &shared.index_state) {
        return etagged(shared, empty(StatusCode::NOT_MODIFIED));
    }
    etagged(shared, json(StatusCode::OK, &report))
}

/// `DELETE /indexer/api/v1/index_report` with a JSON list of digests: 200 with those deleted.
fn delete_reports(shared: &Shared, req: &Request) -> Reply {
    let Ok(mut digests) = serde_json::from_slice::<Vec<String>>(&req.body) else {
        return bad_request("expected a JSON list of digests");
    };
    let reports = &mut shared.store().index_reports;
    digests.retain(|d| reports.remove(d).is_some());
    json(StatusCode::OK, &json!(digests))
}

fn vulnerability_report(shared: &Shared, digest: &str) -> Reply {
    if !is_sha256(digest) {
        return bad_request("malformed digest");
    }
    let Some(mut report) = shared.store().index_reports.get(digest).cloned() else {
        return not_found("index report not found");
    };
    if let Some(fields) = report.as_object_mut() {
        for indexer_only in ["state", "success", "err"] {
            fields.remove(indexer_only);
        }
        for empty_map in ["vulnerabilities", "package_vulnerabilities", "enrichments"] {
            fields.insert(empty_map.to_string(), json!({}));
        }
    }
    headed(
        json(StatusCode::OK, &report),
        &[("cache-control", "max-age=21600")],
    )
}

/// An HS256 JWT signed with `psk`, from an accepted issuer, not expired.
fn jwt_valid(psk: &[u8], issuers: &[String], token: Option<&str>) -> bool {
    let mut parts = token.unwrap_or_default().split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |part: &str| serde_json::from_slice::<Value>(&b64.decode(part).ok()?).ok();
    if decode(header).map_or(true, |h| h["alg"] != "HS256") {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(psk).expect("HMAC takes any key");
    mac.update(format!("{header}.{claims}").as_bytes());
    if b64
        .decode(signature)
        .map_or(true, |s| mac.verify_slice(&s).is_err())
    {
        return false;
    }
    let Some(claims) = decode(claims) else {
        return false;
    };
    let now = chrono::Utc::now().timestamp() as f64;
    let known_issuer = issuers.iter().any(|i| claims["iss"] == i.as_str());
    let unexpired = claims
        .get("exp")
        .map_or(true, |e| e.as_f64().is_some_and(|e| e > now));
    known_issuer && unexpired
}
