//! The tape format as a user of the library meets it: what is written reads back, damage is
//! found and located, cuts are survived, old files stay readable.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;
use loadtape::tape::format::FORMAT_VERSION;
use loadtape::tape::*;
use proptest::prelude::*;

fn arb_redaction() -> impl Strategy<Value = Redaction> {
    (
        prop_oneof![
            Just(SecretKind::Basic),
            Just(SecretKind::Bearer),
            Just(SecretKind::BearerJwt),
            Just(SecretKind::Cookie)
        ],
        any::<u32>(),
        any::<u64>(),
        proptest::option::of(("[a-z]{0,6}", any::<i64>())),
    )
        .prop_map(|(kind, len, fingerprint, jwt)| Redaction {
            kind,
            len,
            fingerprint,
            jwt: jwt.map(|(iss, iat)| JwtInfo {
                issuer: Some(iss),
                issued_at: Some(iat),
                expires_at: None,
            }),
        })
}

/// Heads marked shared, as the recorder's are: more than the head cache holds, so that long
/// runs of records push some out of it.
static SHARED_HEADS: std::sync::LazyLock<Vec<Headers>> =
    std::sync::LazyLock::new(|| shared_heads(codec::HEAD_SLOTS + 8));

fn arb_headers() -> impl Strategy<Value = Headers> {
    prop_oneof![
        3 => arb_fresh_headers(),
        2 => (0..SHARED_HEADS.len()).prop_map(|i| SHARED_HEADS[i].clone()),
    ]
}

fn arb_fresh_headers() -> impl Strategy<Value = Headers> {
    proptest::collection::vec(
        (
            prop_oneof![
                Just("content-type".to_string()),
                Just("Docker-Upload-UUID".to_string()),
                "[a-z0-9-]{1,12}"
            ],
            proptest::collection::vec(any::<u8>(), 0..24),
            proptest::option::of(arb_redaction()),
        ),
        0..6,
    )
    .prop_map(|v| {
        let mut h = Headers::new();
        for (name, value, redaction) in v {
            match redaction {
                Some(r) => h.push_redacted(&name, r),
                None => h.push(&name, value),
            }
        }
        h
    })
}

/// Stored bodies that repeat, as a registry's manifests and errors do: one too short to be
/// referred to, two that differ only in their last byte.
const REPEATED_BODIES: [&[u8]; 4] = [
    b"{\"schemaVersion\":2,\"layers\":[]}",
    b"{\"schemaVersion\":2,\"layers\":[1]}",
    b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
    b"short",
];

fn arb_body() -> impl Strategy<Value = Body> {
    (
        any::<u64>(),
        proptest::option::of(any::<[u8; 32]>()),
        prop_oneof![
            Just(Stored::None),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Stored::Prefix),
            (0..REPEATED_BODIES.len()).prop_map(|i| Stored::Prefix(REPEATED_BODIES[i].to_vec())),
            any::<[u8; 32]>().prop_map(Stored::Full),
        ],
        any::<bool>(),
    )
        .prop_map(|(len, sha256, stored, complete)| Body {
            len,
            sha256,
            stored,
            complete,
        })
}

