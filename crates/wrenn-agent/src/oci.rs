//! OCI images as template bases: pulled from a registry (anonymous or with credentials; every
//! blob checked against its digest), unpacked layer by layer with whiteouts applied, given what
//! a capsule needs to boot (mount points, hostname, resolver, the image's user, environment and
//! working directory as the template's defaults), and packed into a disk.
//!
//! All of it runs on the host: unpacking and making a filesystem cost a fraction of what they
//! would inside a guest under TCG. Registries on loopback are spoken to over plain HTTP (as
//! container tools do); every other over HTTPS, trusting the host's CA store.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use envd_proto::TemplateDefaults;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use wrenn_host::{HostError, RegistryCredentials};

use crate::cmd;
use crate::error::Result;
use crate::images::path_str;

/// Most layers an image may have.
const MAX_LAYERS: usize = 128;
/// Most bytes of (compressed) layers an image may have.
const MAX_IMAGE_BYTES: i64 = 8 * 1024 * 1024 * 1024;
/// Longest a whole pull may take.
const PULL_DEADLINE: Duration = Duration::from_secs(30 * 60);

const LAYER_TAR: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
];
const LAYER_GZIP: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// What an image's configuration says about how its processes run.
#[derive(Debug, Default, PartialEq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
}

fn pull_error(reference: &str, e: impl std::fmt::Display) -> HostError {
    HostError::InvalidRequest(format!("pulling {reference}: {e}"))
}

