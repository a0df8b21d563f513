//! HAR in and out, on the real Quay and Clair captures and on the shapes other producers write.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use loadtape::har::{import, HarExporter, ImportOptions};
use loadtape::redact::Redactor;
use loadtape::tape::{Exchange, HeaderValue, Record, SecretKind, Stored, TapeReader};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("captures/har")
        .join(name)
}

fn import_to(har: &Path, dir: &Path) -> (Vec<Record>, PathBuf) {
    let out = dir.join(format!(
        "{}.tape",
        har.file_stem().unwrap().to_string_lossy()
    ));
    import(har, &out, &Redactor::default(), &ImportOptions::default()).unwrap();
    (read_one(&out).unwrap().0, out)
}

/// Every credential in a HAR file: header values after their scheme, and issued tokens.
fn secrets_in(har: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(har).unwrap()).unwrap();
    let mut out = vec![];
    for e in v["log"]["entries"].as_array().unwrap() {
        for h in e["request"]["headers"].as_array().unwrap() {
            let name = h["name"].as_str().unwrap().to_ascii_lowercase();
            if name == "authorization" || name == "cookie" {
                let value = h["value"].as_str().unwrap();
                out.push(value.split_once(' ').map_or(value, |(_, s)| s).to_string());
            }
        }
        if let Some(text) = e["response"]["content"]["text"].as_str() {
            if let Ok(body) = serde_json::from_str::<serde_json::Value>(text) {
                if let Some(token) = body["token"].as_str() {
                    out.push(token.to_string());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn export_har(tape: &Path) -> String {
    let mut reader = TapeReader::open_one(tape).unwrap();
    let mut out = Vec::new();
    let mut exporter = HarExporter::new(&mut out, reader.epoch_unix_ns()).unwrap();
    for r in reader.by_ref() {
        exporter.add(&r.unwrap()).unwrap();
    }
    exporter.finish().unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn the_real_quay_session_imports_with_every_status_and_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    let har = fixture("quay-session.har");
    let (records, tape) = import_to(&har, dir.path());
    let exchanges = exchanges_in(&records);
    assert_eq!(exchanges.len(), 63);

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&har).unwrap()).unwrap();
    let mut want: Vec<(String, u16)> = v["log"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let url = e["request"]["url"].as_str().unwrap();
            let path = &url[url.find("://").unwrap() + 3..];
            (
                path[path.find('/').unwrap()..].to_string(),
                e["response"]["status"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    let mut got: Vec<(String, u16)> = exchanges
        .iter()
        .map(|e| {
            (
                e.request.target.clone(),
                e.response.as_ref().unwrap().status,
            )
        })
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);

    // Not one credential of the capture is on the tape, or in what is exported from it.
    let secrets = secrets_in(&har);
    assert!(secrets.len() >= 5, "the fixture has tokens to test with");
    let exported = export_har(&tape);
    let jsonl: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    for s in &secrets {
        assert!(!exported.contains(s.as_str()), "HAR export leaks {s}");
        assert!(!jsonl.contains(s.as_str()), "tape leaks {s}");
    }
}

#[test]
fn a_token_issued_by_v2_auth_is_recognised_where_it_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let (records, _) = import_to(&fixture("quay-session.har"), dir.path());
    let exchanges = exchanges_in(&records);
    let auth: Vec<&&Exchange> = exchanges
        .iter()
        .filter(|e| e.request.path() == "/v2/auth" && e.response.as_ref().unwrap().status == 200)
        .collect();
    assert_eq!(auth.len(), 7);
    for a in &auth {
        // The token body is not stored; its fingerprint is.
        assert!(matches!(
            a.response.as_ref().unwrap().body.stored,
            Stored::None
        ));
        assert_eq!(a.issued_secrets.len(), 1);
        let jwt = a.issued_secrets[0]
            .jwt
            .as_ref()
            .expect("Quay tokens are JWTs");
        assert_eq!(jwt.issuer.as_deref(), Some("quay"));
    }
    // Each registry request with a bearer token uses one that a /v2/auth issued.
    let issued: Vec<u64> = auth
        .iter()
        .map(|a| a.issued_secrets[0].fingerprint)
        .collect();
    let mut used = 0;
    for e in exchanges
        .iter()
        .filter(|e| e.request.path().starts_with("/v2/") && e.request.path() != "/v2/auth")
    {
        if let Some(HeaderValue::Redacted(r)) = e.request.headers.get("authorization") {
            assert_eq!(r.kind, SecretKind::BearerJwt);
            assert!(
                issued.contains(&r.fingerprint),
                "{} {}",
                e.request.method,
                e.request.target
            );
            used += 1;
        }
    }
    assert!(used >= 20, "only {used} registry requests carried tokens");
}

#[test]
fn the_real_clair_session_keeps_index_report_bodies_and_etags() {
    let dir = tempfile::tempdir().unwrap();
    let (records, _) = import_to(&fixture("clair-session.har"), dir.path());
    let exchanges = exchanges_in(&records);
    assert_eq!(exchanges.len(), 28);
    let post = exchanges
        .iter()
        .find(|e| {
            e.request.path() == "/indexer/api/v1/index_report"
                && e.request.method.as_str() == "POST"
        })
        .unwrap();
    let body = post
        .request
        .body
        .whole_inline()
        .expect("JSON bodies are kept whole");
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert!(!json["layers"].as_array().unwrap().is_empty());
    assert!(matches!(
        post.request.headers.get("authorization"),
        Some(HeaderValue::Redacted(r)) if r.kind == SecretKind::BearerJwt
    ));
    assert!(post
        .response
        .as_ref()
        .unwrap()
        .headers
        .get_str("etag")
        .is_some());
}

#[test]
fn export_then_import_gives_back_the_same_exchanges() {
    let dir = tempfile::tempdir().unwrap();
    let (records, tape) = import_to(&fixture("clair-session.har"), dir.path());
    let har = dir.path().join("again.har");
    std::fs::write(&har, export_har(&tape)).unwrap();
    let (again, _) = import_to(&har, dir.path());
    let (a, b) = (exchanges_in(&records), exchanges_in(&again));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.request.method, y.request.method);
        assert_eq!(x.request.target, y.request.target);
        assert_eq!(x.request.body, y.request.body);
        assert_eq!(x.timing.start, y.timing.start);
        let (rx, ry) = (x.response.as_ref().unwrap(), y.response.as_ref().unwrap());
        assert_eq!(rx.status, ry.status);
        assert_eq!(rx.body, ry.body);
        let names =
            |h: &loadtape::tape::Headers| h.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&x.request.headers), names(&y.request.headers));
    }
}