fn arb_exchange(start: u64) -> impl Strategy<Value = Record> {
    let method = prop_oneof![
        Just(Method::Get),
        Just(Method::Head),
        Just(Method::Patch),
        "[A-Z]{3,9}".prop_map(Method::Other)
    ];
    let response = prop_oneof![
        (100u16..600, arb_headers(), arb_body()).prop_map(|(status, headers, body)| Ok(Response {
            status,
            version: HttpVersion::H2,
            headers,
            body,
        })),
        "[a-z ]{0,20}".prop_map(|detail| Err(UpstreamFailure {
            kind: FailureKind::Reset,
            detail,
        })),
    ];
    (
        any::<u64>(),
        any::<u32>(),
        proptest::option::of((any::<u32>(), any::<u16>())),
        (
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            any::<u32>(),
        ),
        method,
        "[a-z0-9.:]{0,20}",
        "/[ -~]{0,60}",
        arb_headers(),
        arb_body(),
        response,
        proptest::collection::vec(arb_redaction(), 0..2),
    )
        .prop_map(
            move |(
                id,
                stream,
                client,
                (done, head, end),
                method,
                authority,
                target,
                headers,
                body,
                response,
                issued,
            )| {
                Record::Exchange(Box::new(Exchange {
                    id,
                    connection: id / 3,
                    stream,
                    client: client.map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
                    timing: Timing {
                        start,
                        request_done: done as u64,
                        response_head: head.map(u64::from),
                        response_done: end as u64,
                    },
                    request: Request {
                        method,
                        scheme: Scheme::Https,
                        authority,
                        target,
                        version: HttpVersion::Http11,
                        headers,
                        body,
                    },
                    response,
                    issued_secrets: issued,
                    upgraded: id % 7 == 0,
                }))
            },
        )
}

fn arb_record(index: usize) -> impl Strategy<Value = Record> {
    (0u64..1_000_000_000_000).prop_flat_map(move |start| {
        prop_oneof![
            4 => arb_exchange(start),
            1 => (any::<u64>(), any::<bool>()).prop_map(move |(id, tls)| Record::ConnectionOpened(Box::new(ConnectionOpened {
                id,
                at: start,
                client: None,
                version: HttpVersion::H2,
                tls: tls.then(|| TlsInfo { protocol: "TLSv1.3".into(), alpn: Some("h2".into()), server_name: None }),
            }))),
            1 => any::<u64>().prop_map(move |id| Record::ConnectionClosed(Box::new(ConnectionClosed {
                id,
                at: start,
                reason: CloseReason::Error("reset".into()),
                exchanges: id % 5,
            }))),
            1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(move |data| {
                // Blobs are content-addressed: a distinct address per generated blob.
                let mut sha256 = [0u8; 32];
                sha256[..8].copy_from_slice(&(index as u64).to_le_bytes());
                Record::Blob(Box::new(Blob { at: start, sha256, data }))
            }),
            1 => (any::<u64>(), any::<u64>()).prop_map(move |(records, bytes)| Record::Dropped(Dropped { at: start, records, bytes })),
            1 => (any::<u64>(), any::<u32>(), any::<Option<u16>>(), any::<bool>()).prop_map(move |(n, flags, status, failed)| {
                Record::Replayed(Box::new(Replayed {
                    source: flags % 3,
                    exchange: n,
                    connection: n / 7,
                    pass: flags % 2,
                    method: if failed { Method::Other("PROPFIND".into()) } else { Method::Put },
                    endpoint: "PUT /v2/{repo}/blobs/uploads/{uuid}".into(),
                    intended: start,
                    dispatched: n % 10_000,
                    sent: n % 1_000_000,
                    connect: status.map(u64::from),
                    tls: None,
                    first_byte: Some(n >> 20),
                    done: n >> 16,
                    outcome: if failed {
                        Outcome::Failed(UpstreamFailure { kind: FailureKind::Refused, detail: "connection refused".into() })
                    } else {
                        Outcome::Status(status.unwrap_or(201))
                    },
                    bytes_sent: n,
                    bytes_received: n / 3,
                    recorded: RecordedOutcome { status, first_byte: None, total: n % 77 },
                    flags,
                    divergence: (flags % 4 == 0).then(|| Box::new(Divergence {
                        target: format!("/v2/app/blobs/uploads/{n}"),
                        body: b"{\"errors\":[]}".to_vec(),
                    })),
                }))
            }),
        ]
    })
}

fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    (0usize..40).prop_flat_map(|n| (0..n).map(arb_record).collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_records_round_trip_in_start_order(records in arb_records(), frame_bytes in 64usize..4096) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tape");
        let options = WriterOptions { frame_bytes, ..WriterOptions::default() };
        write(&path, &records, options, false);
        let read_options = ReadOptions { reorder_window: u64::MAX, ..ReadOptions::default() };
        let (back, stats) = read(&[path], &read_options).unwrap();
        let mut expected = records.clone();
        expected.sort_by_key(|r| r.start());
        prop_assert_eq!(back, expected);
        prop_assert_eq!(stats.out_of_order, 0);
        prop_assert!(stats.files[0].closed);
    }
}

#[test]
fn a_tape_cut_at_every_byte_reads_its_whole_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.tape");
    let records = exchanges(30, 1);
    write(&path, &records, small_frames(), true);
    let bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    let counts = frame_records(&bytes);
    assert!(
        ends.len() >= 4,
        "the test wants several frames, got {}",
        ends.len()
    );
    let header_end = {
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        16 + header_len + 4
    };
    let cut_path = dir.path().join("cut.tape");
    for cut in 0..bytes.len() {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let result = read_one(&cut_path);
        if cut < header_end {
            let err = result.expect_err("a file without its header is an error");
            let msg = err.to_string();
            assert!(
                msg.contains("cut.tape"),
                "the message names the file: {msg}"
            );
            continue;
        }
        let (back, stats) = result.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let whole = ends.iter().filter(|&&e| e <= cut).count();
        let expected: usize = counts[..whole].iter().sum();
        assert_eq!(back.len(), expected, "cut at {cut}");
        assert_eq!(back[..], records[..expected], "cut at {cut}");
        let at_boundary = cut == header_end || ends.contains(&cut);
        let file = &stats.files[0];
        if at_boundary {
            assert!(
                file.truncated.is_none(),
                "cut at {cut} falls between frames"
            );
        } else {
            let t = file
                .truncated
                .as_ref()
                .unwrap_or_else(|| panic!("cut at {cut} is not reported"));
            let frame_start = if whole == 0 {
                header_end
            } else {
                ends[whole - 1]
            };
            assert_eq!(t.offset as usize, frame_start.min(cut), "cut at {cut}");
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_is_caught_and_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.tape");
    write(&path, &exchanges(12, 2), small_frames(), true);
    let bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let header_end = 16 + header_len + 4;
    let flipped = dir.path().join("flipped.tape");
    for i in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[i] ^= 1 << (i % 8);
        std::fs::write(&flipped, &damaged).unwrap();
        let err = match read_one(&flipped) {
            Ok((records, _)) => panic!(
                "flip at byte {i} went unnoticed ({} records read)",
                records.len()
            ),
            Err(e) => e,
        };
        if i < header_end {
            continue; // any error will do: magic, version, length and checksum all guard it
        }
        let TapeError::Corrupt { offset, .. } = &err else {
            panic!("flip at byte {i}: expected corruption, got {err}");
        };
        // The error names the start of the frame (or the index) that holds the flipped byte.
        let start = std::iter::once(header_end)
            .chain(ends.iter().copied())
            .filter(|&s| s <= i)
            .max()
            .unwrap();
        assert_eq!(*offset as usize, start, "flip at byte {i}: {err}");
        assert!(err.to_string().contains("--lenient"), "{err}");
    }
}

#[test]
fn lenient_reading_skips_a_damaged_frame_and_counts_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    let records = exchanges(30, 3);
    write(&path, &records, small_frames(), true);
    let mut bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    let counts = frame_records(&bytes);
    // Damage the payload of the second frame, then the header of the fourth.
    bytes[ends[0] + 60] ^= 0xff;
    bytes[ends[2] + 5] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let lenient = ReadOptions {
        lenient: true,
        ..ReadOptions::default()
    };
    let (back, stats) = read(std::slice::from_ref(&path), &lenient).unwrap();
    assert_eq!(back.len(), records.len() - counts[1] - counts[3]);
    assert_eq!(stats.corrupt.len(), 2);
    assert_eq!(stats.corrupt[0].offset as usize, ends[0]);
    assert_eq!(stats.corrupt[0].records, Some(counts[1] as u32));
    assert_eq!(stats.corrupt[1].offset as usize, ends[2]);
    assert_eq!(
        stats.corrupt[1].records, None,
        "a damaged header cannot say what it held"
    );
    assert_eq!(stats.lost(), counts[1] as u64);
    let strict = read_one(&path).unwrap_err();
    assert!(strict.is_corruption());
}