/// Pulls `reference` and unpacks its layers into `root`; notes what it did in `log`.
pub async fn pull(
    reference: &str,
    auth: Option<&RegistryCredentials>,
    work: &Path,
    root: &Path,
    log: &mut Vec<String>,
) -> Result<ImageConfig> {
    // The process-wide TLS provider (ring); already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed = Reference::try_from(reference).map_err(|e| {
        HostError::InvalidRequest(format!("bad image reference {reference:?}: {e}"))
    })?;
    let registry = parsed.resolve_registry().to_string();
    let host = registry
        .rsplit_once(':')
        .map_or(registry.as_str(), |(h, _)| h);
    let loopback = matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1");
    let protocol = if loopback {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    let auth = match auth {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let pulled = tokio::time::timeout(PULL_DEADLINE, async {
        let (manifest, digest, config) = client
            .pull_manifest_and_config(&parsed, &auth)
            .await
            .map_err(|e| pull_error(reference, e))?;
        if manifest.layers.len() > MAX_LAYERS {
            return Err(pull_error(
                reference,
                format!("more than {MAX_LAYERS} layers"),
            ));
        }
        let total: i64 = manifest.layers.iter().map(|l| l.size.max(0)).sum();
        if total > MAX_IMAGE_BYTES {
            return Err(pull_error(reference, "layers larger than 8 GiB"));
        }
        log.push(format!(
            "{reference}: manifest {digest}, {} layers, {} MiB",
            manifest.layers.len(),
            total >> 20
        ));
        std::fs::create_dir_all(root)?;
        for (i, layer) in manifest.layers.iter().enumerate() {
            let gzip = if LAYER_GZIP.contains(&layer.media_type.as_str()) {
                true
            } else if LAYER_TAR.contains(&layer.media_type.as_str()) {
                false
            } else {
                return Err(pull_error(
                    reference,
                    format!(
                        "layer {} has unsupported media type {}",
                        i + 1,
                        layer.media_type
                    ),
                ));
            };
            let path = work.join(format!("layer-{i}"));
            let file = tokio::fs::File::create(&path).await?;
            client
                .pull_blob(&parsed, layer, file)
                .await
                .map_err(|e| pull_error(reference, format!("layer {}: {e}", i + 1)))?;
            let (p, r) = (path.clone(), root.to_path_buf());
            tokio::task::spawn_blocking(move || unpack_layer(&p, gzip, &r))
                .await
                .map_err(|e| HostError::Image(format!("unpack task: {e}")))?
                .map_err(|e| pull_error(reference, format!("layer {}: {e}", i + 1)))?;
            let _ = std::fs::remove_file(&path);
            log.push(format!("layer {} ({}) unpacked", i + 1, layer.digest));
        }
        Ok(parse_config(&config))
    })
    .await
    .map_err(|_| pull_error(reference, "took longer than 30 minutes"))??;
    Ok(pulled)
}

fn parse_config(config: &str) -> ImageConfig {
    let v: serde_json::Value = serde_json::from_str(config).unwrap_or_default();
    let c = &v["config"];
    let s = |k: &str| c[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
    ImageConfig {
        env: c["Env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        user: s("User"),
        working_dir: s("WorkingDir"),
    }
}

/// `root` joined with an archive path, refusing anything that leaves `root` (`..`, absolute
/// paths, or a parent that is a symlink).
fn inside(root: &Path, path: &Path) -> std::io::Result<PathBuf> {
    let bad = || std::io::Error::other(format!("path {} leaves the image", path.display()));
    let mut out = root.to_path_buf();
    let parts: Vec<_> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    for (i, c) in parts.iter().enumerate() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return Err(bad()),
        }
        let last = i + 1 == parts.len();
        if !last {
            if let Ok(m) = std::fs::symlink_metadata(&out) {
                if m.file_type().is_symlink() {
                    return Err(bad());
                }
            }
        }
    }
    Ok(out)
}

fn open_layer(path: &Path, gzip: bool) -> std::io::Result<tar::Archive<Box<dyn Read>>> {
    let f = std::fs::File::open(path)?;
    let r: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    Ok(tar::Archive::new(r))
}

/// Applies one layer to `root`: first its whiteouts (which only ever remove what lower layers
/// made), then its files.
pub fn unpack_layer(path: &Path, gzip: bool, root: &Path) -> std::io::Result<()> {
    for entry in open_layer(path, gzip)?.entries()? {
        let entry = entry?;
        let p = entry.path()?.into_owned();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let parent = p.parent().unwrap_or(Path::new(""));
        if name == ".wh..wh..opq" {
            // Opaque directory: nothing below it from lower layers survives.
            let dir = inside(root, parent)?;
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    remove_any(&e.path())?;
                }
            }
        } else if let Some(gone) = name.strip_prefix(".wh.") {
            remove_any(&inside(root, &parent.join(gone))?)?;
        }
    }
    let mut archive = open_layer(path, gzip)?;
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let p = entry.path()?.into_owned();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
        {
            continue;
        }
        // A directory replacing a file (or the reverse) from a lower layer.
        let target = inside(root, &p)?;
        if let Ok(m) = std::fs::symlink_metadata(&target) {
            let is_dir = entry.header().entry_type().is_dir();
            if m.is_dir() != is_dir || m.file_type().is_symlink() {
                remove_any(&target)?;
            }
        }
        // `unpack_in` refuses paths that leave `root` (also through symlinks).
        entry.unpack_in(root)?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What the image's configuration makes of a capsule's defaults. A numeric `User` (or
/// `uid:gid`) is kept by name only when the image's /etc/passwd has it.
pub fn defaults(config: &ImageConfig, root: &Path) -> TemplateDefaults {
    let user = config.user.as_deref().and_then(|u| {
        let name = u.split(':').next().unwrap_or(u);
        if name.chars().all(|c| c.is_ascii_digit()) {
            let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == name).then(|| f[0].to_string())
            })
        } else {
            Some(name.to_string())
        }
    });
    TemplateDefaults {
        user,
        env: config
            .env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cwd: config.working_dir.clone(),
    }
}

