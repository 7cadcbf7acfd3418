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
        let kv = rbuild_dag::mount::parse_kv(spec);
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

#[cfg(test)]
mod tests {
    use super::*;

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