#[test]
fn rotated_files_are_private_and_read_back_as_one_tape() {
    let dir = tempfile::tempdir().unwrap();
    let tapes = dir.path().join("captures");
    let records = exchanges(400, 4);
    let options = WriterOptions {
        frame_bytes: 4096,
        rotate_size: Some(8 << 10),
        ..WriterOptions::default()
    };
    let summary = write(&tapes, &records, options, true);
    assert!(
        summary.files.len() >= 3,
        "rotation made {} files",
        summary.files.len()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tapes), 0o700);
    let mut names = vec![];
    for f in &summary.files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
        names.push(f.file_name().unwrap().to_string_lossy().to_string());
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "file names sort in rotation order");
    assert!(names[1].ends_with("-000001.tape"), "{names:?}");
    let (back, stats) = read_one(&tapes).unwrap();
    assert_eq!(back, records);
    assert_eq!(stats.files.len(), summary.files.len());
}

#[test]
fn late_exchanges_are_put_in_order_within_the_window_and_flagged_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    let mut records = exchanges(50, 5);
    // A long upload: it started early and was written at its end, after 20 others.
    let upload = records.remove(3);
    records.insert(23, upload.clone());
    write(&path, &records, small_frames(), false);

    let (back, stats) = read_one(&path).unwrap();
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| r.start());
    assert_eq!(back, sorted);
    assert_eq!(stats.out_of_order, 0);

    // With a window shorter than the upload's lateness it still comes, flagged.
    let lateness = records[22].end() - upload.start();
    let narrow = ReadOptions {
        reorder_window: lateness / 4,
        ..ReadOptions::default()
    };
    let mut reader = TapeReader::open(std::slice::from_ref(&path), &narrow).unwrap();
    let mut late = vec![];
    let mut count = 0;
    while let Some(r) = reader.next() {
        let r = r.unwrap();
        count += 1;
        if reader.last_out_of_order() {
            late.push(r);
        }
    }
    assert_eq!(count, records.len());
    assert_eq!(late, vec![upload]);
    assert_eq!(reader.stats().out_of_order, 1);
}

#[test]
fn a_time_range_skips_frames_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    let records = exchanges(300, 6);
    write(&path, &records, small_frames(), true);
    let (from, to) = (records[100].start(), records[200].start());
    let options = ReadOptions {
        from: Some(from),
        to: Some(to),
        ..ReadOptions::default()
    };
    let (back, stats) = read(&[path], &options).unwrap();
    assert_eq!(back, records[100..200]);
    assert!(
        stats.frames_skipped > 5,
        "skipped {} frames",
        stats.frames_skipped
    );
}

#[test]
fn unknown_kinds_and_appended_fields_from_newer_writers_are_tolerated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    let exchange = exchanges(1, 7).remove(0);
    // A newer writer appended a field to Exchange: its bytes follow the ones we know.
    let mut grown = Vec::new();
    codec::FrameEncoder::new().encode(&exchange, &mut grown);
    grown.drain(..codec::RECORD_PREFIX_LEN);
    grown.extend_from_slice(b"a field from the future");
    let records = vec![
        Record::Unknown {
            code: kind::EXCHANGE,
            payload: grown,
        },
        Record::Unknown {
            code: 200,
            payload: b"a kind from the future".to_vec(),
        },
    ];
    write(&path, &records, WriterOptions::default(), false);
    let (back, _) = read_one(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0], exchange);
    assert_eq!(
        back[1],
        Record::Unknown {
            code: 200,
            payload: b"a kind from the future".to_vec()
        }
    );
}

