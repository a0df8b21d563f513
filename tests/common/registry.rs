//! A real registry (Debian's `docker-registry`, the CNCF distribution server) and images for
//! `skopeo` to push.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use super::net::{hex, require};

/// A registry on a free loopback port, storing under a temporary directory; killed on drop.
pub struct Registry {
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, None)
    }

    /// A registry that wants HTTP Basic credentials: `htpasswd` holds `user:bcrypt-hash` lines.
    pub fn start_with_htpasswd(dir: &Path, htpasswd: &str) -> Registry {
        Registry::start_with(dir, Some(htpasswd))
    }

    fn start_with(dir: &Path, htpasswd: Option<&str>) -> Registry {
        require("docker-registry", "docker-registry");
        // docker-registry takes its port from its configuration: a free one is picked, and
        // picked again if another test's server took it before the registry bound it.
        for _ in 0..5 {
            if let Some(registry) = Registry::try_start(dir, htpasswd) {
                return registry;
            }
        }
        panic!("docker-registry did not come up in 5 tries");
    }

    fn try_start(dir: &Path, htpasswd: Option<&str>) -> Option<Registry> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("registry.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some(lines) = htpasswd {
            let file = dir.join("htpasswd");
            std::fs::write(&file, lines).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: loadtape-test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry { addr, child };
        // Ready when /v2/ answers as a registry does (401 when it wants credentials), not
        // merely something on the port.
        let ready = if htpasswd.is_some() { "401" } else { "200" };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
                let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
                if answer.get(9..12) == Some(ready)
                    && answer.contains("docker-distribution-api-version")
                {
                    return Some(registry);
                }
            }
            // Exited: most likely the port was taken meanwhile.
            if registry.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An OCI image layout at `dir` (tag `v1`) with layers of the given sizes; returns the digests
/// of its layers, config and manifest.
pub struct Image {
    pub layout: PathBuf,
    pub layers: Vec<String>,
    pub config: String,
    pub manifest: String,
}

pub fn oci_image(dir: &Path, layer_sizes: &[usize], seed: u8) -> Image {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = hex(&sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&d), bytes).unwrap();
        format!("sha256:{d}")
    };
    let mut layers = Vec::new();
    let mut descriptors = Vec::new();
    for (i, &size) in layer_sizes.iter().enumerate() {
        // Incompressible-looking bytes, distinct per layer and per seed.
        let mut state = (seed as u64) << 32 | i as u64;
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        // Already compressed (zstd), as layers are, so that skopeo copies them as they are.
        let bytes = zstd::bulk::compress(&bytes, 1).unwrap();
        let digest = put(&bytes);
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": digest, "size": bytes.len(),
        }));
        layers.push(digest);
    }
    let config_json = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers},
        "config": {},
    })
    .to_string();
    let config = put(config_json.as_bytes());
    let manifest_json = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_json.len()},
        "layers": descriptors,
    })
    .to_string();
    let manifest = put(manifest_json.as_bytes());
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest, "size": manifest_json.len(),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }],
        })
        .to_string(),
    )
    .unwrap();
    Image {
        layout: dir.to_path_buf(),
        layers,
        config,
        manifest,
    }
}

/// `skopeo copy SRC DST` over plain HTTP; fails the test with skopeo's words.
pub async fn skopeo_copy(src: &str, dst: &str) {
    skopeo_copy_with(src, dst, &[]).await
}

/// The same with more flags (`--dest-creds user:password`...).
pub async fn skopeo_copy_with(src: &str, dst: &str, flags: &[&str]) {
    require("skopeo", "skopeo");
    let out = tokio::process::Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .args(flags)
        .args([src, dst])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bytes of blob `digest` in an OCI layout.
pub fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}
