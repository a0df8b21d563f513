//! `loadtape record` as a user meets it: real clients through the proxy, the tape afterwards.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::net::*;
use common::{
    assert_watermarks_hold, exchanges_in, frame_payloads, frame_watermarks, occurrences, read_one,
};
use loadtape::tape::codec::{FrameEncoder, RecordDecoder};
use loadtape::tape::{FailureKind, HeaderValue, HttpVersion, Record, SecretKind, Stored};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_h2c_and_h2_with_tls_goes_through_and_is_recorded() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let plain = start(config(up.addr, &dir.path().join("plain"))).await;
    let (cert, key) = certificate(dir.path());
    let mut tls_config = config(up.addr, &dir.path().join("tls"));
    tls_config.tls = Some((cert.clone(), key));
    let tls = start(tls_config).await;

    let url = format!("http://{}/json", plain.addr);
    let h1 = curl(&["-w", "\n%{http_version} %{http_code}", &url]).await;
    assert_eq!(h1, "{\"ok\": true}\n1.1 200");
    let h2c = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version} %{http_code}",
        &url,
    ])
    .await;
    assert_eq!(h2c, "{\"ok\": true}\n2 200");
    let port = tls.addr.port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let tls_url = format!("https://localhost:{port}/status/418");
    let h2 = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        &tls_url,
    ])
    .await;
    assert_eq!(h2, "2 418");

    let plain_summary = plain.stop().await;
    let tls_summary = tls.stop().await;
    assert_eq!(plain_summary.exchanges, 2);
    assert_eq!(tls_summary.exchanges, 1);

    let (records, stats) = read_one(&dir.path().join("plain")).unwrap();
    assert!(stats.files[0].closed, "a stopped recorder closes its tape");
    let ex = exchanges_in(&records);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].request.version, HttpVersion::Http11);
    assert_eq!(ex[1].request.version, HttpVersion::H2);
    assert_eq!(
        (ex[0].stream, ex[1].stream),
        (0, 1),
        "HTTP/2 requests carry their stream id"
    );
    for e in &ex {
        assert_eq!(e.request.target, "/json");
        let r = e.response.as_ref().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body.whole_inline(),
            Some(&b"{\"ok\": true}"[..]),
            "JSON is kept whole"
        );
        assert!(e.timing.response_head.unwrap() <= e.timing.response_done);
    }
    let opened = records
        .iter()
        .filter(|r| matches!(r, Record::ConnectionOpened(_)))
        .count();
    let closed = records
        .iter()
        .filter(|r| matches!(r, Record::ConnectionClosed(_)))
        .count();
    assert_eq!(
        (opened, closed),
        (2, 2),
        "curl opened one connection per run"
    );

    let (records, _) = read_one(&dir.path().join("tls")).unwrap();
    let tls_open = records
        .iter()
        .find_map(|r| match r {
            Record::ConnectionOpened(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    let info = tls_open.tls.as_ref().expect("the connection is TLS");
    assert_eq!(info.alpn.as_deref(), Some("h2"));
    assert_eq!(info.server_name.as_deref(), Some("localhost"));
    assert_eq!(
        exchanges_in(&records)[0].response.as_ref().unwrap().status,
        418
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_the_tape_but_their_fingerprints_do() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    let base = format!("http://{}", rec.addr);
    let issued = curl(&[
        "-u",
        "alice:s3cret-password",
        &format!("{base}/v2/auth?service=quay&scope=x"),
    ])
    .await;
    assert!(
        issued.contains(TOKEN),
        "the client gets the token untouched"
    );
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let json = curl(&[
        "-H",
        &bearer,
        "-H",
        "Cookie: session=cookie-secret",
        &format!("{base}/json"),
    ])
    .await;
    curl(&[&format!("{base}/json?access_token=query-secret&n=1")]).await;
    curl(&[&format!("{base}/login")]).await;
    let redirected = curl(&["-w", "%{redirect_url}", &format!("{base}/presigned")]).await;
    assert_eq!(
        redirected, PRESIGNED,
        "the client gets its redirect untouched"
    );
    // Credentials in JSON bodies, both ways: a sign-in's password, a robot's token.
    let sign_in = r#"{"username": "alice", "password": "json0body0password"}"#;
    let echoed = curl(&[
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        sign_in,
        &format!("{base}/echo"),
    ])
    .await;
    let digest = hex_digest(sign_in.as_bytes());
    assert!(
        echoed.contains(&digest),
        "the upstream got the body untouched: {echoed}"
    );
    let robot = curl(&[&format!("{base}/robot")]).await;
    assert!(robot.contains("ROBOT0SECRET0TOKEN0VALUE0123456789"));
    rec.stop().await;

    let (records, _) = read_one(&out).unwrap();
    let everything = serde_json::to_string(&records).unwrap();
    for secret in [
        TOKEN,
        "s3cret-password",
        "YWxpY2U6czNjcmV0LXBhc3N3b3Jk",
        "cookie-secret",
        "query-secret",
        "server-issued-secret",
        "presigned0signature",
        "AKIAPRESIGNEDKEY",
        "json0body0password",
        "ROBOT0SECRET0TOKEN0VALUE0123456789",
    ] {
        assert!(!everything.contains(secret), "{secret} reached the tape");
    }
    let ex = exchanges_in(&records);
    let auth = ex[0];
    assert!(
        matches!(auth.response.as_ref().unwrap().body.stored, Stored::None),
        "token bodies are not stored"
    );
    assert_eq!(auth.issued_secrets.len(), 1);
    // Digests: of a body not stored, computed by the recorder; of one stored whole, derived
    // from the stored bytes on reading.
    let sha = |b: &[u8]| Some(<sha2::Sha256 as sha2::Digest>::digest(b).into());
    let token_body = &auth.response.as_ref().unwrap().body;
    assert_eq!(token_body.sha256, sha(issued.as_bytes()));
    let json_body = &ex[1].response.as_ref().unwrap().body;
    assert_eq!(json_body.whole_inline(), Some(json.as_bytes()));
    assert_eq!(json_body.sha256, sha(json.as_bytes()));
    let Some(HeaderValue::Redacted(used)) = ex[1].request.headers.get("authorization") else {
        panic!("authorization not redacted");
    };
    assert_eq!(used.kind, SecretKind::BearerJwt);
    assert_eq!(
        used.fingerprint, auth.issued_secrets[0].fingerprint,
        "the replay can tell which token it was"
    );
    assert_eq!(used.jwt.as_ref().unwrap().issuer.as_deref(), Some("quay"));
    assert!(ex[2]
        .request
        .target
        .starts_with("/json?access_token=loadtape-redacted-"));
    assert!(ex[2].request.target.ends_with("&n=1"));
    // A response's fields, read by the recorder itself, are redacted too.
    let set_cookie = ex[3].response.as_ref().unwrap().headers.get("set-cookie");
    let Some(HeaderValue::Redacted(cookie)) = set_cookie else {
        panic!("set-cookie not redacted: {set_cookie:?}");
    };
    assert_eq!(cookie.kind, SecretKind::Cookie);
    // A presigned redirect keeps where it went and for how long, not its signature.
    let location = ex[4].response.as_ref().unwrap().headers.get("location");
    let Some(HeaderValue::Plain(location)) = location else {
        panic!("location: {location:?}");
    };
    let location = std::str::from_utf8(location).unwrap();
    assert!(
        location.starts_with("https://s3.example.com/quay/sha256/ab?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=loadtape-redacted-"),
        "{location}"
    );
    assert!(location.contains("&X-Amz-Expires=600&X-Amz-Signature=loadtape-redacted-"));
    // The bodies keep their length and all but the secrets.
    let kept = |body: &loadtape::tape::Body| {
        let text = String::from_utf8(body.whole_inline().unwrap().to_vec()).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let request = kept(&ex[5].request.body);
    assert_eq!(request["username"], "alice");
    assert_eq!(ex[5].request.body.len as usize, sign_in.len());
    let response = kept(&ex[6].response.as_ref().unwrap().body);
    assert_eq!(response["name"], "org+bot");
    assert!(response["token"].as_str().unwrap().starts_with("redacted-"));
}

fn hex_digest(bytes: &[u8]) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_repeated_heads_are_on_the_tape_once_a_frame() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    // One curl, one connection: the same request head ten times, a bearer token in it.
    let agent = "loadtape-test-agent/12 (one connection, ten requests)";
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let urls: Vec<String> = (0..10)
        .map(|_| format!("http://{}/json", rec.addr))
        .collect();
    let mut args = vec!["-A", agent, "-H", &bearer];
    args.extend(urls.iter().map(String::as_str));
    curl(&args).await;
    rec.stop().await;

    let (records, _) = read_one(&out).unwrap();
    let exchanges = exchanges_in(&records);
    assert_eq!(exchanges.len(), 10);
    let connections: std::collections::HashSet<u64> =
        exchanges.iter().map(|e| e.connection).collect();
    assert_eq!(connections.len(), 1, "curl kept its connection");
    for e in &exchanges {
        let head = &e.request.headers;
        assert_eq!(head.get_str("user-agent"), Some(agent));
        assert!(matches!(
            head.get("authorization"),
            Some(HeaderValue::Redacted(_))
        ));
        assert_eq!(head, &exchanges[0].request.headers);
    }
    // Written out once in each frame that holds the connection's exchanges, referred to after.
    let mut frames = Vec::new();
    for file in std::fs::read_dir(&out).unwrap() {
        frames.extend(frame_payloads(
            &std::fs::read(file.unwrap().path()).unwrap(),
        ));
    }
    let with_agent: Vec<usize> = (frames.iter())
        .map(|f| occurrences(f, agent.as_bytes()))
        .filter(|&n| n > 0)
        .collect();
    assert!(
        !with_agent.is_empty() && with_agent.iter().all(|&n| n == 1),
        "the agent's head written {with_agent:?} times in the frames that hold it"
    );
    // The agent's value alone would be written once a frame anyway (the value cache): the
    // heads are references, as the same records written anew without them show.
    for frame in frames
        .iter()
        .filter(|f| occurrences(f, agent.as_bytes()) > 0)
    {
        let mut decoded: Vec<Record> = RecordDecoder::new(frame).map(Result::unwrap).collect();
        let mut again = Vec::new();
        let mut encoder = FrameEncoder::new();
        let mut exchanges = 0;
        for r in &mut decoded {
            if let Record::Exchange(e) = r {
                exchanges += 1;
                // As the recorder left them: a body stored whole without its digest, which
                // the reader derived.
                for body in [&mut e.request.body, &mut e.response.as_mut().unwrap().body] {
                    if body.whole_inline().is_some() {
                        body.sha256 = None;
                    }
                }
            }
            encoder.encode(r, &mut again);
        }
        // Each repeated request head is two bytes, not two or more a field.
        assert!(
            frame.len() + 4 * (exchanges - 1) <= again.len(),
            "{} bytes, {} written anew, {exchanges} exchanges",
            frame.len(),
            again.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_of_an_exchange_whose_body_is_spooled_never_reach_the_tape() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let mut c = config(up.addr, &out);
    c.bodies = loadtape::record::BodyCapture::Full;
    let rec = start(c).await;
    // Past the inline limit: the response's body is spooled, and its exchange follows its blob.
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let url = format!("http://{}/bytes/300000", rec.addr);
    let got = curl(&[
        "-H",
        &bearer,
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &url,
    ])
    .await;
    assert_eq!(got, "300000");
    // JSON past the inline limit, a password deep in it: not spooled whole, since the writer
    // can scrub only what a record keeps.
    let json = format!(
        r#"{{"pad": "{}", "password": "deep0json0password"}}"#,
        "x".repeat(100_000)
    );
    let posted = curl(&[
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &json,
        &format!("http://{}/sink", rec.addr),
    ])
    .await;
    assert_eq!(posted, format!(r#"{{"len": {}}}"#, json.len()));
    rec.stop().await;

    let (records, _) = read_one(&out).unwrap();
    let everything = serde_json::to_string(&records).unwrap();
    assert!(!everything.contains(TOKEN), "the token reached the tape");
    assert!(
        !everything.contains("deep0json0password"),
        "the password reached the tape"
    );
    let in_a_blob = records.iter().any(
        |r| matches!(r, Record::Blob(b) if b.data.windows(18).any(|w| w == b"deep0json0password")),
    );
    assert!(!in_a_blob, "the password reached the tape in a blob");
    let posted = exchanges_in(&records)
        .into_iter()
        .find(|e| e.request.target == "/sink")
        .unwrap();
    assert!(
        matches!(posted.request.body.stored, Stored::Prefix(_)),
        "{:?}",
        posted.request.body
    );
    assert_eq!(posted.request.body.len as usize, json.len());
    let blob = records
        .iter()
        .position(|r| matches!(r, Record::Blob(_)))
        .expect("the body is a blob");
    let download = records
        .iter()
        .position(|r| matches!(r, Record::Exchange(e) if matches!(e.response.as_ref().unwrap().body.stored, Stored::Full(_))))
        .expect("the download refers to its blob");
    assert!(blob < download);
    let Record::Exchange(e) = &records[download] else {
        unreachable!()
    };
    assert!(matches!(
        e.request.headers.get("authorization"),
        Some(HeaderValue::Redacted(r)) if r.kind == SecretKind::BearerJwt
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_with_their_digest_and_a_bounded_prefix() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    let base = format!("http://{}", rec.addr);
    // 8 MiB up (a layer push) and 8 MiB down (a layer pull).
    let upload = dir.path().join("layer.bin");
    let layer = pattern(0, 8 << 20);
    std::fs::write(&upload, &layer).unwrap();
    let echoed = curl(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{base}/echo"),
    ])
    .await;
    let echoed: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    let digest = hex(&<sha2::Sha256 as sha2::Digest>::digest(&layer));
    assert_eq!(echoed["len"], 8 << 20);
    assert_eq!(
        echoed["sha256"],
        digest.as_str(),
        "the upstream got the bytes untouched"
    );
    let downloaded = dir.path().join("down.bin");
    curl(&[
        "-o",
        downloaded.to_str().unwrap(),
        &format!("{base}/bytes/{}", 8 << 20),
    ])
    .await;
    assert_eq!(std::fs::read(&downloaded).unwrap(), layer);
    // Chunked up, as a client streaming a layer of unknown length sends it.
    let echoed = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{base}/echo"),
    ])
    .await;
    let echoed: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(
        (echoed["len"].as_u64(), echoed["sha256"].as_str()),
        (Some(8 << 20), Some(digest.as_str()))
    );
    rec.stop().await;

    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    let up_body = &ex[0].request.body;
    assert_eq!(up_body.len, 8 << 20);
    assert_eq!(hex(&up_body.sha256.unwrap()), digest);
    assert!(up_body.complete);
    assert!(matches!(&up_body.stored, Stored::Prefix(p) if p.len() == 64 << 10));
    let down = &ex[1].response.as_ref().unwrap().body;
    assert_eq!((down.len, hex(&down.sha256.unwrap())), (8 << 20, digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_fields_stay_behind_and_forwarding_fields_are_added() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(up.addr, &dir.path().join("t"))).await;
    let echoed = curl(&[
        "-H",
        "Connection: keep-alive, X-Drop-Me",
        "-H",
        "X-Drop-Me: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "X-Forwarded-For: 10.9.8.7",
        "-H",
        "X-Forwarded-Host: spoofed.example.com",
        "-H",
        "x-forwarded-proto: https",
        "-H",
        "Host: quay.example.com",
        &format!("http://{}/echo", rec.addr),
    ])
    .await;
    // An X-Forwarded-For the client's Connection names stays behind: not extended.
    let named = curl(&[
        "-H",
        "Connection: X-Forwarded-For",
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        &format!("http://{}/echo", rec.addr),
    ])
    .await;
    rec.stop().await;
    let named = serde_json::from_str::<serde_json::Value>(&named).unwrap();
    assert_eq!(named["headers"]["x-forwarded-for"], "127.0.0.1", "{named}");
    let echoed = serde_json::from_str::<serde_json::Value>(&echoed).unwrap();
    let headers = echoed["headers"].clone();
    assert_eq!(
        echoed["fields"],
        headers.as_object().unwrap().len(),
        "no field reaches the upstream twice: {headers}"
    );
    assert!(headers.get("x-drop-me").is_none(), "{headers}");
    assert!(headers.get("keep-alive").is_none(), "{headers}");
    assert_eq!(
        headers["host"], "quay.example.com",
        "the upstream sees the client's Host"
    );
    assert_eq!(headers["x-forwarded-for"], "10.9.8.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "quay.example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_or_hangs_gets_the_client_a_quick_502_or_504() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = start(config(closed, &dir.path().join("down"))).await;
    let status = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/json", down.addr),
    ])
    .await;
    assert_eq!(status, "502");
    down.stop().await;

    let up = upstream().await;
    let mut c = config(up.addr, &dir.path().join("hang"));
    c.upstream_timeout = Duration::from_millis(300);
    let hang = start(c).await;
    let status = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/slow/5000", hang.addr),
    ])
    .await;
    assert_eq!(status, "504");
    hang.stop().await;

    let (records, _) = read_one(&dir.path().join("down")).unwrap();
    let failure = exchanges_in(&records)[0]
        .response
        .as_ref()
        .unwrap_err()
        .clone();
    assert_eq!(failure.kind, FailureKind::Refused, "{failure:?}");
    let (records, _) = read_one(&dir.path().join("hang")).unwrap();
    let failure = exchanges_in(&records)[0]
        .response
        .as_ref()
        .unwrap_err()
        .clone();
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_lets_in_flight_exchanges_finish_then_closes_the_tape() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let mut c = config(up.addr, &out);
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let rec = start(c).await;
    // Slow enough that a loaded machine still sees it in flight before it ends.
    let url = format!("http://{}/slow/2000", rec.addr);
    let slow = tokio::spawn(async move { curl(&["-w", " %{http_code}", &url]).await });
    // Stop once the slow request is in flight (the upstream saw it: poll the metrics).
    let metrics = wait_for_in_flight(&rec).await;
    assert!(
        metrics.contains("loadtape_requests_in_flight 1"),
        "{metrics}"
    );
    let summary = rec.stop().await;
    assert_eq!(
        slow.await.unwrap(),
        "slow\n 200",
        "the in-flight exchange finished"
    );
    assert_eq!(summary.exchanges, 1);
    let (records, stats) = read_one(&out).unwrap();
    assert!(stats.files[0].closed);
    assert_eq!(exchanges_in(&records).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_counts_bytes_and_tape_files_and_serves_through_the_drain() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let mut c = config(up.addr, &out);
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    // A new file after every frame.
    c.rotate_size = Some(1);
    let rec = start(c).await;
    let admin = rec.admin.unwrap();
    let upload = dir.path().join("up.bin");
    std::fs::write(&upload, pattern(0, 100_000)).unwrap();
    let echoed = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("http://{}/echo", rec.addr),
    ])
    .await;
    assert_eq!(echoed, "200");
    let got = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://{}/bytes/200000", rec.addr),
    ])
    .await;
    assert_eq!(got, "200000");
    // The tape writer writes its frames on its own clock: its counts show once it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let text = scrape(&rec).await;
        let rotated = value_of(&text, "loadtape_tape_rotations_total").is_some_and(|n| n >= 1);
        if rotated {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation: {text}"
        );
        tokio::task::yield_now().await;
    };
    let request_bytes = value_of(&metrics, "loadtape_body_bytes_total{direction=\"request\"}");
    assert_eq!(request_bytes, Some(100_000), "{metrics}");
    let response_bytes = value_of(
        &metrics,
        "loadtape_body_bytes_total{direction=\"response\"}",
    );
    // The download and the upload's short answer: each byte counted once, in its direction.
    assert!(
        response_bytes.is_some_and(|n| (200_000..201_000).contains(&n)),
        "{metrics}"
    );
    assert!(
        value_of(&metrics, "loadtape_tape_bytes_total").is_some_and(|n| n > 0),
        "{metrics}"
    );
    assert_eq!(
        value_of(&metrics, "loadtape_responses_total{class=\"2xx\"}"),
        Some(2)
    );
    // Prometheus 3 scrapes only what names its format.
    let content_type = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{content_type}",
        &format!("http://{admin}/metrics"),
    ])
    .await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");

    // Draining: not ready (a load balancer takes the proxy out), the metrics still served.
    let url = format!("http://{}/slow/2000", rec.addr);
    let slow = tokio::spawn(async move { curl(&["-w", " %{http_code}", &url]).await });
    wait_for_in_flight(&rec).await;
    rec.cancel();
    let ready = |path: &'static str| async move {
        curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{admin}{path}"),
        ])
        .await
    };
    assert_eq!(ready("/readyz").await, "503");
    assert!(scrape(&rec).await.contains("loadtape_requests_in_flight 1"));
    assert_eq!(slow.await.unwrap(), "slow\n 200");
    let summary = rec.stop().await;
    assert_eq!(summary.exchanges, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_answering_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(up.addr, &dir.path().join("t"));
    c.header_read_timeout = Duration::from_millis(300);
    let rec = start(c).await;
    // h2c by prior knowledge: the preface and empty settings, then silence (no ping answered).
    let mut conn = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut sink = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent HTTP/2 client kept its connection");
    rec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_recorded_redacted_and_added_follows_the_flags() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let mut c = config(up.addr, &out);
    // Registry traffic only, layers aside; an API key redacted, cookies kept; no X-Forwarded-*.
    c.include = vec![regex::Regex::new("^/v2/").unwrap()];
    c.exclude = vec![regex::Regex::new("/blobs/").unwrap()];
    c.redact_headers = vec!["X-Api-Key".into()];
    c.keep_headers = vec!["Cookie".into()];
    c.forwarded_headers = false;
    c.rotate_every = Some(Duration::from_millis(200));
    let rec = start(c).await;
    let base = format!("http://{}", rec.addr);
    for path in ["/v2/echo", "/v2/org/app/blobs/sha256:ab", "/echo"] {
        curl(&[
            "-o",
            "/dev/null",
            "-H",
            "X-Api-Key: api-key-secret",
            "-H",
            "Cookie: theme=dark",
            &format!("{base}{path}"),
        ])
        .await;
    }
    let echoed = curl(&[&format!("{base}/echo")]).await;
    assert!(!echoed.contains("x-forwarded"), "{echoed}");
    // A new file every 200 ms while traffic goes on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&out).unwrap().count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no rotation by age");
        curl(&["-o", "/dev/null", &format!("{base}/v2/echo")]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rec.stop().await;
    let (records, stats) = read_one(&out).unwrap();
    assert!(stats.files.len() >= 2);
    let ex = exchanges_in(&records);
    assert!(
        ex.iter().all(|e| e.request.target == "/v2/echo"),
        "only what --include and --exclude let through"
    );
    let first = &ex[0].request.headers;
    assert!(matches!(
        first.get("x-api-key"),
        Some(HeaderValue::Redacted(_))
    ));
    assert_eq!(first.get_str("cookie"), Some("theme=dark"));
}

/// The value of the sample `name` (with its labels) in a Prometheus text exposition.
fn value_of(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_timed_from_its_last_byte_not_cut_off_by_the_upstream_timeout() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let mut c = config(up.addr, &out);
    c.upstream_timeout = Duration::from_millis(500);
    let rec = start(c).await;
    let upload = dir.path().join("up.bin");
    std::fs::write(&upload, pattern(0, 300_000)).unwrap();
    // 300 kB at 200 kB/s: about 1.5 s of upload, three times the upstream's timeout, with
    // bytes moving all along; over HTTP/1.1 (the recorder's own upstream connection) and h2c
    // (hyper's pooled client).
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let echoed = curl(&[
            version,
            "-w",
            " %{http_code}",
            "--limit-rate",
            "200K",
            "--data-binary",
            &format!("@{}", upload.display()),
            &format!("http://{}/echo", rec.addr),
        ])
        .await;
        assert!(echoed.ends_with(" 200"), "{version}: {echoed}");
        assert!(
            echoed.contains("300000"),
            "the upstream had it all: {echoed}"
        );
    }
    rec.stop().await;
    let (records, _) = read_one(&out).unwrap();
    for e in exchanges_in(&records) {
        assert_eq!(e.response.as_ref().unwrap().status, 200);
        assert_eq!(e.request.body.len, 300_000);
    }
}