/// A frame's payload holding `records`, written by a fresh encoder.
fn payload_of(records: &[Record]) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut encoder = codec::FrameEncoder::new();
    for r in records {
        encoder.encode(r, &mut payload);
    }
    payload
}

/// An exchange of the synthetic traffic with these heads.
fn with_heads(mut record: Record, request: &Headers, response: &Headers) -> Record {
    let Record::Exchange(e) = &mut record else {
        unreachable!("synthetic records are exchanges")
    };
    e.request.headers = request.clone();
    e.response.as_mut().unwrap().headers = response.clone();
    record
}

/// Heads marked shared, each told by the agent it names.
fn shared_heads(n: usize) -> Vec<Headers> {
    (0..n)
        .map(|i| {
            let mut h = Headers::new();
            h.push(
                "user-agent",
                format!("containers/5.{i} (github.com/containers/image)"),
            );
            h.push_redacted(
                "authorization",
                Redaction {
                    kind: SecretKind::Bearer,
                    len: 829,
                    fingerprint: i as u64,
                    jwt: None,
                },
            );
            h.mark_shared();
            h
        })
        .collect()
}

#[test]
fn a_head_repeated_in_a_frame_is_written_once_and_reads_back_whole() {
    // A connection's heads come again and again, between other connections' (the first and
    // second); then enough others to push the first out of the frame's head cache, then it
    // again.
    let heads = shared_heads(codec::HEAD_SLOTS + 2);
    let response = &heads[1];
    let mut order = vec![0, 2, 0, 2, 0];
    order.extend(3..codec::HEAD_SLOTS + 2);
    order.push(0);
    let records: Vec<Record> = (exchanges(order.len(), 9).into_iter().zip(&order))
        .map(|(r, &h)| with_heads(r, &heads[h], response))
        .collect();
    let payload = payload_of(&records);
    let agent = |i: usize| format!("containers/5.{i} (");
    // Once until forgotten, then once more; the response's head once.
    assert_eq!(occurrences(&payload, agent(0).as_bytes()), 2);
    assert_eq!(occurrences(&payload, agent(2).as_bytes()), 1);
    assert_eq!(occurrences(&payload, agent(1).as_bytes()), 1);

    let back: Vec<Record> = codec::RecordDecoder::new(&payload)
        .map(Result::unwrap)
        .collect();
    assert_eq!(back, records);

    // A reference read without the frame it refers into says what is missing.
    let mut twice = Vec::new();
    let mut encoder = codec::FrameEncoder::new();
    encoder.encode(&records[0], &mut twice);
    let second = twice.len();
    encoder.encode(&records[2], &mut twice);
    let failure = codec::FrameDecoder::new()
        .next(&twice[second..])
        .unwrap()
        .unwrap_err();
    // The request's head is in slot 1, behind the response's.
    assert!(
        failure.reason.contains("header block slot 1 is empty"),
        "{}",
        failure.reason
    );
}