#[test]
fn sparse_hars_from_other_producers_import() {
    let dir = tempfile::tempdir().unwrap();
    let har = dir.path().join("sparse.har");
    // No timings, no connection ids, a form body as text, a binary response in base64, a
    // failed request (status 0), HTTP/2 pseudo-headers, and most optional fields left out.
    std::fs::write(
        &har,
        r#"{"log": {"entries": [
          {"startedDateTime": "2026-11-25T10:00:00.000+01:00", "time": 12.5,
           "request": {"method": "POST", "url": "https://quay.example/api/v1/repository?x=1",
                       "postData": {"text": "{\"repository\": \"web\"}"}},
           "response": {"status": 201, "content": {"text": "AAEC/w==", "encoding": "base64", "size": 4}}},
          {"startedDateTime": "2026-11-25T09:00:01.000Z",
           "request": {"method": "GET", "url": "https://quay.example/v2/", "httpVersion": "h2",
                       "headers": [{"name": ":authority", "value": "quay.example"},
                                   {"name": "authorization", "value": "Basic YWRtaW46cGFzc3dvcmQ="}]},
           "response": {"status": 0, "content": {}}, "_error": "net::ERR_CONNECTION_REFUSED"}
        ]}}"#,
    )
    .unwrap();
    let (records, _) = import_to(&har, dir.path());
    let ex = exchanges_in(&records);
    assert_eq!(ex.len(), 2);
    let conns = records
        .iter()
        .filter(|r| matches!(r, Record::ConnectionOpened(_)))
        .count();
    assert_eq!(
        conns, 2,
        "an entry without a connection is its own connection"
    );
    // Ordered by start: the failed GET came a second after the POST.
    let (post, get) = (ex[0], ex[1]);
    assert_eq!(get.timing.start - post.timing.start, 1_000_000_000);
    assert_eq!(
        post.request.body.whole_inline(),
        Some(&b"{\"repository\": \"web\"}"[..])
    );
    let resp = post.response.as_ref().unwrap();
    assert_eq!(resp.body.whole_inline(), Some(&[0u8, 1, 2, 255][..]));
    assert_eq!(post.timing.response_done, 12_500_000);
    let failure = get.response.as_ref().unwrap_err();
    assert!(failure.detail.contains("ERR_CONNECTION_REFUSED"));
    assert_eq!(get.request.authority, "quay.example");
    assert!(get.request.headers.get(":authority").is_none());
    assert!(matches!(
        get.request.headers.get("authorization"),
        Some(HeaderValue::Redacted(_))
    ));
}

#[test]
fn what_is_not_a_har_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.har");
    std::fs::write(&bad, b"<html>").unwrap();
    let err = import(
        &bad,
        &dir.path().join("x.tape"),
        &Redactor::default(),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("is not a HAR file"), "{err:#}");
    std::fs::write(
        &bad,
        br#"{"log": {"entries": [{"startedDateTime": "yesterday", "request": {"method": "GET", "url": "http://a/"}, "response": {"status": 200}}]}}"#,
    )
    .unwrap();
    let err = import(
        &bad,
        &dir.path().join("y.tape"),
        &Redactor::default(),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("entry 0 has startedDateTime \"yesterday\""),
        "{err:#}"
    );
}
