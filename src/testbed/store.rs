//! What the testbed holds: one store for the registry, the Quay API and Clair, because in Quay
//! they are views of the same repositories (a push creates a repository the API then lists;
//! the API's tags are the registry's).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

#[derive(Default)]
pub(super) struct Store {
    /// Blobs by digest, shared by all repositories as Quay's storage is (so a mount of any
    /// known blob succeeds).
    pub blobs: HashMap<String, Bytes>,
    /// By full name (`org/app`, `org/team/app`).
    pub repositories: BTreeMap<String, Repository>,
    /// Open blob upload sessions by UUID.
    pub uploads: HashMap<String, Upload>,
    /// Clair's index reports by manifest digest.
    pub index_reports: HashMap<String, serde_json::Value>,
}

#[derive(Default)]
pub(super) struct Repository {
    pub manifests: HashMap<String, Manifest>,
    pub tags: BTreeMap<String, Tag>,
    pub description: String,
    pub public: bool,
    /// Quay API user permissions: user -> role (`read`, `write`, `admin`).
    pub permissions: BTreeMap<String, String>,
    /// Quay API builds by their issued id.
    pub builds: BTreeMap<String, serde_json::Value>,
}

pub(super) struct Manifest {
    /// The exact bytes pushed: their sha256 is the manifest's digest.
    pub bytes: Bytes,
    pub media_type: String,
}

pub(super) struct Tag {
    pub digest: String,
    /// Seconds since the epoch.
    pub pushed_at: i64,
}

pub(super) struct Upload {
    /// The repository the session was opened on: its Location is only valid there.
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Store {
    /// The repository `name`, created on first write as a push to Quay creates it.
    pub fn repository(&mut self, name: &str) -> &mut Repository {
        self.repositories.entry(name.to_string()).or_default()
    }
}