#[test]
fn a_newer_writers_exchanges_take_their_place_in_the_head_cache() {
    // A newer writer's exchange, its heads written out to be remembered: copied as is, it
    // takes a slot of the head cache the reader will keep, and what the slot held before is
    // forgotten by the writer as it will be by the reader.
    let heads = shared_heads(codec::HEAD_SLOTS + 1);
    let theirs = &heads[codec::HEAD_SLOTS];
    let mut foreign = Vec::new();
    let first = exchanges(1, 3).remove(0);
    codec::FrameEncoder::new().encode(&with_heads(first, theirs, theirs), &mut foreign);
    foreign.drain(..codec::RECORD_PREFIX_LEN);
    let foreign = Record::Unknown {
        code: kind::EXCHANGE,
        payload: foreign,
    };
    // Ours fill the cache; theirs push the least recently used two out; ours again.
    let ours = &heads[..codec::HEAD_SLOTS];
    let mut records: Vec<Record> = (exchanges(ours.len(), 4).into_iter().zip(ours))
        .map(|(r, h)| with_heads(r, h, h))
        .collect();
    records.push(foreign.clone());
    records
        .extend((exchanges(ours.len(), 5).into_iter().zip(ours)).map(|(r, h)| with_heads(r, h, h)));
    let payload = payload_of(&records);
    let back: Vec<Record> = codec::RecordDecoder::new(&payload)
        .map(Result::unwrap)
        .collect();
    let Record::Exchange(e) = &back[ours.len()] else {
        panic!("the newer writer's exchange reads as one")
    };
    assert_eq!(&e.request.headers, theirs);
    records[ours.len()] = back[ours.len()].clone();
    assert_eq!(back, records);

    // One that refers to a block of the frame it was written in: copied into another, it
    // names a slot there too. It cannot stand for what it was, but writing goes on, and the
    // frame reads back.
    let mut frame = Vec::new();
    let mut encoder = codec::FrameEncoder::new();
    let [first, second]: [Record; 2] = exchanges(2, 6).try_into().unwrap();
    encoder.encode(&with_heads(first, theirs, theirs), &mut frame);
    let at = frame.len() + codec::RECORD_PREFIX_LEN;
    encoder.encode(&with_heads(second, theirs, theirs), &mut frame);
    let referring = Record::Unknown {
        code: kind::EXCHANGE,
        payload: frame[at..].to_vec(),
    };
    let mine = with_heads(exchanges(1, 7).remove(0), &heads[0], &heads[1]);
    let payload = payload_of(&[mine.clone(), referring]);
    let back: Vec<_> = codec::RecordDecoder::new(&payload).collect();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0], Ok(mine));
    assert!(back[1].is_ok(), "{:?}", back[1]);
}

#[test]
fn a_body_repeated_in_a_frame_is_written_once_and_reads_back_whole() {
    use sha2::Digest;
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let short = b"{}";
    // As the recorder writes a body it kept whole: its digest left for the reader to derive.
    let unhashed = |bytes: &[u8]| Body {
        len: bytes.len() as u64,
        sha256: None,
        stored: Stored::Prefix(bytes.to_vec()),
        complete: true,
    };
    let mut records = exchanges(4 + codec::BODY_SLOTS + 1, 5);
    let mut bodies: Vec<Body> = vec![
        unhashed(manifest),
        Body::inline(manifest.to_vec()),
        // The same bytes, as the first part of a longer body.
        Body {
            len: 1000,
            complete: false,
            ..unhashed(manifest)
        },
        unhashed(short),
    ];
    // Enough other bodies to push the manifest out of the frame's cache, then it again.
    bodies.extend(
        (0..codec::BODY_SLOTS).map(|i| unhashed(format!("another body, number {i}").as_bytes())),
    );
    bodies.push(unhashed(manifest));
    for (r, body) in records.iter_mut().zip(&bodies) {
        let Record::Exchange(e) = r else {
            unreachable!()
        };
        e.response.as_mut().unwrap().body = body.clone();
        e.request.body = unhashed(short);
    }
    let payload = payload_of(&records);
    // Written once for the first three uses, again once forgotten; a short body every time.
    assert_eq!(occurrences(&payload, manifest), 2);
    assert_eq!(occurrences(&payload, short), records.len() + 1);

    let back: Vec<Record> = codec::RecordDecoder::new(&payload)
        .map(Result::unwrap)
        .collect();
    let digest: [u8; 32] = sha2::Sha256::digest(manifest).into();
    let mut expected = records.clone();
    for r in &mut expected {
        let Record::Exchange(e) = r else {
            unreachable!()
        };
        for body in [&mut e.request.body, &mut e.response.as_mut().unwrap().body] {
            if let (None, Stored::Prefix(p), true) = (body.sha256, &body.stored, body.complete) {
                if p.len() as u64 == body.len {
                    body.sha256 = Some(sha2::Sha256::digest(p).into());
                }
            }
        }
    }
    assert_eq!(back, expected);
    let Record::Exchange(e) = &back[0] else {
        unreachable!()
    };
    assert_eq!(e.response.as_ref().unwrap().body.sha256, Some(digest));

    // A reference read without the frame it refers into says what is missing.
    let mut bare = records[0].clone();
    if let Record::Exchange(e) = &mut bare {
        e.request.headers = Headers::new();
        e.response.as_mut().unwrap().headers = Headers::new();
    }
    let mut twice = Vec::new();
    let mut encoder = codec::FrameEncoder::new();
    encoder.encode(&bare, &mut twice);
    let second = twice.len();
    encoder.encode(&bare, &mut twice);
    assert_eq!(occurrences(&twice, manifest), 1);
    let failure = codec::FrameDecoder::new()
        .next(&twice[second..])
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.at, 0);
    assert!(
        failure.reason.contains("stored body slot 0 is empty"),
        "{}",
        failure.reason
    );
}

