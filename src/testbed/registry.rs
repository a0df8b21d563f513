//! Registry v2 (OCI distribution) as Quay serves it: the token challenge and `/v2/auth`, blobs
//! global by digest, upload sessions whose every answer carries a new signed `_state` (so a
//! replay must follow live Locations, never recorded ones), manifests that must reference known
//! blobs, and tags.

use base64::Engine as _;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::store::{Manifest, Tag, Upload};
use super::{
    empty, headed, is_sha256, json, random, sha256, with_body, RegistryAuth, Reply, Request, Shared,
};

/// Where a `/v2/...` path points. `{name}` may hold slashes, so routes are found from the end.
enum Route<'a> {
    Base,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Uploads(&'a str),
    Upload(&'a str, &'a str),
    Unknown,
}

impl<'a> Route<'a> {
    /// `rest` is the path after `/v2/`.
    fn parse(rest: &'a str) -> Route<'a> {
        let named = |name: &str| !name.is_empty();
        if rest.is_empty() {
            Route::Base
        } else if let Some(name) = rest.strip_suffix("/tags/list").filter(|n| named(n)) {
            Route::Tags(name)
        } else if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            Route::Manifest(name, reference)
        } else if let Some(name) = rest.strip_suffix("/blobs/uploads/").filter(|n| named(n)) {
            Route::Uploads(name)
        } else if let Some((name, uuid)) = rest.rsplit_once("/blobs/uploads/") {
            Route::Upload(name, uuid)
        } else if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            Route::Blob(name, digest)
        } else {
            Route::Unknown
        }
    }

    fn name(&self) -> &'a str {
        match *self {
            Route::Tags(n) | Route::Manifest(n, _) | Route::Blob(n, _) => n,
            Route::Uploads(n) | Route::Upload(n, _) => n,
            Route::Base | Route::Unknown => "",
        }
    }
}

/// `GET /_storage/{digest}`: a blob from storage (see `mod.rs`).
pub(super) fn stored_blob(shared: &Shared, digest: &str) -> Reply {
    blob(shared, digest)
}

pub(super) fn answer(shared: &Shared, req: &Request) -> Reply {
    let rest = req.path.strip_prefix("/v2").unwrap_or_default();
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if rest == "auth" && shared.config.registry_auth == RegistryAuth::Token {
        return token(shared, req);
    }
    let route = Route::parse(rest);
    if let Some(challenge) = refused(shared, req, &route) {
        return challenge;
    }
    let (get, head) = (req.method == Method::GET, req.method == Method::HEAD);
    match (&req.method, route) {
        (_, Route::Base) if get || head => json(StatusCode::OK, &json!({})),
        (_, Route::Blob(_, digest)) if get || head => blob(shared, digest),
        (&Method::POST, Route::Uploads(name)) => start_upload(shared, req, name),
        (&Method::PATCH | &Method::PUT, Route::Upload(name, uuid)) => {
            continue_upload(shared, req, name, uuid)
        }
        (_, Route::Manifest(name, reference)) if get || head => manifest(shared, name, reference),
        (&Method::PUT, Route::Manifest(name, reference)) => {
            put_manifest(shared, req, name, reference)
        }
        (&Method::DELETE, Route::Manifest(name, reference)) => {
            delete_manifest(shared, name, reference)
        }
        (&Method::GET, Route::Tags(name)) => tags(shared, name),
        (_, Route::Unknown) => Code::NameUnknown.answer(Value::Null),
        _ => Code::Unsupported.answer(Value::Null),
    }
}

/// The distribution spec's error codes, as the testbed answers them.
#[derive(Clone, Copy)]
enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    Unauthorized,
    Unsupported,
}

