//! `RUN --mount` specs, parsed once, as BuildKit's frontend reads them: the one mount parser
//! (the plan reads `from=` here, the builder everything else).

use std::collections::BTreeMap;

/// A `--mount` value that is not valid; the message names the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MountError(String);

macro_rules! err {
    ($($t:tt)*) => {
        MountError(format!($($t)*))
    };
}

/// A parsed `--mount` of a RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The spec as written (after `${}` expansion): what a step's cache key holds.
    pub spec: String,
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

/// Comma-separated `key=value` fields (a bare key is `true`), keys lowercased: the form of
/// `--mount`, `--secret` and `--ssh` values.
pub fn parse_kv(spec: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => out.insert(k.trim().to_lowercase(), v.trim().to_string()),
            None => out.insert(part.trim().to_lowercase(), "true".to_string()),
        };
    }
    out
}

fn parse_bool(k: &str, v: &str) -> Result<bool, MountError> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(err!("--mount {k}={v}: want true or false")),
    }
}

/// Parses one `--mount=` value as BuildKit does.
pub fn parse_mount(spec: &str) -> Result<MountSpec, MountError> {
    let kv = parse_kv(spec);
    let mut m = MountSpec {
        spec: spec.to_string(),
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
                _ => return Err(err!("--mount sharing={v}: want shared, private or locked")),
            },
            "mode" => {
                m.mode = Some(
                    u32::from_str_radix(v, 8)
                        .map_err(|_| err!("--mount mode={v}: want an octal mode"))?,
                )
            }
            "uid" => {
                m.uid = Some(
                    v.parse()
                        .map_err(|_| err!("--mount uid={v}: want a number"))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    v.parse()
                        .map_err(|_| err!("--mount gid={v}: want a number"))?,
                )
            }
            "size" => m.size = Some(parse_size(v)?),
            "required" => m.required = Some(parse_bool(k, v)?),
            "env" => m.env = Some(v.clone()),
            other => return Err(err!("--mount: unknown key {other:?} in {spec:?}")),
        }
    }
    match m.kind.as_str() {
        "bind" | "cache" | "tmpfs" | "secret" | "ssh" => {}
        other => {
            return Err(err!(
                "--mount type={other}: want bind, cache, tmpfs, secret or ssh"
            ))
        }
    }
    if m.target.is_none() && !matches!(m.kind.as_str(), "secret" | "ssh") {
        return Err(err!("--mount type={} needs target=", m.kind));
    }
    if let Some(t) = &m.target {
        if !t.starts_with('/') {
            return Err(err!("--mount target={t}: must be an absolute path"));
        }
        if std::path::Path::new(t)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(err!(
                "--mount target={t}: .. is not allowed in a mount target"
            ));
        }
    }
    Ok(m)
}

fn parse_size(v: &str) -> Result<u64, MountError> {
    crate::units::parse_size(v, crate::units::SizeUnits::Binary)
        .map_err(|e| err!("--mount size={v}: {e}"))
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
}
