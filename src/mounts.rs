//! `RUN --mount` specs and `--secret` sources, turned into sandbox mounts.

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where a `--secret` comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file's content.
    File(PathBuf),
    /// An environment variable of the rbuild process: its value, taken out of the environment
    /// when the secrets are parsed (`None`: it was not set).
    Env {
        /// The variable's name.
        var: String,
        /// Its value.
        value: Option<Vec<u8>>,
    },
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
            // Never the value.
            SecretSource::Env { var, value } => f
                .debug_struct("Env")
                .field("var", var)
                .field("set", &value.is_some())
                .finish(),
        }
    }
}

/// Parses `--secret id=ID[,src=FILE|,env=VAR]` values (like buildx: with neither, the
/// environment variable named ID). The values of environment variables are read now and the
/// variables removed from rbuild's environment, so no process rbuild starts inherits them and
/// none is kept where a step sharing rbuild's PID namespace could look. Call it before any
/// thread exists.
pub fn parse_secrets(specs: &[String]) -> Result<BTreeMap<String, SecretSource>> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let kv = parse_kv(spec)?;
        let id = kv
            .get("id")
            .cloned()
            .ok_or_else(|| anyhow!("--secret {spec:?}: id= is required"))?;
        let src = match (kv.get("src").or(kv.get("source")), kv.get("env")) {
            (Some(f), _) => SecretSource::File(PathBuf::from(f)),
            (None, e) => {
                let var = e.unwrap_or(&id).clone();
                let value = rbuild_sandbox::take_env(&var);
                SecretSource::Env { var, value }
            }
        };
        out.insert(id, src);
    }
    Ok(out)
}

/// Parses `--ssh` values into agent socket paths by id.
pub fn parse_ssh(specs: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let (id, path) = match spec.split_once('=') {
            Some((id, p)) => (id.to_string(), PathBuf::from(p)),
            None => {
                let sock = std::env::var_os("SSH_AUTH_SOCK").ok_or_else(|| {
                    anyhow!("--ssh {spec}: SSH_AUTH_SOCK is not set; give {spec}=SOCKET")
                })?;
                (spec.clone(), PathBuf::from(sock))
            }
        };
        let md =
            std::fs::metadata(&path).map_err(|e| anyhow!("--ssh {id}: {}: {e}", path.display()))?;
        use std::os::unix::fs::FileTypeExt;
        if !md.file_type().is_socket() {
            bail!("--ssh {id}: {} is not a socket", path.display());
        }
        out.insert(id, path.canonicalize()?);
    }
    Ok(out)
}

/// A parsed `--mount` of a RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// `bind`, `cache`, `tmpfs`, `secret` or `ssh`.
    pub kind: String,
    /// Mount point inside the step (absolute).
    pub target: Option<String>,
    /// Path in the source.
    pub source: Option<String>,
    /// `from=`: a stage or image.
    pub from: Option<String>,
    /// Writable (bind: writes discarded; cache: always writable unless ro).
    pub rw: bool,
    /// Read-only (cache).
    pub readonly: bool,
    /// `id=` (cache, secret).
    pub id: Option<String>,
    /// `sharing=` of a cache.
    pub sharing: String,
    /// `mode=`, `uid=`, `gid=`.
    pub mode: Option<u32>,
    /// Owner uid.
    pub uid: Option<u32>,
    /// Owner gid.
    pub gid: Option<u32>,
    /// tmpfs `size=` in bytes.
    pub size: Option<u64>,
    /// `required=` (secret, ssh).
    pub required: Option<bool>,
    /// secret `env=`: expose as an environment variable instead of a file.
    pub env: Option<String>,
}

fn parse_kv(spec: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => out.insert(k.trim().to_lowercase(), v.trim().to_string()),
            None => out.insert(part.trim().to_lowercase(), "true".to_string()),
        };
    }
    Ok(out)
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => bail!("--mount {k}={v}: want true or false"),
    }
}