/// Polls the recorder until a request is in flight; returns the metrics text then.
async fn wait_for_in_flight(rec: &Running) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(rec).await;
        if text.contains("loadtape_requests_in_flight 1") {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request in flight: {text}"
        );
        tokio::task::yield_now().await;
    }
}

async fn scrape(rec: &Running) -> String {
    // The in-process recorder counts on the same metrics the admin endpoint serves.
    match rec.admin {
        Some(a) => curl(&[&format!("http://{a}/metrics")]).await,
        None => panic!("start the recorder with an admin endpoint"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_and_pulls_a_multi_layer_image_through_the_proxy_to_a_real_registry() {
    use common::registry::*;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let out = dir.path().join("tape");
    let rec = start(config(registry.addr, &out)).await;
    // Layers larger than the 64 KiB the tape keeps of a body.
    let image = oci_image(&dir.path().join("image"), &[300_000, 1 << 20, 2_500_000], 7);
    let remote = format!("docker://{}/loadtape/web:v1", rec.addr);
    skopeo_copy(&format!("oci:{}:v1", image.layout.display()), &remote).await;
    let pulled = dir.path().join("pulled");
    skopeo_copy(&remote, &format!("oci:{}:v1", pulled.display())).await;
    let summary = rec.stop().await;

    // The image came back byte for byte.
    let listing = std::fs::read_dir(pulled.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    for digest in image.layers.iter().chain([&image.config, &image.manifest]) {
        assert!(
            listing.iter().any(|d| digest.ends_with(d.as_str())),
            "{digest} not pulled: {listing:?}"
        );
        assert_eq!(
            blob(&pulled, digest),
            blob(&image.layout, digest),
            "blob {digest}"
        );
    }

    // The tape holds every exchange, with the registry's statuses.
    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    assert_eq!(ex.len() as u64, summary.exchanges);
    let mut by_route: std::collections::BTreeMap<String, Vec<u16>> = Default::default();
    for e in &ex {
        let status = e
            .response
            .as_ref()
            .map(|r| r.status)
            .unwrap_or_else(|f| panic!("{f:?}"));
        let route = loadtape::endpoint::template(e.request.method.as_str(), &e.request.target);
        by_route.entry(route).or_default().push(status);
    }
    let statuses = |route: &str| by_route.get(route).cloned().unwrap_or_default();
    assert!(
        statuses("POST /v2/{repo}/blobs/uploads/")
            .iter()
            .all(|s| *s == 202),
        "{by_route:?}"
    );
    let puts = statuses("PUT /v2/{repo}/blobs/uploads/{uuid}");
    assert_eq!(
        puts,
        vec![201; 4],
        "three layers and a config uploaded: {by_route:?}"
    );
    assert_eq!(statuses("PUT /v2/{repo}/manifests/{tag}"), vec![201]);
    let gets = statuses("GET /v2/{repo}/blobs/{digest}");
    assert_eq!(gets, vec![200; 4], "{by_route:?}");
    // Each pulled layer's digest is on the tape, computed as it streamed by.
    for layer in &image.layers {
        let e = ex
            .iter()
            .find(|e| {
                e.request.method.as_str() == "GET" && e.request.target.ends_with(layer.as_str())
            })
            .unwrap();
        let body = &e.response.as_ref().unwrap().body;
        assert_eq!(loadtape::tape::digest_string(&body.sha256.unwrap()), *layer);
        assert_eq!(body.len as usize, blob(&image.layout, layer).len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_records_not_traffic() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=192k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());

    let mut c = config(up.addr, &mnt.join("tapes"));
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    // Small files, so that rotations meet the full disk too.
    c.rotate_size = Some(16 << 10);
    let rec = start(c).await;
    // Incompressible JSON bodies, a new one each time: each keeps 64 KiB on the tape, so the
    // disk fills fast.
    let body = dir.path().join("body.json");
    let mut state = 1u64;
    let url = format!("http://{}/echo", rec.addr);
    for _ in 0..40 {
        let random: String = (0..100_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b'!' + (state >> 58) as u8)
            })
            .filter(|c| *c != '"' && *c != '\\')
            .collect();
        std::fs::write(&body, format!("{{\"pad\": \"{random}\"}}")).unwrap();
        let reply = curl(&[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", body.display()),
            "-w",
            " %{http_code}",
            &url,
        ])
        .await;
        assert!(reply.ends_with(" 200"), "traffic must not suffer: {reply}");
    }
    let metrics = scrape(&rec).await;
    let summary = rec.stop().await;
    assert!(
        summary.tape.dropped > 0,
        "the disk filled, so records were dropped: {summary:?}"
    );
    assert!(
        metrics.contains("# TYPE loadtape_tape_queue_bytes gauge"),
        "{metrics}"
    );
    let dropped_metric = metrics
        .lines()
        .find(|l| l.starts_with("loadtape_tape_write_errors_total"))
        .unwrap();
    assert_ne!(
        dropped_metric, "loadtape_tape_write_errors_total 0",
        "{metrics}"
    );
    // What was written reads back.
    let (records, _) = read_one(&mnt.join("tapes")).unwrap();
    assert!(exchanges_in(&records).len() < 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_upload_is_recorded_as_cut_short_and_the_proxy_goes_on() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    let upload = dir.path().join("big.bin");
    std::fs::write(&upload, pattern(0, 4 << 20)).unwrap();
    // curl gives up after 1.5 s while uploading 4 MiB at 1 MiB/s (long enough for a stalled
    // machine to have sent some of it).
    require("curl", "curl");
    let gave_up = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--limit-rate",
            "1M",
            "--max-time",
            "1.5",
            "--data-binary",
        ])
        .arg(format!("@{}", upload.display()))
        .arg(format!("http://{}/echo", rec.addr))
        .status()
        .await
        .unwrap();
    assert!(!gave_up.success(), "curl was meant to give up mid-upload");
    let next = curl(&[&format!("http://{}/json", rec.addr)]).await;
    assert_eq!(next, "{\"ok\": true}");
    rec.stop().await;
    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    let cut = ex
        .iter()
        .find(|e| e.request.target == "/echo")
        .expect("the cut upload is on the tape");
    assert!(!cut.request.body.complete);
    assert!(
        cut.request.body.len > 0 && cut.request.body.len < 4 << 20,
        "{:?}",
        cut.request.body.len
    );
    // The client went away, not the upstream.
    let failure = cut.response.as_ref().unwrap_err();
    assert_eq!(failure.kind, FailureKind::ClientGone, "{failure:?}");
}

/// Sends `child` SIGTERM, as a pod's stop does, and waits for it to exit.
async fn terminate(mut child: tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the recorder exits after draining")
        .unwrap()
}

/// `loadtape record` run as a user runs it, in front of `upstream`, into `out`, with `args`:
/// the process, its proxy's port, its admin endpoint's (when asked for), and what it logs
/// after its banner.
async fn spawn_recorder(
    upstream: std::net::SocketAddr,
    out: &std::path::Path,
    args: &[&str],
) -> (
    tokio::process::Child,
    u16,
    Option<std::net::SocketAddr>,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    // Any free port; the start banner says which (a port picked by the test could be taken
    // by another test's server before the recorder binds it).
    let mut child = tokio::process::Command::new(common::loadtape_bin())
        .args(["record", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &format!("http://{upstream}")])
        .arg("--out")
        .arg(out)
        .args(args)
        .env("LOADTAPE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find("(listening on ") {
                return line[at..].to_string();
            }
        }
        panic!("loadtape record ended without its banner");
    })
    .await
    .expect("loadtape record did not start");
    // Whatever else it logs goes on being read, so that it never blocks on a full pipe.
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let logged = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            logged.lock().unwrap().push(line);
        }
    });
    let addresses = banner
        .trim_start_matches("(listening on ")
        .trim_end_matches(')');
    let (listening, admin) = match addresses.split_once(", admin on ") {
        Some((l, a)) => (l, Some(a.parse().unwrap())),
        None => (addresses, None),
    };
    let port = (listening.parse::<std::net::SocketAddr>())
        .unwrap_or_else(|_| panic!("no address in {banner:?}"))
        .port();
    (child, port, admin, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_exchange_in_flight_finish_closes_the_tape_and_exits_0() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tapes");
    let (child, port, admin, _) =
        spawn_recorder(up.addr, &out, &["--admin-listen", "127.0.0.1:0"]).await;
    let admin = admin.expect("the banner names the admin endpoint");
    let url = format!("http://127.0.0.1:{port}/slow/1500");
    let slow = tokio::spawn(async move { curl(&["-w", " %{http_code}", &url]).await });
    // Once the upstream has it (the recorder counts it in flight), SIGTERM.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = curl(&[&format!("http://{admin}/metrics")]).await;
        if metrics.contains("loadtape_requests_in_flight 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::task::yield_now().await;
    }
    let exited = tokio::spawn(terminate(child));
    assert_eq!(
        slow.await.unwrap(),
        "slow\n 200",
        "the exchange in flight finished"
    );
    assert_eq!(exited.await.unwrap().code(), Some(0));
    let (records, stats) = read_one(&out).unwrap();
    assert!(stats.files[0].closed, "the tape was closed with its index");
    let ex = exchanges_in(&records);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].response.as_ref().unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_clients_reach_around_the_recorder_is_warned_of_once() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tapes");
    let (child, port, _, log) = spawn_recorder(up.addr, &out, &[]).await;
    // The upstream's realm is at its public name, as Quay's is (SERVER_HOSTNAME): a client
    // that came by that name is fine, one that came by another is not.
    let ping = format!("http://127.0.0.1:{port}/v2/");
    for host in [&["-H", "Host: quay.public.example"][..], &[]] {
        let status =
            curl(&[host, &["-o", "/dev/null", "-w", "%{http_code}", &ping]].concat()).await;
        assert_eq!(status, "401");
    }
    curl(&["-o", "/dev/null", &ping]).await;
    terminate(child).await;
    let log = log.lock().unwrap();
    let warned: Vec<_> = log.iter().filter(|l| l.contains("token realm")).collect();
    assert_eq!(warned.len(), 1, "{log:?}");
    assert!(
        warned[0].contains(&format!("not at 127.0.0.1:{port}")),
        "the client that came by another name: {}",
        warned[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_leaves_a_tape_that_reads_back_without_damage() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tapes");
    let (mut child, port, _, _) = spawn_recorder(up.addr, &out, &[]).await;
    // Four clients, 2,000 requests of 5 ms each, still going when the recorder dies.
    let url = format!("http://127.0.0.1:{port}/slow/5?n=[1-2000]");
    let load: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::process::Command::new("curl")
                .args(["--silent", &url])
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    // Once some frames are on disk, and the clients are not done, kill -9.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        if let Ok((records, _)) = read_one(&out) {
            if !exchanges_in(&records).is_empty() {
                break exchanges_in(&records).len();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the recorder never flushed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let (records, stats) = read_one(&out).expect("a cut tail is not damage");
    assert!(!stats.files[0].closed, "killed: no index was written");
    let ex = exchanges_in(&records);
    assert!(
        ex.len() >= seen && ex.len() < 8000,
        "{} of 8000, {seen} seen",
        ex.len()
    );
    for e in ex {
        assert_eq!(e.response.as_ref().unwrap().status, 200);
    }
    drop(load);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_goes_through_in_bounded_memory() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tapes");
    let (child, port, _, _) = spawn_recorder(up.addr, &out, &[]).await;
    const GIB: u64 = 1 << 30;
    // A layer pushed (streamed from a pipe, chunked) and pulled, through the recorder.
    require("curl", "curl");
    let pushed = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {GIB} /dev/zero | curl --silent --show-error -T - http://127.0.0.1:{port}/sink"
        ))
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&pushed.stdout);
    assert_eq!(said, format!(r#"{{"len": {GIB}}}"#), "{pushed:?}");
    let pulled = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://127.0.0.1:{port}/bytes/{GIB}"),
    ])
    .await;
    assert_eq!(pulled, GIB.to_string());
    // The recorder's peak resident memory: a body held whole would be a gibibyte.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id().unwrap())).unwrap();
    let peak_kib: u64 = (status.lines())
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 256 << 10, "peak resident memory {peak_kib} KiB");
    terminate(child).await;
    let (records, _) = read_one(&out).unwrap();
    let lens: Vec<u64> = exchanges_in(&records)
        .iter()
        .map(|e| {
            e.request
                .body
                .len
                .max(e.response.as_ref().unwrap().body.len)
        })
        .collect();
    assert_eq!(lens, [GIB, GIB], "both recorded with their lengths");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_tape_reads_back_to_its_last_flushed_frame() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tapes");
    let (mut child, port, _, _) = spawn_recorder(up.addr, &out, &[]).await;
    // 50 requests on one connection.
    let urls: Vec<String> = (0..50)
        .map(|i| format!("http://127.0.0.1:{port}/status/{}", 200 + i % 5))
        .collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    curl(&args).await;
    // Frames are flushed at least every second: wait until all 50 are on disk, then kill -9.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let flushed = loop {
        if let Ok((records, _)) = read_one(&out) {
            if exchanges_in(&records).len() == 50 {
                break records;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the recorder never flushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let (records, stats) = read_one(&out).unwrap();
    assert!(!stats.files[0].closed, "killed: no index was written");
    assert_eq!(
        records, flushed,
        "everything flushed before the kill reads back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_head_and_bodiless_statuses_pass_as_http_says() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    let base = format!("http://{}", rec.addr);
    // curl sends `Expect: 100-continue` for bodies over 1 MiB and waits for the 100.
    let upload = dir.path().join("two-mib.bin");
    std::fs::write(&upload, pattern(0, 2 << 20)).unwrap();
    let echoed = curl(&[
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{base}/echo"),
    ])
    .await;
    assert!(echoed.contains(&format!("\"len\":{}", 2 << 20)), "{echoed}");
    let head = curl(&[
        "--head",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("{base}/json"),
    ])
    .await;
    assert_eq!(head, "200");
    for status in ["204", "304"] {
        let got = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &format!("{base}/status/{status}"),
        ])
        .await;
        assert_eq!(got, format!("{status} 0"), "no body with {status}");
    }
    rec.stop().await;
    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    assert_eq!(ex[0].request.body.len, 2 << 20);
    assert!(ex[0].request.body.complete);
    assert_eq!(ex[1].request.method.as_str(), "HEAD");
    for e in &ex[1..] {
        let body = &e.response.as_ref().unwrap().body;
        assert_eq!(
            (body.len, body.complete),
            (0, true),
            "{} {}",
            e.request.method,
            e.request.target
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_request_head_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(up.addr, &dir.path().join("t"));
    c.header_read_timeout = Duration::from_millis(300);
    let rec = start(c).await;
    let mut slow = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
    slow.write_all(b"GET /json HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The proxy answers 408 or closes; either way the read ends well before the test's limit.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow client was never cut off");
    let reply = curl(&[&format!("http://{}/json", rec.addr)]).await;
    assert_eq!(reply, "{\"ok\": true}", "others are served meanwhile");
    rec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_h2c_upstreams_and_a_fixed_upstream_host() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // An https upstream: a TLS-terminating recorder in front of the plain one.
    let (cert, key) = certificate(dir.path());
    let mut front = config(up.addr, &dir.path().join("front"));
    front.tls = Some((cert.clone(), key));
    let front = start(front).await;
    let mut via_tls = config(up.addr, &dir.path().join("via-tls"));
    via_tls.upstream = format!("https://localhost:{}", front.addr.port())
        .parse()
        .unwrap();
    via_tls.upstream_ca = Some(cert.clone());
    via_tls.upstream_host = Some("registry.internal".into());
    let via_tls = start(via_tls).await;
    let echoed = curl(&[&format!("http://{}/echo", via_tls.addr)]).await;
    let echoed: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(echoed["headers"]["host"], "registry.internal", "{echoed}");

    // Without the CA the upstream's certificate is refused: 502, and a TLS failure on tape.
    let mut untrusted = config(up.addr, &dir.path().join("untrusted"));
    untrusted.upstream = format!("https://localhost:{}", front.addr.port())
        .parse()
        .unwrap();
    let untrusted = start(untrusted).await;
    let status = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/json", untrusted.addr),
    ])
    .await;
    assert_eq!(status, "502");

    // h2c by prior knowledge to a plain upstream.
    let mut h2c = config(up.addr, &dir.path().join("h2c"));
    h2c.upstream_h2c = true;
    let h2c = start(h2c).await;
    let echoed = curl(&[&format!("http://{}/echo", h2c.addr)]).await;
    let echoed: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(echoed["version"], "HTTP/2.0", "{echoed}");

    for r in [via_tls, untrusted, h2c, front] {
        r.stop().await;
    }
    let (records, _) = read_one(&dir.path().join("untrusted")).unwrap();
    let failure = exchanges_in(&records)[0]
        .response
        .as_ref()
        .unwrap_err()
        .clone();
    assert_eq!(failure.kind, FailureKind::Tls, "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_passes_through_and_is_noted_on_the_tape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    let mut ws = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: quay.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // After the switch, bytes go both ways untouched.
    ws.write_all(b"frames after the switch").await.unwrap();
    let mut echo = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(10), ws.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"frames after the switch");
    drop(ws);
    rec.stop().await;
    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    assert_eq!(ex[0].response.as_ref().unwrap().status, 101);
    assert!(ex[0].upgraded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_whole_bodies_each_layer_is_stored_once_however_often_it_passes() {
    use common::registry::*;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let out = dir.path().join("tape");
    let mut c = config(registry.addr, &out);
    c.bodies = loadtape::record::BodyCapture::Full;
    let rec = start(c).await;
    let image = oci_image(&dir.path().join("image"), &[200_000, 700_000], 9);
    let remote = format!("docker://{}/loadtape/full:v1", rec.addr);
    skopeo_copy(&format!("oci:{}:v1", image.layout.display()), &remote).await;
    for pull in ["a", "b"] {
        let into = dir.path().join(pull);
        skopeo_copy(&remote, &format!("oci:{}:v1", into.display())).await;
    }
    rec.stop().await;
    assert!(!out.join(".spool").exists(), "the spool is cleaned up");

    let (records, _) = read_one(&out).unwrap();
    let blobs: Vec<&loadtape::tape::Blob> = records
        .iter()
        .filter_map(|r| match r {
            Record::Blob(b) => Some(b.as_ref()),
            _ => None,
        })
        .collect();
    // Two layers: pushed once and pulled twice, stored once each.
    assert_eq!(
        blobs.len(),
        2,
        "{:?}",
        blobs
            .iter()
            .map(|b| loadtape::tape::digest_string(&b.sha256))
            .collect::<Vec<_>>()
    );
    for layer in &image.layers {
        let blob = blobs
            .iter()
            .find(|b| loadtape::tape::digest_string(&b.sha256) == *layer)
            .expect("each layer is a blob");
        assert_eq!(blob.data, common::registry::blob(&image.layout, layer));
        // Every pull of it refers to the blob, which comes first on the tape.
        let position = records
            .iter()
            .position(|r| matches!(r, Record::Blob(b) if b.sha256 == blob.sha256))
            .unwrap();
        let pulls: Vec<usize> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                matches!(r, Record::Exchange(e)
                if e.request.method.as_str() == "GET" && e.request.target.ends_with(layer.as_str()))
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(pulls.len(), 2);
        // And so does the push that uploaded it (its request body).
        let push = records
            .iter()
            .position(|r| matches!(r, Record::Exchange(e) if e.request.body.stored == Stored::Full(blob.sha256)))
            .expect("the upload refers to the blob");
        assert!(position < push, "the blob precedes its upload");
        for i in pulls {
            let Record::Exchange(e) = &records[i] else {
                unreachable!()
            };
            assert_eq!(
                e.response.as_ref().unwrap().body.stored,
                Stored::Full(blob.sha256)
            );
            assert!(
                position < i,
                "the blob precedes the exchanges that refer to it"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_http2_connection_get_their_stream_ids() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(up.addr, &out)).await;
    // nghttp2's client: 6 requests, 3 at a time, multiplexed on one h2c connection.
    require("h2load", "nghttp2-client");
    let run = tokio::process::Command::new("h2load")
        .args(["-n", "6", "-c", "1", "-m", "3"])
        .arg(format!("http://{}/json", rec.addr))
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(report.contains("6 succeeded"), "{report}");
    rec.stop().await;
    let (records, _) = read_one(&out).unwrap();
    let mut streams: Vec<(u32, u64)> = exchanges_in(&records)
        .iter()
        .map(|e| (e.stream, e.connection))
        .collect();
    streams.sort();
    assert_eq!(
        streams.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 3, 5, 7, 9, 11]
    );
    assert!(
        streams.iter().all(|s| s.1 == streams[0].1),
        "one connection"
    );
}

/// 75 requests for `path` (a curl URL pattern) at 50 a second through a recorder made with
/// `with` into `out`: 1.5 s of traffic, so frames flush (every second) with the watermark
/// trailing by 100 ms. Returns the tape file's frame watermarks, checked to hold, and its
/// exchanges, checked to be all there and in order.
async fn steady_traffic(
    with: impl FnOnce(&mut loadtape::record::RecordConfig),
    out: &std::path::Path,
    path: &str,
) -> (Vec<u64>, Vec<loadtape::tape::Exchange>) {
    let up = upstream().await;
    let mut cfg = config(up.addr, out);
    with(&mut cfg);
    let rec = start(cfg).await;
    let url = format!("http://{}{path}", rec.addr);
    curl(&["--rate", "50/s", "-o", "/dev/null", &url]).await;
    rec.stop().await;
    let file = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "tape"))
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    assert!(
        assert_watermarks_hold(&bytes) > 0,
        "no frame says which exchanges are all written: {:?}",
        frame_watermarks(&bytes)
    );
    let (records, stats) = read_one(out).unwrap();
    assert_eq!(stats.out_of_order, 0);
    let exchanges: Vec<_> = exchanges_in(&records).into_iter().cloned().collect();
    assert_eq!(exchanges.len(), 75);
    (frame_watermarks(&bytes), exchanges)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_tapes_carry_frame_watermarks_that_hold() {
    let dir = tempfile::tempdir().unwrap();
    steady_traffic(|_| {}, &dir.path().join("tape"), "/json?n=[1-75]").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_dealt_evenly_to_the_proxy_threads() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(up.addr, &dir.path().join("t"));
    c.threads = 3;
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let rec = start(c).await;
    // Nine clients, one connection each, all open at once: left to the kernel, whichever thread
    // woke first would take them in bursts.
    let url = format!("http://{}/json", rec.addr);
    let clients: Vec<_> = (0..9)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { curl(&["-w", " %{http_code}", &url]).await })
        })
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), "{\"ok\": true} 200");
    }
    let metrics = scrape(&rec).await;
    for thread in 0..3 {
        let line = format!("loadtape_connections_total{{thread=\"{thread}\"}} 3");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert_eq!(rec.stop().await.exchanges, 9);
}