#[test]
fn a_newer_format_version_says_to_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.tape");
    write(&path, &exchanges(3, 8), WriterOptions::default(), true);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = read_one(&path).unwrap_err();
    assert!(matches!(err, TapeError::NewerVersion { found, .. } if found == FORMAT_VERSION + 1));
    assert!(err.to_string().contains("upgrade loadtape"), "{err}");
}

#[test]
fn other_files_are_not_taken_for_tapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.har");
    std::fs::write(&path, b"{\"log\": {}}").unwrap();
    let err = read_one(&path).unwrap_err();
    assert!(err.to_string().contains("loadtape import"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = read_one(empty.path()).unwrap_err();
    assert!(err.to_string().contains("no tape files"), "{err}");
}

#[test]
fn several_recordings_merge_on_one_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let a = exchanges(100, 9);
    let b = exchanges(100, 10);
    let mut ha = header();
    let mut hb = header();
    hb.epoch_unix_ns = ha.epoch_unix_ns + 250_000_000; // b started 250 ms after a
    ha.seq = 0;
    for (name, h, recs) in [("a.tape", ha, &a), ("b.tape", hb, &b)] {
        let mut w = TapeWriter::create(dir.path().join(name), h, WriterOptions::default()).unwrap();
        for r in recs {
            w.set_watermark(r.start());
            w.write(r).unwrap();
        }
        w.finish().unwrap();
    }
    let (back, _) = read_one(dir.path()).unwrap();
    assert_eq!(back.len(), 200);
    assert!(back.windows(2).all(|w| w[0].start() <= w[1].start()));
    // b's records moved onto a's time base.
    let mut first_b = b[0].clone();
    if let Record::Exchange(e) = &mut first_b {
        e.timing.start += 250_000_000;
    }
    assert!(back.contains(&first_b));
}

/// The compatibility promise: this file, written by format version 1, is read by every later
/// loadtape. Never regenerate it; add a new one for a new version.
#[test]
fn the_checked_in_version_1_tape_reads_forever() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("captures/v1/quay-session-v1.tape");
    let (records, stats) = read_one(&path).unwrap();
    assert_eq!(stats.files[0].version, 1);
    assert!(stats.files[0].closed);
    let exchanges: Vec<&Exchange> = records
        .iter()
        .filter_map(|r| match r {
            Record::Exchange(e) => Some(e.as_ref()),
            _ => None,
        })
        .collect();
    assert_eq!(exchanges.len(), 63);
    let first = exchanges[0];
    assert_eq!(first.request.method, Method::Get);
    assert_eq!(first.request.target, "/api/v1/user/");
    assert_eq!(first.response.as_ref().unwrap().status, 200);
    assert!(matches!(
        first.request.headers.get("authorization"),
        Some(HeaderValue::Redacted(r)) if r.kind == SecretKind::Bearer
    ));
    let pushes = exchanges
        .iter()
        .filter(|e| {
            e.request.method == Method::Put && e.request.target.contains("?digest=sha256%3A")
        })
        .count();
    assert_eq!(
        pushes, 4,
        "the first push uploads three layers and a config blob"
    );
}

