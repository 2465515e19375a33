//! OCI images made here, for the real node: layers packed from files of this machine's Debian
//! packages (a program and the shared libraries `ldd` names, busybox for a shell), a config,
//! a manifest; written as an OCI layout archive for `ctr images import` or pushed to a
//! registry over the distribution API (plain HTTP on loopback, or TLS with a given CA).
//!
//! Nothing is fetched: the images of the build tools (git, kaniko) and the base image the
//! sample app builds on are assembled from what the machine has installed and what
//! tools/build-control-plane.sh compiled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Error, Result};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// One uncompressed layer, built entry by entry. Parent directories are added on the way
/// (0755, root), each once.
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
    paths: BTreeSet<String>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
            paths: BTreeSet::new(),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(kind);
        header
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !self.dirs.contains(&prefix) {
                self.dir(&format!("/{prefix}"), 0o755)?;
            }
        }
        Ok(())
    }

    /// A directory (`/tmp` with 0o1777, say).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let relative = path.trim_matches('/').to_owned();
        if self.dirs.contains(&relative) {
            return Ok(self);
        }
        self.parents(path)?;
        self.dirs.insert(relative.clone());
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut header, format!("{relative}/"), std::io::empty())
            .map_err(|e| Error::io(format!("pack {path}"), e))?;
        Ok(self)
    }

    /// A regular file with `bytes`. A path already in the layer is left as it is.
    pub fn file(&mut self, path: &str, mode: u32, bytes: &[u8]) -> Result<&mut Self> {
        let relative = path.trim_start_matches('/').to_owned();
        if !self.paths.insert(relative.clone()) {
            return Ok(self);
        }
        self.parents(path)?;
        let mut header = Self::header(tar::EntryType::Regular, mode, bytes.len() as u64);
        self.tar
            .append_data(&mut header, &relative, bytes)
            .map_err(|e| Error::io(format!("pack {path}"), e))?;
        Ok(self)
    }

    /// A symbolic link at `path` to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let relative = path.trim_start_matches('/').to_owned();
        if !self.paths.insert(relative.clone()) {
            return Ok(self);
        }
        self.parents(path)?;
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut header, &relative, target)
            .map_err(|e| Error::io(format!("pack {path}"), e))?;
        Ok(self)
    }

    /// This machine's file `host` at `path`, with its mode.
    pub fn host_file(&mut self, host: &Path, path: &str) -> Result<&mut Self> {
        use std::os::unix::fs::PermissionsExt;
        let bytes = std::fs::read(host).map_err(|e| Error::io(format!("read {}", host.display()), e))?;
        let mode = std::fs::metadata(host)
            .map_err(|e| Error::io(format!("stat {}", host.display()), e))?
            .permissions()
            .mode()
            & 0o7777;
        self.file(path, mode, &bytes)
    }

    /// A dynamically linked program of this machine at its own path, with every shared
    /// library `ldd` says it loads (and the loader), at their paths.
    pub fn host_program(&mut self, program: &Path) -> Result<&mut Self> {
        let path = program.display().to_string();
        self.host_file(program, &path)?;
        for library in shared_libraries(program)? {
            let path = library.display().to_string();
            let real = std::fs::canonicalize(&library)
                .map_err(|e| Error::io(format!("resolve {}", library.display()), e))?;
            self.host_file(&real, &path)?;
        }
        Ok(self)
    }

    /// This machine's busybox at `/bin/busybox`, with a link in `/bin` for each of its applets
    /// that the layer has no file for yet: `/bin/sh`, awk, sed, sort, httpd…
    pub fn busybox(&mut self) -> Result<&mut Self> {
        let busybox = Path::new("/bin/busybox");
        let output = std::process::Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(|e| Error::io("busybox --list (apt-get install busybox)", e))?;
        self.host_program(busybox)?;
        // The loader's `ldd` saw /bin/busybox; the program itself is moved to where the links
        // point.
        for applet in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if applet != "busybox" {
                self.symlink(&format!("/bin/{applet}"), "/bin/busybox")?;
            }
        }
        Ok(self)
    }

    /// Every file under this machine's directory `host`, at the same paths (links kept).
    pub fn host_tree(&mut self, host: &Path) -> Result<&mut Self> {
        let mut stack = vec![host.to_owned()];
        while let Some(dir) = stack.pop() {
            let entries =
                std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            entries.sort();
            for entry in entries {
                let meta = std::fs::symlink_metadata(&entry)
                    .map_err(|e| Error::io(format!("stat {}", entry.display()), e))?;
                let path = entry.display().to_string();
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&entry)
                        .map_err(|e| Error::io(format!("readlink {}", entry.display()), e))?;
                    self.symlink(&path, &target.display().to_string())?;
                } else if meta.is_dir() {
                    self.dir(&path, 0o755)?;
                    stack.push(entry);
                } else {
                    self.host_file(&entry, &path)?;
                }
            }
        }
        Ok(self)
    }

    /// `/etc/passwd`, `/etc/group` (root and nobody only, as a minimal image has),
    /// `/etc/nsswitch.conf`, `/tmp`.
    pub fn minimal_etc(&mut self) -> Result<&mut Self> {
        self.file(
            "/etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?
        .file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?
        .file(
            "/etc/nsswitch.conf",
            0o644,
            b"passwd: files\ngroup: files\nhosts: files dns\n",
        )?
        .dir("/tmp", 0o1777)?
        .dir("/root", 0o700)
    }

    pub fn finish(self) -> Result<Vec<u8>> {
        self.tar.into_inner().map_err(|e| Error::io("pack the layer", e))
    }
}