/// How a [`raw_upstream`] treats each connection.
#[derive(Clone, Copy, PartialEq)]
enum Raw {
    /// Answers `ok` to every request.
    KeepAlive,
    /// Answers one request with `Connection: close` and closes, as an upstream ending its
    /// keep-alive does (one that closes without a word races the next request on the wire, for
    /// any HTTP/1.1 client).
    CloseAfterEach,
    /// Answers the first request and resets the connection under the second, without a byte of
    /// answer: what a client sees when the upstream closes an idle keep-alive connection just as
    /// a request goes out on it.
    ResetSecond,
    /// Refuses an upload with a 413 as soon as its head is read, and reads none of its body.
    RefuseUploads,
    /// Answers one request, without `Connection: close`, and closes: an upstream that ends a
    /// kept connection at once (a worker recycled) without saying so.
    CloseSilently,
    /// Answers by path in the shapes HTTP/1.1 allows beyond a plain length: an interim 103
    /// first, a chunked body with a chunk extension and a trailer, a HEAD's length without a
    /// body, a 204, and an HTTP/1.0 body that ends with the connection; and echoes a chunked
    /// request body as it came, its chunks and trailers.
    Shapes,
}

/// A plain HTTP/1.1 upstream that counts the connections it is given.
async fn raw_upstream(how: Raw) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for n in 0.. {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => buf.extend_from_slice(&chunk[..read]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    if how == Raw::RefuseUploads {
                        let refusal =
                            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big\n";
                        let _ = stream.write_all(refusal).await;
                        // Keeps the connection, reading nothing more.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    if how == Raw::Shapes {
                        let path = head.split(' ').nth(1).unwrap_or("");
                        if path == "/echo-chunked" {
                            // The chunked body as it came, to its empty line after the trailers.
                            while !buf.ends_with(b"\r\n\r\n") {
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(read) => buf.extend_from_slice(&chunk[..read]),
                                }
                            }
                            let head =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", buf.len());
                            let echo = [head.as_bytes(), &buf].concat();
                            buf.clear();
                            if stream.write_all(&echo).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let answer: &[u8] = match path {
                            "/interim" => b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
                            "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;name=value\r\nabc\r\n3\r\nde\n\r\n0\r\nx-checksum: 1\r\n\r\n",
                            "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
                            "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
                            "/hop" => b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret-Hop\r\nKeep-Alive: timeout=5\r\nX-Secret-Hop: 1\r\nX-End: 1\r\ncontent-length: 3\r\n\r\nok\n",
                            "/both" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n6\r\nabcde\n\r\n0\r\n\r\n",
                            "/conflict" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok\n",
                            "/gzip" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n",
                            "/plus" => b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nok\n",
                            "/repeated" => b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\nok\n",
                            "/switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
                            _ => b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end\n",
                        };
                        let ends = !matches!(
                            path,
                            "/interim" | "/chunked" | "/head" | "/empty" | "/hop" | "/both"
                        );
                        if stream.write_all(answer).await.is_err() || ends {
                            return;
                        }
                        continue;
                    }
                    if how == Raw::ResetSecond && n == 1 {
                        let _ = stream.set_zero_linger();
                        return;
                    }
                    if how == Raw::CloseSilently {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                            .await;
                        return;
                    }
                    let answer: &[u8] = if how == Raw::CloseAfterEach {
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nok\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
                    };
                    if stream.write_all(answer).await.is_err() || how == Raw::CloseAfterEach {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_refuses_early_gets_its_answer_not_a_timeout() {
    let (upstream, _) = raw_upstream(Raw::RefuseUploads).await;
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("big.bin");
    std::fs::write(&upload, pattern(0, 32 << 20)).unwrap();
    let out = dir.path().join("t");
    let mut c = config(upstream, &out);
    // Far beyond the test's own limit: a proxy that waited for the upstream to read the
    // whole body would answer 504 only after it.
    c.upstream_timeout = Duration::from_secs(120);
    let rec = start(c).await;
    require("curl", "curl");
    let refused = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .args(["--max-time", "30", "--data-binary"])
        .arg(format!("@{}", upload.display()))
        .arg(format!("http://{}/v2/org/app/blobs/uploads/x", rec.addr))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "413");
    rec.stop().await;
    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    assert_eq!(ex[0].response.as_ref().unwrap().status, 413);
    assert!(ex[0].request.body.len < 32 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_framed_every_way_http_1_1_allows_pass_whole_and_keep_the_connection() {
    let (upstream, connections) = raw_upstream(Raw::Shapes).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(upstream, &out)).await;
    let base = format!("http://{}", rec.addr);
    // One client connection: the interim response is passed over, the chunked bodies end
    // where their last chunk says, a HEAD's and a 204's answers have no body; all on one
    // upstream connection.
    let got = curl(&[
        &format!("{base}/interim"),
        &format!("{base}/chunked"),
        &format!("{base}/empty"),
        &format!("{base}/chunked"),
    ])
    .await;
    assert_eq!(got, "ok\nabcde\nabcde\n");
    let head = curl(&["--head", &format!("{base}/head")]).await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 100"),
        "{head}"
    );
    // The fields of the upstream's connection stay behind, and those its Connection names.
    let shown = curl(&["--include", &format!("{base}/hop")]).await;
    // The rest as the upstream wrote them, names in its case.
    assert!(shown.contains("\r\nX-End: 1\r\n"), "{shown}");
    let shown = shown.to_ascii_lowercase();
    assert!(
        shown.contains("x-end: 1") && shown.ends_with("ok\n"),
        "{shown}"
    );
    assert!(
        !shown.contains("x-secret-hop") && !shown.contains("keep-alive"),
        "{shown}"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    // A body that ends with its connection: whole, and the next request opens another.
    let got = curl(&[&format!("{base}/until-close"), &format!("{base}/chunked")]).await;
    assert_eq!(got, "until the end\nabcde\n");
    assert_eq!(connections.load(Ordering::SeqCst), 5);
    // A length beside a transfer coding is not passed on (the coding frames the body); lengths
    // that disagree are an answer no proxy can pass on: 502.
    let both = curl(&["--include", &format!("{base}/both")])
        .await
        .to_ascii_lowercase();
    assert!(both.ends_with("\r\n\r\nabcde\n"), "{both}");
    assert!(!both.contains("content-length: 2"), "{both}");
    let conflict = curl(&["--write-out", " %{http_code}", &format!("{base}/conflict")]).await;
    assert!(conflict.ends_with(" 502"), "{conflict}");
    // Nor a coding this proxy does not decode (the client would get it still coded), nor a
    // length that is not digits; one value repeated is that value.
    for bad in ["gzip", "plus"] {
        let got = curl(&["--write-out", " %{http_code}", &format!("{base}/{bad}")]).await;
        assert!(got.ends_with(" 502"), "{bad}: {got}");
    }
    let repeated = curl(&[&format!("{base}/repeated")]).await;
    assert_eq!(repeated, "ok\n");
    rec.stop().await;

    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    let answers: Vec<(&str, u16, Option<&[u8]>, bool)> = ex[..9]
        .iter()
        .map(|e| {
            let r = e.response.as_ref().unwrap();
            (
                e.request.target.as_str(),
                r.status,
                r.body.whole_inline(),
                r.body.complete,
            )
        })
        .collect();
    assert_eq!(
        answers,
        [
            ("/interim", 200, Some(&b"ok\n"[..]), true),
            ("/chunked", 200, Some(&b"abcde\n"[..]), true),
            ("/empty", 204, None, true),
            ("/chunked", 200, Some(&b"abcde\n"[..]), true),
            ("/head", 200, None, true),
            ("/hop", 200, Some(&b"ok\n"[..]), true),
            ("/until-close", 200, Some(&b"until the end\n"[..]), true),
            ("/chunked", 200, Some(&b"abcde\n"[..]), true),
            ("/both", 200, Some(&b"abcde\n"[..]), true),
        ]
    );
    assert_eq!(ex.len(), 13);
    let hop = ex.iter().find(|e| e.request.target == "/hop").unwrap();
    let fields = &hop.response.as_ref().unwrap().headers;
    assert_eq!(fields.get_str("x-end"), Some("1"), "stored lowercase");
    assert!(fields.get("x-secret-hop").is_none() && fields.get("keep-alive").is_none());
    assert_eq!(ex[9].request.target, "/conflict");
    assert!(ex[9].response.is_err(), "{:?}", ex[9].response);
    assert!(ex[10].response.is_err() && ex[11].response.is_err());
    assert_eq!(ex[12].response.as_ref().unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_fields_pass_on_where_the_next_hop_can_carry_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (raw, _) = raw_upstream(Raw::Shapes).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let rec = start(config(raw, &out)).await;
    let base = format!("http://{}", rec.addr);
    // A response's, to an HTTP/1.1 client: curl shows the chunked coding as it came.
    let raw = curl(&["--raw", &format!("{base}/chunked")]).await;
    assert!(raw.ends_with("\r\n0\r\nx-checksum: 1\r\n\r\n"), "{raw:?}");
    // To an HTTP/1.0 client the body is not chunked: nowhere to put them.
    let old = curl(&["--http1.0", "--raw", &format!("{base}/chunked")]).await;
    assert_eq!(old, "abcde\n");
    // To an HTTP/2 client, in a HEADERS frame after the data (HTTP/2 clients' requests go
    // through hyper's pooled client: the decoder here is not on this path, the wiring is).
    let h2 = curl(&[
        "--http2-prior-knowledge",
        "--include",
        &format!("{base}/chunked"),
    ])
    .await;
    assert!(h2.starts_with("HTTP/2 200"), "{h2}");
    assert!(
        h2.contains("abcde\n") && h2.contains("x-checksum: 1"),
        "{h2}"
    );

    // A request's, to the upstream; one about the connection stays behind.
    let mut client = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
    client
        .write_all(
            b"POST /echo-chunked HTTP/1.1\r\nhost: quay\r\ntransfer-encoding: chunked\r\n\
              connection: close\r\n\r\n5\r\nhello\r\n0\r\nx-digest: sha256:ab\r\n\
              keep-alive: timeout=5\r\n\r\n",
        )
        .await
        .unwrap();
    let mut echoed = Vec::new();
    client.read_to_end(&mut echoed).await.unwrap();
    let echoed = String::from_utf8_lossy(&echoed);
    assert!(echoed.starts_with("HTTP/1.1 200"), "{echoed}");
    assert!(
        echoed.ends_with("\r\n\r\n5\r\nhello\r\n0\r\nx-digest: sha256:ab\r\n\r\n"),
        "{echoed:?}"
    );
    rec.stop().await;

    // The tape has the bodies, not the trailers.
    let (records, _) = read_one(&out).unwrap();
    let ex = exchanges_in(&records);
    assert_eq!(ex.len(), 4);
    for e in &ex[..3] {
        let body = &e.response.as_ref().unwrap().body;
        assert_eq!(body.whole_inline(), Some(&b"abcde\n"[..]));
    }
    assert_eq!(ex[3].request.body.whole_inline(), Some(&b"hello"[..]));

    // An HTTP/1.1 client's, read by the recorder, to an HTTP/2 upstream (h2c); none that the
    // head's rules would have replaced or kept out (a next hop may merge trailers into it).
    let up = upstream().await;
    let mut h2c = config(up.addr, &dir.path().join("h2c"));
    h2c.upstream_h2c = true;
    let rec = start(h2c).await;
    let mut client = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
    client
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: quay\r\ntransfer-encoding: chunked\r\n\
              connection: close\r\n\r\n5\r\nhello\r\n0\r\nx-digest: sha256:ab\r\n\
              authorization: Bearer x\r\nx-forwarded-for: 127.0.0.1\r\nhost: elsewhere\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    // The JSON, whatever framing the answer came in.
    let json = &answer[answer.find('{').unwrap_or(0)..=answer.rfind('}').unwrap_or(0)];
    let echoed: serde_json::Value = serde_json::from_str(json).expect(&answer);
    assert_eq!(echoed["version"], "HTTP/2.0", "{echoed}");
    assert_eq!(echoed["len"], 5, "{echoed}");
    assert_eq!(
        echoed["trailers"],
        serde_json::json!({"x-digest": "sha256:ab"}),
        "{echoed}"
    );
    rec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_upstream_closed_at_once_is_not_used_again() {
    let (upstream, connections) = raw_upstream(Raw::CloseSilently).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(upstream, &dir.path().join("t"))).await;
    let base = format!("http://{}", rec.addr);
    // Right after the first answer, well within the time an idle connection is suspected:
    // the close is seen before the second request goes (or it is lost before any answer and
    // sent again).
    let got = curl(&[
        &format!("{base}/a"),
        &format!("{base}/b"),
        &format!("{base}/c"),
    ])
    .await;
    assert_eq!(got, "ok\nok\nok\n");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    rec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_connection_has_its_upstream_connection_reopened_when_the_upstream_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    for close_idle in [false, true] {
        let how = if close_idle {
            Raw::CloseAfterEach
        } else {
            Raw::KeepAlive
        };
        let (up, connections) = raw_upstream(how).await;
        let rec = start(config(up, &dir.path().join(format!("t{close_idle}")))).await;
        // Two clients, each sending 20 requests on one keep-alive connection.
        let url = format!("http://{}/n", rec.addr);
        let mut args = vec!["-w", "code:%{http_code} %{num_connects}\n"];
        args.extend(std::iter::repeat(url.as_str()).take(20));
        for _ in 0..2 {
            let out = curl(&args).await;
            let lines: Vec<&str> = out
                .lines()
                .filter_map(|l| l.strip_prefix("code:"))
                .collect();
            assert_eq!(lines.len(), 20, "{out}");
            assert_eq!(lines[0], "200 1", "{out}");
            assert!(
                lines[1..].iter().all(|l| *l == "200 0"),
                "one client connection: {out}"
            );
        }
        let expected = if close_idle { 40 } else { 2 };
        assert_eq!(
            connections.load(Ordering::SeqCst),
            expected,
            "upstream connections (upstream closing idle ones: {close_idle})"
        );
        assert_eq!(rec.stop().await.exchanges, 40);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_not_a_host_gets_a_400_and_never_reaches_the_upstream() {
    let (up, connections) = raw_upstream(Raw::KeepAlive).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(up, &dir.path().join("t"))).await;
    let url = format!("http://{}/v2/", rec.addr);
    let bad = curl(&["-H", "Host: quay/x", "-w", " %{http_code}", &url]).await;
    assert!(bad.ends_with(" 400"), "{bad}");
    assert!(bad.contains("not a host[:port]"), "{bad}");
    let good = curl(&["-H", "Host: quay:8443", "-w", " %{http_code}", &url]).await;
    assert_eq!(good, "ok\n 200");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "only the good one went upstream"
    );
    rec.stop().await;
}

/// Sends `request` on `stream` and reads the answer's status line and the rest up to `ok\n`
/// or the end of the connection.
async fn exchange_raw(stream: &mut tokio::net::TcpStream, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.ends_with(b"ok\n") && !got.ends_with(b"\n\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        if got.starts_with(b"HTTP/1.1 502") && got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_lost_with_an_idle_upstream_connection_is_resent_and_a_post_is_not() {
    let (up, connections) = raw_upstream(Raw::ResetSecond).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(up, &dir.path().join("t"))).await;
    // A bodiless PUT is not sent twice either: a registry's completes an upload.
    for (method, resent) in [("GET", true), ("POST", false), ("PUT", false)] {
        let before = connections.load(Ordering::SeqCst);
        let mut client = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
        let request = format!("{method} /x HTTP/1.1\r\nhost: quay\r\ncontent-length: 0\r\n\r\n");
        let first = exchange_raw(&mut client, &request).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        // Idle long enough that the upstream might have closed the connection: the scenario,
        // not a synchronisation.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let second = exchange_raw(&mut client, &request).await;
        if resent {
            assert!(second.starts_with("HTTP/1.1 200"), "{method}: {second}");
            assert_eq!(connections.load(Ordering::SeqCst) - before, 2, "{method}");
        } else {
            // Never sent twice: the upstream may have acted on it.
            assert!(second.starts_with("HTTP/1.1 502"), "{method}: {second}");
            assert_eq!(connections.load(Ordering::SeqCst) - before, 1, "{method}");
        }
    }
    rec.stop().await;
}

/// Sends `request` on a fresh connection to `addr` and reads until the proxy closes it.
async fn until_closed(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| {
            let sent = String::from_utf8_lossy(&request[..request.len().min(200)]);
            panic!("the proxy never closed the connection after {sent:?}: got {got:?}")
        })
        .unwrap();
    String::from_utf8_lossy(&got).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_get_pipelined_answers_in_order_and_bad_heads_a_400_or_431() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(up.addr, &dir.path().join("t"))).await;
    // Two requests at once: two answers in order, then the close the second asked for.
    let both = until_closed(
        rec.addr,
        b"GET /json HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert_eq!(both.matches("http/1.1 200").count(), 2, "{both}");
    let json = both.find("{\"ok\": true}").expect("the first answer");
    let echo = both.find("\"len\":3").expect("the second answer");
    assert!(json < echo, "{both}");
    assert!(both.contains("connection: close"), "{both}");
    // HTTP/1.0 closes unless it asks to keep the connection.
    let old = until_closed(rec.addr, b"GET /json HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(
        old.starts_with("http/1.1 200") && old.ends_with("{\"ok\": true}"),
        "{old}"
    );
    let kept = until_closed(
        rec.addr,
        b"GET /json HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\nGET /json HTTP/1.0\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(kept.matches("{\"ok\": true}").count(), 2, "{kept}");
    assert!(kept.contains("connection: keep-alive"), "{kept}");
    // A length beside chunked gives way to it, and the connection is not trusted further.
    let smuggled = until_closed(
        rec.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /json HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(smuggled.contains("\"len\":3"), "{smuggled}");
    assert!(smuggled.contains("connection: close"), "{smuggled}");
    assert!(!smuggled.contains("{\"ok\": true}"), "{smuggled}");
    // What cannot be read safely is refused, with a body that says why.
    let big = format!(
        "GET /json HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(410 << 10)
    );
    for (request, status, why) in [
        (
            "GET /json HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            "400",
            "malformed",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "400",
            "chunked",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
            "400",
            "content-length",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
            "400",
            "content-length list",
        ),
        (
            "POST /echo HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "400",
            "http/1.0",
        ),
        (big.as_str(), "431", "larger than"),
    ] {
        let got = until_closed(rec.addr, request.as_bytes()).await;
        assert!(
            got.starts_with(&format!("http/1.1 {status} ")),
            "{request:.60}: {got}"
        );
        assert!(
            got.contains(why) && got.contains("\r\ndate: "),
            "{request:.60}: {got}"
        );
    }
    rec.stop().await;
    let (records, _) = read_one(&dir.path().join("t")).unwrap();
    let targets: Vec<_> = exchanges_in(&records)
        .iter()
        .map(|e| format!("{} {}", e.request.method, e.request.target))
        .collect();
    assert_eq!(
        targets,
        [
            "GET /json",
            "POST /echo",
            "GET /json",
            "GET /json",
            "GET /json",
            "POST /echo"
        ],
        "refused requests never reach the tape"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_is_served_by_the_recorders_loop_large_body_then_the_next_answer() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let mut c = config(up.addr, &dir.path().join("t"));
    c.tls = Some((cert.clone(), key));
    let rec = start(c).await;
    let port = rec.addr.port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    // HTTP/1.1 over TLS is served by the recorder's own loop (HTTP/2 by ALPN goes to hyper):
    // a body larger than both sockets' buffers, read slowly, then a second answer on the same
    // connection.
    let got = curl(&[
        "--http1.1",
        "--cacert",
        cert.to_str().unwrap(),
        "--resolve",
        &resolve,
        "--limit-rate",
        "32M",
        "-w",
        "%{size_download} %{http_version} %{num_connects}\n",
        "-o",
        "/dev/null",
        &format!("https://localhost:{port}/bytes/{}", 8 << 20),
        "-o",
        "/dev/null",
        &format!("https://localhost:{port}/json"),
    ])
    .await;
    assert_eq!(got, format!("{} 1.1 1\n12 1.1 0\n", 8 << 20));
    rec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_the_client_did_not_ask_for_ends_its_connection() {
    let (up, _) = raw_upstream(Raw::Shapes).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(up, &dir.path().join("t"))).await;
    // What follows a 101 is no longer HTTP/1.1: the second request is never read as one.
    let got = until_closed(
        rec.addr,
        b"GET /switch HTTP/1.1\r\nHost: x\r\n\r\nGET /head HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("http/1.1 101 "), "{got}");
    assert_eq!(got.matches("http/1.1 ").count(), 1, "{got}");
    rec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_invited_with_100_continue_only_when_it_is_wanted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let rec = start(config(up.addr, &dir.path().join("t"))).await;
    // Answered by the recorder itself (a Host that is not one): the body is never asked for.
    let refused = until_closed(
        rec.addr,
        b"POST /echo HTTP/1.1\r\nHost: quay/x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("http/1.1 400 "), "{refused}");
    assert!(!refused.contains("100 continue"), "{refused}");
    // Forwarded: the client hears 100 Continue before it sends the body.
    let mut client = tokio::net::TcpStream::connect(rec.addr).await.unwrap();
    client
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut byte))
            .await
            .expect("an interim answer")
            .unwrap();
        assert_eq!(n, 1, "closed before an interim answer: {interim:?}");
        interim.push(byte[0]);
    }
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the answer")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200 ") && rest.contains("\"len\":5"),
        "{rest}"
    );
    rec.stop().await;
}

/// `--sample` keeps its fraction of the requests each thread takes (it used to stop recording
/// at the first request it thinned), and the ids of exchanges and connections recorded by
/// different threads never collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_its_fraction_and_ids_stay_unique_across_threads() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let mut cfg = config(up.addr, &out);
    cfg.sample = 0.5;
    cfg.threads = 2;
    let rec = start(cfg).await;
    // Two clients at once, 100 requests each on one connection: connections are dealt to the
    // threads in turn.
    let urls: Vec<String> = (0..100)
        .map(|i| format!("http://{}/json?n={i}", rec.addr))
        .collect();
    let args: Vec<&str> = ["-o", "/dev/null"]
        .into_iter()
        .chain(urls.iter().map(String::as_str))
        .collect();
    tokio::join!(curl(&args), curl(&args));
    let summary = rec.stop().await;
    assert!(
        (60..=140).contains(&summary.exchanges),
        "{} of 200 requests recorded at --sample 0.5",
        summary.exchanges
    );
    let (records, _) = read_one(&out).unwrap();
    let exchanges = exchanges_in(&records);
    assert_eq!(exchanges.len() as u64, summary.exchanges);
    let mut ids: Vec<u64> = exchanges.iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), exchanges.len(), "exchange ids are unique");
    let opened: Vec<u64> = (records.iter())
        .filter_map(|r| match r {
            Record::ConnectionOpened(c) => Some(c.id),
            _ => None,
        })
        .collect();
    assert_eq!(opened.len(), 2);
    assert_ne!(opened[0], opened[1], "connection ids are unique");
    let used: std::collections::BTreeSet<u64> = exchanges.iter().map(|e| e.connection).collect();
    assert_eq!(used.len(), 2, "both clients' requests were sampled");
    assert!(used.iter().all(|c| opened.contains(c)));
}

/// With `--bodies full`, an exchange whose body was spooled reaches the tape through the spool
/// thread, after its blob: it must still settle on the lane it was announced on, or the frames'
/// watermark would stop at it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_exchanges_keep_the_watermark_moving() {
    let dir = tempfile::tempdir().unwrap();
    // Responses too big to keep inline: every one spooled, its blob stored.
    let full =
        |c: &mut loadtape::record::RecordConfig| c.bodies = loadtape::record::BodyCapture::Full;
    let out = dir.path().join("tape");
    let (watermarks, exchanges) = steady_traffic(full, &out, "/bytes/100000?n=[1-75]").await;
    assert!(exchanges
        .iter()
        .all(|e| matches!(e.response.as_ref().unwrap().body.stored, Stored::Full(_))));
    // The first exchange settled: the last watermark passed it, 1.5 s of traffic later.
    let last = *watermarks.last().unwrap();
    assert!(
        last > exchanges[0].timing.start,
        "the watermark stayed at {last}, before the first exchange ({})",
        exchanges[0].timing.start
    );
}