impl Code {
    /// `{"errors":[{"code","message","detail"}]}` with the code's status.
    fn answer(self, detail: Value) -> Reply {
        use StatusCode as S;
        let (status, code, message) = match self {
            Code::BlobUnknown => (S::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown"),
            Code::BlobUploadInvalid => (S::BAD_REQUEST, "BLOB_UPLOAD_INVALID", "stale _state"),
            Code::BlobUploadUnknown => (S::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", "upload unknown"),
            Code::DigestInvalid => (S::BAD_REQUEST, "DIGEST_INVALID", "digest mismatch"),
            Code::ManifestBlobUnknown => (S::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN", "blob unknown"),
            Code::ManifestInvalid => (S::BAD_REQUEST, "MANIFEST_INVALID", "manifest invalid"),
            Code::ManifestUnknown => (S::NOT_FOUND, "MANIFEST_UNKNOWN", "manifest unknown"),
            Code::NameUnknown => (S::NOT_FOUND, "NAME_UNKNOWN", "repository name unknown"),
            Code::Unauthorized => (S::UNAUTHORIZED, "UNAUTHORIZED", "authentication required"),
            Code::Unsupported => (S::METHOD_NOT_ALLOWED, "UNSUPPORTED", "unsupported"),
        };
        let error = json!({"code": code, "message": message, "detail": detail});
        json(status, &json!({ "errors": [error] }))
    }
}

/// The 401 answer when `req` may not take `route`; `None` when it may.
fn refused(shared: &Shared, req: &Request, route: &Route<'_>) -> Option<Reply> {
    let challenge = match shared.config.registry_auth {
        RegistryAuth::None => return None,
        RegistryAuth::Basic if basic_account(shared, req) == Some(true) => return None,
        RegistryAuth::Basic => r#"Basic realm="registry""#.to_string(),
        RegistryAuth::Token => {
            let grants = req.bearer().and_then(|t| token_grants(shared, t));
            // `/v2/` only asks "is this a token of mine"; the rest needs one granting access.
            match route {
                Route::Base if grants.is_some() => return None,
                Route::Base => challenge(req),
                _ if grants == Some(true) => return None,
                _ => {
                    let actions = if matches!(req.method, Method::GET | Method::HEAD) {
                        "pull"
                    } else {
                        "pull,push"
                    };
                    let name = route.name();
                    format!(r#"{},scope="repository:{name}:{actions}""#, challenge(req))
                }
            }
        }
    };
    let refusal = Code::Unauthorized.answer(Value::Null);
    Some(headed(refusal, &[("www-authenticate", &challenge)]))
}

/// `Bearer realm=...,service=...` naming the host the client addressed, as Quay names its
/// SERVER_HOSTNAME.
fn challenge(req: &Request) -> String {
    format!(
        r#"Bearer realm="http://{0}/v2/auth",service="{0}""#,
        req.host
    )
}

/// `Some(true)` for Basic credentials of a configured account (or `$oauthtoken` with an API
/// token), `Some(false)` for other Basic credentials, `None` for none.
fn basic_account(shared: &Shared, req: &Request) -> Option<bool> {
    let encoded = req.header("authorization")?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim());
    let text = String::from_utf8(decoded.unwrap_or_default()).unwrap_or_default();
    let Some((user, password)) = text.split_once(':') else {
        return Some(false);
    };
    let (accounts, api_tokens) = (&shared.config.accounts, &shared.config.api_tokens);
    let account = accounts.iter().any(|(u, p)| u == user && p == password);
    Some(account || (user == "$oauthtoken" && api_tokens.iter().any(|t| t == password)))
}

/// `GET /v2/auth`: a fresh token for an account, one granting nothing without credentials
/// (Quay's anonymous token), 401 for wrong credentials.
fn token(shared: &Shared, req: &Request) -> Reply {
    let access = match basic_account(shared, req) {
        Some(true) => "access",
        None => "none",
        Some(false) => {
            let refusal = Code::Unauthorized.answer(Value::Null);
            return headed(refusal, &[("www-authenticate", &challenge(req))]);
        }
    };
    // Opaque to clients, checkable here without remembering it: access, nonce, signature.
    let body = format!("{access}.{}", crate::tape::hex(&random::<16>()));
    let token = format!("{body}.{}", shared.sign(&format!("token:{body}")));
    json(StatusCode::OK, &json!({ "token": token }))
}

/// Whether `token` grants access (`Some(true)`), grants nothing (`Some(false)`), or was not
/// issued by this instance (`None`).
fn token_grants(shared: &Shared, token: &str) -> Option<bool> {
    let (body, signature) = token.rsplit_once('.')?;
    let issued = shared.sign(&format!("token:{body}")) == signature;
    issued.then(|| body.starts_with("access."))
}

fn blob(shared: &Shared, digest: &str) -> Reply {
    match shared.store().blobs.get(digest) {
        Some(bytes) => headed(
            with_body(StatusCode::OK, "application/octet-stream", bytes.clone()),
            &[("docker-content-digest", digest)],
        ),
        None => Code::BlobUnknown.answer(json!({ "digest": digest })),
    }
}

/// `_state` for an upload session at `offset` bytes: any other offset's (an earlier Location)
/// is stale.
fn upload_state(shared: &Shared, uuid: &str, offset: usize) -> String {
    shared.sign(&format!("upload:{uuid}:{offset}"))
}

/// 202 with the session's next Location, as Quay answers POST and PATCH.
fn session(shared: &Shared, req: &Request, name: &str, uuid: &str, offset: usize) -> Reply {
    let state = upload_state(shared, uuid, offset);
    let location = format!(
        "http://{}/v2/{name}/blobs/uploads/{uuid}?_state={state}",
        req.host
    );
    let range = format!("0-{}", offset.saturating_sub(1));
    let headers = [
        ("location", location.as_str()),
        ("docker-upload-uuid", uuid),
        ("range", &range),
    ];
    headed(empty(StatusCode::ACCEPTED), &headers)
}

/// Stores `bytes` as blob `digest` when they hash to it: 201 with the blob's Location, else 400.
fn store_blob(shared: &Shared, req: &Request, name: &str, digest: &str, bytes: Vec<u8>) -> Reply {
    if !is_sha256(digest) || sha256(&bytes) != digest {
        return Code::DigestInvalid.answer(json!({ "digest": digest }));
    }
    shared
        .store()
        .blobs
        .insert(digest.to_string(), bytes.into());
    created(req, name, digest)
}

fn created(req: &Request, name: &str, digest: &str) -> Reply {
    let location = format!("http://{}/v2/{name}/blobs/{digest}", req.host);
    let headers = [
        ("location", location.as_str()),
        ("docker-content-digest", digest),
    ];
    headed(empty(StatusCode::CREATED), &headers)
}

/// `POST /v2/{name}/blobs/uploads/`: a session, a monolithic upload (`?digest=`) or a mount.
fn start_upload(shared: &Shared, req: &Request, name: &str) -> Reply {
    let mut store = shared.store();
    store.repository(name);
    if let Some(digest) = req.query("mount").filter(|d| store.blobs.contains_key(d)) {
        return created(req, name, &digest);
    }
    if let Some(digest) = req.query("digest") {
        drop(store);
        return store_blob(shared, req, name, &digest, req.body.to_vec());
    }
    let uuid = super::uuid();
    let upload = Upload {
        name: name.to_string(),
        bytes: Vec::new(),
    };
    store.uploads.insert(uuid.clone(), upload);
    drop(store);
    session(shared, req, name, &uuid, 0)
}

/// `PATCH` (append) or `PUT` (append, then close as `?digest=`) on a session's Location.
fn continue_upload(shared: &Shared, req: &Request, name: &str, uuid: &str) -> Reply {
    let mut store = shared.store();
    let Some(upload) = store.uploads.get_mut(uuid).filter(|u| u.name == name) else {
        return Code::BlobUploadUnknown.answer(json!({ "uuid": uuid }));
    };
    let current = upload_state(shared, uuid, upload.bytes.len());
    if req.query("_state").as_deref() != Some(current.as_str()) {
        return Code::BlobUploadInvalid.answer(json!({ "uuid": uuid }));
    }
    upload.bytes.extend_from_slice(&req.body);
    let offset = upload.bytes.len();
    if req.method == Method::PATCH {
        drop(store);
        return session(shared, req, name, uuid, offset);
    }
    let bytes = store
        .uploads
        .remove(uuid)
        .map(|u| u.bytes)
        .unwrap_or_default();
    drop(store);
    let digest = req.query("digest").unwrap_or_default();
    store_blob(shared, req, name, &digest, bytes)
}

fn manifest(shared: &Shared, name: &str, reference: &str) -> Reply {
    let store = shared.store();
    let repository = store.repositories.get(name);
    let digest = repository
        .and_then(|r| r.tags.get(reference))
        .map_or(reference, |tag| tag.digest.as_str());
    let Some(manifest) = repository.and_then(|r| r.manifests.get(digest)) else {
        return Code::ManifestUnknown.answer(json!({ "reference": reference }));
    };
    let reply = with_body(StatusCode::OK, &manifest.media_type, manifest.bytes.clone());
    headed(reply, &[("docker-content-digest", digest)])
}

/// `PUT /v2/{name}/manifests/{ref}`: stored by digest (and tag) once everything it references
/// is known: blobs for an image, manifests of this repository for an index.
fn put_manifest(shared: &Shared, req: &Request, name: &str, reference: &str) -> Reply {
    let Ok(parsed) = serde_json::from_slice::<Value>(&req.body) else {
        return Code::ManifestInvalid.answer(Value::Null);
    };
    let digest = sha256(&req.body);
    let by_digest = reference.starts_with("sha256:");
    if by_digest && reference != digest {
        return Code::DigestInvalid.answer(json!({ "digest": digest }));
    }
    let digests = |field: &str| -> Vec<String> {
        let list = parsed[field]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        list.iter()
            .filter_map(|d| Some(d["digest"].as_str()?.to_string()))
            .collect()
    };
    let mut blobs = digests("layers");
    blobs.extend(parsed["config"]["digest"].as_str().map(str::to_string));
    let mut store = shared.store();
    let children = store.repositories.get(name).map(|r| &r.manifests);
    let missing_child = digests("manifests")
        .into_iter()
        .find(|d| !children.is_some_and(|m| m.contains_key(d)));
    let missing =
        missing_child.or_else(|| blobs.into_iter().find(|d| !store.blobs.contains_key(d)));
    if let Some(missing) = missing {
        return Code::ManifestBlobUnknown.answer(json!({ "digest": missing }));
    }
    let media_type = parsed["mediaType"].as_str().or(req.header("content-type"));
    let media_type = media_type.unwrap_or("application/vnd.oci.image.manifest.v1+json");
    let repository = store.repository(name);
    let manifest = Manifest {
        bytes: req.body.clone(),
        media_type: media_type.to_string(),
    };
    repository.manifests.insert(digest.clone(), manifest);
    if !by_digest {
        let tag = Tag {
            digest: digest.clone(),
            pushed_at: chrono::Utc::now().timestamp(),
        };
        repository.tags.insert(reference.to_string(), tag);
    }
    let location = format!("/v2/{name}/manifests/{digest}");
    let headers = [
        ("location", location.as_str()),
        ("docker-content-digest", &digest),
    ];
    headed(empty(StatusCode::CREATED), &headers)
}

/// `DELETE` by digest removes the manifest and the tags on it; by tag, the tag alone.
fn delete_manifest(shared: &Shared, name: &str, reference: &str) -> Reply {
    let mut store = shared.store();
    let deleted = store.repositories.get_mut(name).is_some_and(|r| {
        r.tags.retain(|_, t| t.digest != reference);
        r.tags.remove(reference).is_some() || r.manifests.remove(reference).is_some()
    });
    match deleted {
        true => empty(StatusCode::ACCEPTED),
        false => Code::ManifestUnknown.answer(json!({ "reference": reference })),
    }
}

fn tags(shared: &Shared, name: &str) -> Reply {
    match shared.store().repositories.get(name) {
        Some(r) => json(
            StatusCode::OK,
            &json!({"name": name, "tags": r.tags.keys().collect::<Vec<_>>()}),
        ),
        None => Code::NameUnknown.answer(json!({ "name": name })),
    }
}