/// The shared libraries (and the loader) `ldd` lists for `program`.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let output = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| Error::io(format!("ldd {}", program.display()), e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(parse_ldd(&text))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and `/lib64/ld-linux-x86-64.so.2
/// (0x…)` lines; the vDSO and "not a dynamic executable" give nothing.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// What an image runs, and how.
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// An image: its uncompressed layers, config and manifest, as the registry stores them.
pub struct OciImage {
    pub layers: Vec<Vec<u8>>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl OciImage {
    /// A one-layer image whose layer holds `binary` as `/app`, the entrypoint.
    pub fn new(binary: &[u8]) -> Result<Self> {
        let mut layer = Layer::new();
        layer.file("/app", 0o755, binary)?;
        Self::from_layers(
            vec![layer.finish()?],
            &ImageConfig {
                entrypoint: vec!["/app".into()],
                ..Default::default()
            },
        )
    }

    pub fn from_layers(layers: Vec<Vec<u8>>, image: &ImageConfig) -> Result<Self> {
        let mut config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| digest(l)).collect::<Vec<_>>()},
        });
        let inner = &mut config["config"];
        if !image.entrypoint.is_empty() {
            inner["Entrypoint"] = serde_json::json!(image.entrypoint);
        }
        if !image.cmd.is_empty() {
            inner["Cmd"] = serde_json::json!(image.cmd);
        }
        if !image.env.is_empty() {
            inner["Env"] = serde_json::json!(image.env);
        }
        if let Some(dir) = &image.working_dir {
            inner["WorkingDir"] = serde_json::json!(dir);
        }
        let config = serde_json::to_vec(&config).expect("JSON values serialize");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(&config),
                "size": config.len(),
            },
            "layers": layers.iter().map(|layer| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest(layer),
                "size": layer.len(),
            })).collect::<Vec<_>>(),
        }))
        .expect("JSON values serialize");
        Ok(Self {
            layers,
            config,
            manifest,
        })
    }

    /// An OCI image layout archive (`oci-layout`, `index.json`, `blobs/sha256/…`) naming the
    /// image `name`, as `ctr images import` reads it.
    pub fn archive(&self, name: &str) -> Result<Vec<u8>> {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MANIFEST_TYPE,
                "digest": digest(&self.manifest),
                "size": self.manifest.len(),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name,
                },
            }],
        }))
        .expect("JSON values serialize");
        let mut archive = Layer::new();
        archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        archive.file("index.json", 0o644, &index)?;
        for blob in self.layers.iter().chain([&self.config, &self.manifest]) {
            archive.file(&format!("blobs/sha256/{}", sha256_hex(blob)), 0o644, blob)?;
        }
        archive.finish()
    }

    /// Pushes the image as `repository:tag` to a registry without authentication: each blob
    /// in one upload (skipped if the registry has it), then the manifest. `tls` is the CA a
    /// TLS registry's certificate is checked against; `None` is plain HTTP (loopback).
    pub async fn push(&self, registry: &str, repository: &str, tag: &str) -> Result<()> {
        self.push_with(&Endpoint::plain(registry), repository, tag).await
    }

    pub async fn push_with(&self, endpoint: &Endpoint, repository: &str, tag: &str) -> Result<()> {
        let registry = &endpoint.address;
        for blob in self.layers.iter().chain([&self.config]) {
            let head = format!("/v2/{repository}/blobs/{}", digest(blob));
            if endpoint.request("HEAD", &head, &[], &[]).await?.0 == 200 {
                continue;
            }
            let start = format!("/v2/{repository}/blobs/uploads/");
            let (status, headers, body) = endpoint.request("POST", &start, &[], &[]).await?;
            if status != 202 {
                return Err(push_error("POST", &start, status, &body));
            }
            let location = header(&headers, "location")
                .ok_or_else(|| Error::RealNode(format!("POST {start}: 202 without a Location")))?;
            let path = location
                .strip_prefix(&format!("{}://{registry}", endpoint.scheme()))
                .unwrap_or(location);
            let separator = if path.contains('?') { '&' } else { '?' };
            let put = format!("{path}{separator}digest={}", digest(blob));
            let (status, _, body) = endpoint
                .request("PUT", &put, &[("Content-Type", "application/octet-stream")], blob)
                .await?;
            if status != 201 {
                return Err(push_error("PUT", &put, status, &body));
            }
        }
        let path = format!("/v2/{repository}/manifests/{tag}");
        let (status, _, body) = endpoint
            .request("PUT", &path, &[("Content-Type", MANIFEST_TYPE)], &self.manifest)
            .await?;
        if status != 201 {
            return Err(push_error("PUT", &path, status, &body));
        }
        Ok(())
    }
}