/// Parses one `--mount=` value as BuildKit does.
pub fn parse_mount(spec: &str) -> Result<MountSpec> {
    let kv = parse_kv(spec)?;
    let mut m = MountSpec {
        kind: kv.get("type").cloned().unwrap_or_else(|| "bind".into()),
        target: None,
        source: None,
        from: None,
        rw: false,
        readonly: false,
        id: None,
        sharing: "shared".into(),
        mode: None,
        uid: None,
        gid: None,
        size: None,
        required: None,
        env: None,
    };
    for (k, v) in &kv {
        match k.as_str() {
            "type" => {}
            "target" | "dst" | "destination" => m.target = Some(v.clone()),
            "source" | "src" => m.source = Some(v.clone()),
            "from" => m.from = Some(v.clone()),
            "rw" | "readwrite" => m.rw = parse_bool(k, v)?,
            "ro" | "readonly" => m.readonly = parse_bool(k, v)?,
            "id" => m.id = Some(v.clone()),
            "sharing" => match v.as_str() {
                "shared" | "private" | "locked" => m.sharing = v.clone(),
                _ => bail!("--mount sharing={v}: want shared, private or locked"),
            },
            "mode" => {
                m.mode = Some(
                    u32::from_str_radix(v, 8)
                        .map_err(|_| anyhow!("--mount mode={v}: want an octal mode"))?,
                )
            }
            "uid" => {
                m.uid = Some(
                    v.parse()
                        .map_err(|_| anyhow!("--mount uid={v}: want a number"))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    v.parse()
                        .map_err(|_| anyhow!("--mount gid={v}: want a number"))?,
                )
            }
            "size" => m.size = Some(parse_size(v)?),
            "required" => m.required = Some(parse_bool(k, v)?),
            "env" => m.env = Some(v.clone()),
            other => bail!("--mount: unknown key {other:?} in {spec:?}"),
        }
    }
    match m.kind.as_str() {
        "bind" | "cache" | "tmpfs" | "secret" | "ssh" => {}
        other => bail!("--mount type={other}: want bind, cache, tmpfs, secret or ssh"),
    }
    if m.target.is_none() && !matches!(m.kind.as_str(), "secret" | "ssh") {
        bail!("--mount type={} needs target=", m.kind);
    }
    if let Some(t) = &m.target {
        if !t.starts_with('/') {
            bail!("--mount target={t}: must be an absolute path");
        }
        if std::path::Path::new(t)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            bail!("--mount target={t}: .. is not allowed in a mount target");
        }
    }
    Ok(m)
}

fn parse_size(v: &str) -> Result<u64> {
    let (num, mult) = match v.to_lowercase().chars().last() {
        Some('k') => (&v[..v.len() - 1], 1u64 << 10),
        Some('m') => (&v[..v.len() - 1], 1 << 20),
        Some('g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| anyhow!("--mount size={v}: want bytes, or a number with k, m or g"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_like_buildkit() {
        let m =
            parse_mount("type=cache,target=/root/.cache,id=pip,sharing=locked,mode=0700,uid=1000")
                .unwrap();
        assert_eq!(
            (
                m.kind.as_str(),
                m.target.as_deref(),
                m.id.as_deref(),
                m.sharing.as_str(),
                m.mode,
                m.uid
            ),
            (
                "cache",
                Some("/root/.cache"),
                Some("pip"),
                "locked",
                Some(0o700),
                Some(1000)
            )
        );
        let m = parse_mount("target=/src,from=build,source=/out,rw").unwrap();
        assert_eq!(
            (
                m.kind.as_str(),
                m.from.as_deref(),
                m.source.as_deref(),
                m.rw
            ),
            ("bind", Some("build"), Some("/out"), true)
        );
        assert_eq!(
            parse_mount("type=tmpfs,target=/t,size=64m").unwrap().size,
            Some(64 << 20)
        );
        assert!(parse_mount("type=bogus,target=/x")
            .unwrap_err()
            .to_string()
            .contains("type=bogus"));
        assert!(parse_mount("type=cache")
            .unwrap_err()
            .to_string()
            .contains("target="));
        assert!(parse_mount("type=bind,target=rel")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(parse_mount("type=cache,target=/x,colour=red")
            .unwrap_err()
            .to_string()
            .contains("colour"));
    }

    #[test]
    fn mount_targets_with_dot_dot_are_refused() {
        let e = parse_mount("type=cache,target=/root/../../proc/sys")
            .unwrap_err()
            .to_string();
        assert!(e.contains(".. is not allowed"), "{e}");
        assert!(
            parse_mount("type=tmpfs,target=/a..b/c").is_ok(),
            "a name with dots is no .."
        );
    }

    #[test]
    fn secrets_parse() {
        let s = parse_secrets(&[
            "id=a,src=/f".into(),
            "id=b,env=RBUILD_UNSET_TEST_TOKEN".into(),
            "id=RBUILD_UNSET_TEST_C".into(),
        ])
        .unwrap();
        assert_eq!(s["a"], SecretSource::File("/f".into()));
        // Neither variable is set (reading a set one would change this test's environment).
        let unset = |var: &str| SecretSource::Env {
            var: var.into(),
            value: None,
        };
        assert_eq!(s["b"], unset("RBUILD_UNSET_TEST_TOKEN"));
        assert_eq!(s["RBUILD_UNSET_TEST_C"], unset("RBUILD_UNSET_TEST_C"));
        assert_eq!(
            format!("{:?}", s["b"]),
            "Env { var: \"RBUILD_UNSET_TEST_TOKEN\", set: false }",
            "Debug never shows a value"
        );
        assert!(parse_secrets(&["src=/f".into()]).is_err());
    }
}
