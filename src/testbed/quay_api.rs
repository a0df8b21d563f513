//! Quay API v1: the calls Quay's web UI and automation make most (user, repositories, tags,
//! user permissions), with OAuth bearer tokens. Repositories are the registry's: a push creates
//! one and its tags are the registry's tags.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::store::Repository;
use super::{empty, json, Reply, Request, Shared};

pub(super) fn answer(shared: &Shared, req: &Request) -> Reply {
    let token = req.bearer().unwrap_or_default();
    if !shared.config.api_tokens.iter().any(|t| t == token) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Requires authentication",
        );
    }
    let rest = req.path.strip_prefix("/api/v1/").unwrap_or_default();
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match (&req.method, segments.as_slice()) {
        (&Method::GET, ["user"]) => user(shared),
        (&Method::GET, ["repository"]) => list(shared, req),
        (&Method::POST, ["repository"]) => create(shared, req),
        (&Method::GET, ["repository", ns, repo]) => {
            repository(shared, req, &format!("{ns}/{repo}"))
        }
        (&Method::DELETE, ["repository", ns, repo]) => {
            match shared.store().repositories.remove(&format!("{ns}/{repo}")) {
                Some(_) => empty(StatusCode::NO_CONTENT),
                None => not_found(),
            }
        }
        (&Method::GET, ["repository", ns, repo, "tag"]) => tags(shared, &format!("{ns}/{repo}")),
        (&Method::PUT | &Method::DELETE, ["repository", ns, repo, "permissions", "user", user]) => {
            permission(shared, req, &format!("{ns}/{repo}"), user)
        }
        (&Method::POST, ["repository", ns, repo, "build"]) => {
            start_build(shared, &format!("{ns}/{repo}"))
        }
        (&Method::GET, ["repository", ns, repo, "build", id]) => {
            let store = shared.store();
            match store
                .repositories
                .get(&format!("{ns}/{repo}"))
                .and_then(|r| r.builds.get(*id))
            {
                Some(build) => json(StatusCode::OK, build),
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

/// Quay's error body.
fn problem(status: StatusCode, title: &str, message: &str) -> Reply {
    json(
        status,
        &json!({"status": status.as_u16(), "title": title, "error_message": message, "detail": message,
                "type": format!("http://quay/api/v1/error/{title}")}),
    )
}

fn invalid(message: &str) -> Reply {
    problem(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn not_found() -> Reply {
    problem(StatusCode::NOT_FOUND, "not_found", "Not Found")
}

fn user(shared: &Shared) -> Reply {
    let accounts = &shared.config.accounts;
    let name = accounts.first().map_or("quay", |(user, _)| user.as_str());
    json(
        StatusCode::OK,
        &json!({"anonymous": false, "username": name, "verified": true, "super_user": false,
                "organizations": [], "can_create_repo": true}),
    )
}

/// `ns/repo` -> (`ns`, `repo`); names with more slashes keep them in `repo`.
fn split(name: &str) -> (&str, &str) {
    name.split_once('/').unwrap_or(("", name))
}

fn summary(name: &str, r: &Repository) -> Value {
    let (namespace, repo) = split(name);
    json!({"namespace": namespace, "name": repo, "description": r.description,
           "is_public": r.public, "kind": "image", "state": "NORMAL", "is_starred": false})
}

fn list(shared: &Shared, req: &Request) -> Reply {
    let namespace = req.query("namespace");
    let store = shared.store();
    let repositories: Vec<Value> = store
        .repositories
        .iter()
        .filter(|(name, _)| namespace.as_deref().map_or(true, |ns| split(name).0 == ns))
        .map(|(name, r)| summary(name, r))
        .collect();
    json(StatusCode::OK, &json!({ "repositories": repositories }))
}

fn create(shared: &Shared, req: &Request) -> Reply {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let (Some(namespace), Some(repo)) = (body["namespace"].as_str(), body["repository"].as_str())
    else {
        return invalid("namespace and repository are required");
    };
    let name = format!("{namespace}/{repo}");
    let mut store = shared.store();
    if store.repositories.contains_key(&name) {
        return invalid("Repository already exists");
    }
    let repository = store.repository(&name);
    repository.public = body["visibility"] == "public";
    repository.description = body["description"].as_str().unwrap_or_default().to_string();
    json(
        StatusCode::CREATED,
        &json!({"namespace": namespace, "name": repo, "kind": "image"}),
    )
}

/// The tags of `r` as Quay lists them.
fn tag_list(r: &Repository) -> Vec<Value> {
    r.tags
        .iter()
        .map(|(name, tag)| {
            let media_type = r
                .manifests
                .get(&tag.digest)
                .map_or("", |m| m.media_type.as_str());
            let modified = chrono::DateTime::from_timestamp(tag.pushed_at, 0).unwrap_or_default();
            json!({"name": name, "manifest_digest": tag.digest, "reversion": false,
                   "start_ts": tag.pushed_at, "last_modified": modified.to_rfc2822(),
                   "is_manifest_list": media_type.contains("index") || media_type.contains("list")})
        })
        .collect()
}

fn repository(shared: &Shared, req: &Request, name: &str) -> Reply {
    let store = shared.store();
    let Some(r) = store.repositories.get(name) else {
        return not_found();
    };
    let mut body = summary(name, r);
    body["can_write"] = true.into();
    body["can_admin"] = true.into();
    if req.query("includeTags").as_deref() == Some("true") {
        let tags = tag_list(r)
            .into_iter()
            .map(|t| (t["name"].as_str().unwrap_or_default().to_string(), t));
        body["tags"] = Value::Object(tags.collect());
    }
    json(StatusCode::OK, &body)
}

fn tags(shared: &Shared, name: &str) -> Reply {
    match shared.store().repositories.get(name) {
        Some(r) => json(
            StatusCode::OK,
            &json!({"tags": tag_list(r), "page": 1, "has_additional": false}),
        ),
        None => not_found(),
    }
}

/// `PUT` (body `{"role": "read"|"write"|"admin"}`) or `DELETE` a user's permission.
fn permission(shared: &Shared, req: &Request, name: &str, user: &str) -> Reply {
    let role = serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|b| b["role"].as_str().map(str::to_string));
    let mut store = shared.store();
    let Some(r) = store.repositories.get_mut(name) else {
        return not_found();
    };
    if req.method == Method::DELETE {
        r.permissions.remove(user);
        return empty(StatusCode::NO_CONTENT);
    }
    match role.filter(|role| ["read", "write", "admin"].contains(&role.as_str())) {
        Some(role) => {
            r.permissions.insert(user.to_string(), role.clone());
            json(
                StatusCode::OK,
                &json!({"role": role, "name": user, "is_robot": user.contains('+')}),
            )
        }
        None => invalid("role must be read, write or admin"),
    }
}

/// `POST .../build/`: a repository build, queued. Its `id` is issued here, and the client
/// polls `GET .../build/{id}` with it: a value a replay must take from the live answer.
fn start_build(shared: &Shared, name: &str) -> Reply {
    let id = super::uuid();
    let mut store = shared.store();
    let Some(r) = store.repositories.get_mut(name) else {
        return not_found();
    };
    let (namespace, repo) = split(name);
    let build = json!({"id": id, "phase": "waiting", "status": {}, "tags": ["latest"],
                       "repository": {"namespace": namespace, "name": repo}});
    r.builds.insert(id, build.clone());
    json(StatusCode::CREATED, &build)
}