/// Gives an unpacked image what every capsule needs (the mount points the guest's init uses,
/// its name and resolver, the template's defaults) and packs it into a qcow2 disk of
/// `disk_mb` MiB at `out`.
pub async fn make_disk(
    root: &Path,
    defaults: &TemplateDefaults,
    disk_mb: u64,
    out: &Path,
) -> Result<()> {
    for d in ["dev", "proc", "sys", "tmp", "run", "etc/wrenn", "root"] {
        std::fs::create_dir_all(inside(root, Path::new(d))?)?;
    }
    for (f, text) in [
        ("etc/hostname", "capsule\n"),
        (
            "etc/hosts",
            "127.0.0.1 localhost\n127.0.1.1 capsule\n::1 localhost ip6-localhost ip6-loopback\n",
        ),
        (
            "etc/resolv.conf",
            "nameserver 1.1.1.1\nnameserver 8.8.8.8\noptions timeout:2 attempts:2\n",
        ),
    ] {
        let p = inside(root, Path::new(f))?;
        remove_any(&p)?;
        std::fs::write(p, text)?;
    }
    let json = serde_json::to_vec_pretty(defaults).map_err(|e| HostError::Io(e.into()))?;
    std::fs::write(root.join("etc/wrenn/defaults.json"), json)?;
    let raw = out.with_extension("ext4");
    let _ = std::fs::remove_file(&raw);
    let made = async {
        crate::disk::ext4_from_dir(root, &raw, disk_mb)
            .await
            .map_err(|e| HostError::Image(format!("making the image's filesystem: {e}")))?;
        cmd::run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                path_str(&raw)?,
                path_str(out)?,
            ],
        )
        .await?;
        Ok::<_, HostError>(())
    }
    .await;
    let _ = std::fs::remove_file(&raw);
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(
        dir: &Path,
        name: &str,
        entries: &[(&str, tar::EntryType, &[u8], Option<&str>)],
    ) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            let n = h.as_old_mut().name.as_mut();
            n[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        let p = dir.join(name);
        std::fs::write(&p, b.into_inner().unwrap()).unwrap();
        p
    }

    #[test]
    fn layers_stack_with_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        use tar::EntryType::*;
        let l1 = layer(
            t.path(),
            "l1",
            &[
                ("etc/", Directory, b"", None),
                ("etc/doomed", Regular, b"x", None),
                ("etc/kept", Regular, b"k", None),
                ("opaque/", Directory, b"", None),
                ("opaque/old", Regular, b"o", None),
                ("was-file", Regular, b"f", None),
            ],
        );
        let l2 = layer(
            t.path(),
            "l2",
            &[
                ("etc/.wh.doomed", Regular, b"", None),
                ("opaque/.wh..wh..opq", Regular, b"", None),
                ("opaque/new", Regular, b"n", None),
                ("was-file/", Directory, b"", None),
                ("was-file/inner", Regular, b"i", None),
            ],
        );
        unpack_layer(&l1, false, &root).unwrap();
        unpack_layer(&l2, false, &root).unwrap();
        assert!(!root.join("etc/doomed").exists());
        assert_eq!(std::fs::read(root.join("etc/kept")).unwrap(), b"k");
        assert!(!root.join("opaque/old").exists() && root.join("opaque/new").exists());
        assert!(root.join("was-file/inner").exists());
        assert!(!root.join("etc/.wh.doomed").exists());
    }

    #[test]
    fn hostile_layers_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"p").unwrap();
        use tar::EntryType::*;
        let target = outside.to_str().unwrap().to_string();
        let lower = layer(
            t.path(),
            "lower",
            &[("link", Symlink, b"", Some(target.as_str()))],
        );
        unpack_layer(&lower, false, &root).unwrap();
        let l = layer(
            t.path(),
            "evil",
            &[("link/.wh.precious", Regular, b"", None)],
        );
        assert!(unpack_layer(&l, false, &root).is_err());
        assert!(
            outside.join("precious").exists(),
            "a whiteout reached outside the image"
        );
        let l = layer(
            t.path(),
            "evil2",
            &[
                ("link2", Symlink, b"", Some(target.as_str())),
                ("link2/x", Regular, b"x", None),
            ],
        );
        assert!(unpack_layer(&l, false, &root).is_err());
        assert!(!outside.join("x").exists());
    }

    #[test]
    fn config_becomes_defaults() {
        let cfg = parse_config(
            r#"{"config":{"Env":["PATH=/bin","A=b=c"],"User":"1000:1000","WorkingDir":"/app"}}"#,
        );
        assert_eq!(cfg.working_dir.as_deref(), Some("/app"));
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let d = defaults(&cfg, t.path());
        assert_eq!(d.user.as_deref(), Some("app"));
        assert_eq!(d.env["A"], "b=c");
        assert_eq!(parse_config("not json"), ImageConfig::default());
    }
}