fn push_error(method: &str, path: &str, status: u16, body: &str) -> Error {
    Error::RealNode(format!(
        "push: {method} {path} answered {status}: {}",
        body.trim()
    ))
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// An HTTP server to talk to: `host:port`, plain or TLS checked against one CA.
#[derive(Clone)]
pub struct Endpoint {
    pub address: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    pub fn plain(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            tls: None,
        }
    }

    /// TLS, trusting only `ca_pem`.
    pub fn tls(address: &str, ca_pem: &str) -> Result<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| Error::Pki(format!("CA PEM: {e}")))?;
            roots.add(cert).map_err(|e| Error::Pki(format!("CA: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Pki(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            address: address.to_owned(),
            tls: Some(Arc::new(config)),
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// One HTTP/1.1 request on a fresh connection (`Connection: close`): status, headers,
    /// body. Hand-written, so that test support needs no HTTP client crate.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Vec<(String, String)>, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = &self.address;
        let context = format!("{method} {}://{address}{path}", self.scheme());
        let io = |e| Error::io(context.clone(), e);
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| Error::RealNode(format!("{context}: connect timed out")))?
            .map_err(io)?;
        let mut stream: Box<dyn Stream> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| Error::Pki(format!("{host}: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                Box::new(connector.connect(name, tcp).await.map_err(io)?)
            }
        };
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        stream.write_all(body).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        let mut response = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response))
            .await
            .map_err(|_| Error::RealNode(format!("{context}: no answer within 60s")))?;
        // A TLS peer that closes without close_notify still sent its whole answer.
        if let Err(e) = read
            && (response.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof)
        {
            return Err(io(e));
        }
        let text = String::from_utf8_lossy(&response);
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::RealNode(format!("{context}: not an HTTP answer: {head}")))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok((status, headers, rest.to_owned()))
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_and_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibresolv.so.2 => /lib/x86_64-linux-gnu/libresolv.so.2 (0x7f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libresolv.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn layers_add_parent_directories_once_and_keep_the_first_file() {
        let mut layer = Layer::new();
        layer.file("/usr/bin/a", 0o755, b"one").unwrap();
        layer.file("/usr/bin/a", 0o755, b"two").unwrap();
        layer.symlink("/usr/bin/b", "a").unwrap();
        let bytes = layer.finish().unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["usr/", "usr/bin/", "usr/bin/a", "usr/bin/b"]);
    }

    #[test]
    fn image_blobs_match_their_digests() {
        let image = OciImage::new(b"#!/bin/true\n").unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(manifest["config"]["digest"], digest(&image.config));
        assert_eq!(manifest["layers"][0]["digest"], digest(&image.layers[0]));
        let config: serde_json::Value = serde_json::from_slice(&image.config).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], digest(&image.layers[0]));
        assert_eq!(config["config"]["Entrypoint"][0], "/app");
    }
}