/// The checked-in sample of format `version` (`captures/vN/quay-session-vN.tape`, an import of
/// the Quay session), which must be of that version and closed: its records, how they read, its
/// bytes, and the records of the version 1 sample of the same session.
fn checked_in(version: u16) -> (Vec<Record>, ReadStats, Vec<u8>, Vec<Record>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("captures");
    let path = dir.join(format!("v{version}/quay-session-v{version}.tape"));
    let (records, stats) = read_one(&path).unwrap();
    assert_eq!(stats.files[0].version, version);
    assert!(stats.files[0].closed);
    let (v1, _) = read_one(&dir.join("v1/quay-session-v1.tape")).unwrap();
    (records, stats, std::fs::read(&path).unwrap(), v1)
}

/// The compatibility promise for version 3 (a repeated header block written once per frame),
/// as for versions 1 and 2: never regenerate this file.
#[test]
fn the_checked_in_version_3_tape_reads_forever() {
    let (records, _, bytes, v1) = checked_in(3);
    // The session of the version 1 sample, head for head (fingerprints aside: their key is
    // each import's own) and body for body.
    let (exchanges, v1) = (exchanges_in(&records), exchanges_in(&v1));
    assert_eq!(exchanges.len(), 63);
    assert_eq!(exchanges.len(), v1.len());
    let fields = |h: &Headers| -> Vec<(String, Option<Vec<u8>>)> {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.plain().map(<[u8]>::to_vec)))
            .collect()
    };
    for (e, old) in exchanges.iter().zip(&v1) {
        assert_eq!(e.request.target, old.request.target);
        assert_eq!(fields(&e.request.headers), fields(&old.request.headers));
        assert_eq!(e.request.body, old.request.body);
        let (response, old) = (e.response.as_ref().unwrap(), old.response.as_ref().unwrap());
        assert_eq!((response.status, &response.body), (old.status, &old.body));
        assert_eq!(fields(&response.headers), fields(&old.headers));
    }
    // Its repeated heads are references: written anew, heads unmarked, the frame is longer.
    let frames = frame_payloads(&bytes);
    assert_eq!(frames.len(), 1);
    let again = payload_of(&records);
    assert!(
        frames[0].len() < again.len(),
        "{} bytes against {}",
        frames[0].len(),
        again.len()
    );
}

/// The compatibility promise for version 2 (a repeated body written once per frame), as for
/// version 1 above: never regenerate this file.
#[test]
fn the_checked_in_version_2_tape_reads_forever() {
    let (records, stats, bytes, v1) = checked_in(2);
    // The session of the version 1 sample, body for body.
    let (exchanges, v1) = (exchanges_in(&records), exchanges_in(&v1));
    assert_eq!(exchanges.len(), 63);
    assert_eq!(exchanges.len(), v1.len());
    for (e, old) in exchanges.iter().zip(&v1) {
        assert_eq!(e.request.target, old.request.target);
        assert_eq!(e.request.body, old.request.body);
        let (response, old) = (e.response.as_ref().unwrap(), old.response.as_ref().unwrap());
        assert_eq!((response.status, &response.body), (old.status, &old.body));
    }
    // The image's config was pulled three times and is on the tape once per frame.
    let config = exchanges
        .iter()
        .find_map(|e| match &e.response.as_ref().unwrap().body.stored {
            Stored::Prefix(p) if p.starts_with(b"{\"architecture\"") => Some(p.clone()),
            _ => None,
        })
        .expect("the image config is stored");
    let uses = (exchanges.iter())
        .filter(|e| e.response.as_ref().unwrap().body.stored == Stored::Prefix(config.clone()))
        .count();
    assert_eq!(uses, 3);
    let frames = frame_payloads(&bytes);
    assert_eq!(frames.len() as u64, stats.files[0].frames);
    let written: usize = frames.iter().map(|f| occurrences(f, &config)).sum();
    assert!(
        written < uses && written >= 1,
        "{written} copies for {uses} uses"
    );
}
