//! SLSA provenance v1 (`https://slsa.dev/provenance/v1`) of one platform's image, laid out as
//! BuildKit lays out its own (`solver/llbsolver/provenance`), with rbuild's build type. What
//! differs, on purpose: with `SOURCE_DATE_EPOCH` the timestamps are the epoch and the
//! invocation ID is derived from the inputs, so two reproducible builds give the same
//! provenance (BuildKit's always carry the wall clock and a random ID).

use rbuild_cache::Digest;
use rbuild_dag::Platform;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The SLSA v1 predicate type.
pub const SLSA_V1: &str = "https://slsa.dev/provenance/v1";
/// rbuild's build type: a Dockerfile build; its parameters are described in
/// docs/provenance.md.
pub const BUILD_TYPE: &str = "urn:rbuild:buildtype:dockerfile:v1";
/// The builder ID when `builder-id=` is not given.
pub const DEFAULT_BUILDER_ID: &str = "urn:rbuild:builder";

/// How much the provenance says, as BuildKit's `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Materials, the Dockerfile and the builder; no build-arg or label values, no secret or
    /// SSH IDs.
    Min,
    /// Also the build args and labels (their values) and the IDs of secrets and SSH sockets
    /// (never their contents).
    Max,
}

/// `--provenance`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenanceOpts {
    /// How much it says.
    pub mode: Mode,
    /// `runDetails.builder.id` (the action gives the workflow run's URL).
    pub builder_id: Option<String>,
}

/// Parses `--provenance`: `true`/`false`, `mode=min|max`, `builder-id=URI`, comma-separated
/// (buildx's `--attest type=provenance,…` keys). `None`: no provenance.
pub fn parse_opts(s: &str) -> Result<Option<ProvenanceOpts>, String> {
    let mut opts = ProvenanceOpts {
        mode: Mode::Max,
        builder_id: None,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            None if part == "true" || part == "1" => {}
            None if part == "false" || part == "0" => return Ok(None),
            Some(("mode", "min")) => opts.mode = Mode::Min,
            Some(("mode", "max" | "full")) => opts.mode = Mode::Max,
            Some(("disabled", "true")) => return Ok(None),
            Some(("disabled", "false")) | Some(("type", "provenance")) => {}
            Some(("builder-id", v)) if !v.is_empty() => opts.builder_id = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "{s:?}: {part:?} is not a provenance option (want true, false, mode=min|max or builder-id=URI)"
                ))
            }
        }
    }
    Ok(Some(opts))
}

/// A resolved base image: what `FROM`/`COPY --from` named and the manifest it got.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Material {
    /// The reference as resolved (`reg/busybox:latest`, `oci-layout://DIR:tag`).
    pub reference: String,
    /// The platform it was resolved for.
    pub platform: Platform,
    /// The manifest's digest.
    pub digest: Digest,
}

/// The git commit a context directory is checked out at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    /// `HEAD`'s commit (hex).
    pub commit: String,
    /// The `origin` remote's URL, credentials removed.
    pub remote: Option<String>,
}

/// Everything one platform's provenance records.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// What `--provenance` asked.
    pub opts: &'a ProvenanceOpts,
    /// The Dockerfile's name as given (relative to the context where it is inside it).
    pub dockerfile: String,
    /// Its content's digest.
    pub dockerfile_digest: Digest,
    /// `--build-arg`s.
    pub build_args: &'a BTreeMap<String, String>,
    /// `--label`s.
    pub labels: &'a BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<&'a str>,
    /// IDs of `--secret`s and `--ssh` sockets.
    pub secret_ids: Vec<String>,
    /// IDs of `--ssh` sockets.
    pub ssh_ids: Vec<String>,
    /// Base images this platform's build resolved.
    pub materials: Vec<Material>,
    /// The digest of what the build read from the context (see [`context_digest`]).
    pub context_digest: Option<Digest>,
    /// The context's git checkout, if it is one.
    pub git: Option<GitSource>,
    /// The platform the image is for.
    pub platform: &'a Platform,
    /// The machine that built it.
    pub builder_platform: Platform,
    /// When the build started and ended (RFC 3339).
    pub started: String,
    /// When it ended.
    pub finished: String,
    /// The build's ID, the same for every platform of it.
    pub invocation_id: String,
}

/// The SLSA v1 predicate.
pub fn predicate(i: &Inputs) -> Value {
    let max = i.opts.mode == Mode::Max;
    let mut args = Map::new();
    if max {
        for (k, v) in i.build_args {
            args.insert(format!("build-arg:{k}"), json!(v));
        }
        for (k, v) in i.labels {
            args.insert(format!("label:{k}"), json!(v));
        }
    }
    if let Some(t) = i.target {
        args.insert("target".into(), json!(t));
    }
    let mut request = json!({
        "frontend": "dockerfile",
        "locals": [{"name": "context"}, {"name": "dockerfile"}],
    });
    if !args.is_empty() {
        request["args"] = Value::Object(args);
    }
    // The IDs only, as BuildKit: `[{"id": "npmrc"}]`.
    let ids = |ids: &[String]| json!(ids.iter().map(|id| json!({ "id": id })).collect::<Vec<_>>());
    if max && !i.secret_ids.is_empty() {
        request["secrets"] = ids(&i.secret_ids);
    }
    if max && !i.ssh_ids.is_empty() {
        request["ssh"] = ids(&i.ssh_ids);
    }
    let mut deps: Vec<Value> = Vec::new();
    let mut materials = i.materials.clone();
    materials.sort();
    materials.dedup();
    for m in &materials {
        let uri = match m.reference.strip_prefix("oci-layout://") {
            Some(rest) => format!("pkg:oci/{rest}"),
            None => super::purl(&m.reference, &m.platform),
        };
        deps.push(json!({"uri": uri, "digest": {m.digest.algorithm(): m.digest.hex()}}));
    }
    if let Some(g) = &i.git {
        let mut d = json!({"digest": {"gitCommit": g.commit}});
        if let Some(r) = &g.remote {
            d["uri"] = json!(format!("git+{r}@{}", g.commit));
        } else {
            d["name"] = json!("context-git-checkout");
        }
        deps.push(d);
    }
    if let Some(c) = &i.context_digest {
        deps.push(json!({"name": "context", "digest": {c.algorithm(): c.hex()}}));
    }
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "configSource": {
                    "path": i.dockerfile,
                    "digest": {i.dockerfile_digest.algorithm(): i.dockerfile_digest.hex()},
                },
                "request": request,
            },
            "internalParameters": {
                "builderPlatform": i.builder_platform.to_string(),
                "targetPlatform": i.platform.to_string(),
            },
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {
                "id": i.opts.builder_id.clone().unwrap_or_else(|| DEFAULT_BUILDER_ID.into()),
                "version": {"rbuild": env!("CARGO_PKG_VERSION")},
            },
            "metadata": {
                "invocationId": i.invocation_id,
                "startedOn": i.started,
                "finishedOn": i.finished,
            },
        },
    })
}

/// The digest of what a build read from its context: each COPY/ADD source (as written) with
/// the digest of its content, sorted. Not the whole directory's: hashing files no step reads
/// would cost a walk of everything, and they did not go into the image.
pub fn context_digest(sources: &BTreeMap<String, Digest>) -> Option<Digest> {
    if sources.is_empty() {
        return None;
    }
    let mut text = String::new();
    for (s, d) in sources {
        text.push_str(&format!("{s}\t{d}\n"));
    }
    Some(Digest::of(text.as_bytes()))
}

/// The git checkout `dir` is in, read from the `.git` directory itself (no `git` binary is
/// needed in CI containers): HEAD's commit through a loose or packed ref, and `origin`'s URL.
pub fn git_source(dir: &Path) -> Option<GitSource> {
    let mut at = Some(dir);
    let git = loop {
        let d = at?;
        let g = d.join(".git");
        if g.is_dir() {
            break g;
        }
        if g.is_file() {
            // A worktree or submodule: `gitdir: PATH`.
            let text = std::fs::read_to_string(&g).ok()?;
            let p = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
            break if p.is_absolute() { p } else { d.join(p) };
        }
        at = d.parent();
    };
    // A worktree's refs live in the common directory.
    let common = std::fs::read_to_string(git.join("commondir"))
        .ok()
        .map(|c| git.join(c.trim()))
        .unwrap_or_else(|| git.clone());
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let commit = match head.strip_prefix("ref:") {
        None => head.to_string(),
        Some(r) => {
            let r = r.trim();
            match std::fs::read_to_string(common.join(r)) {
                Ok(c) => c.trim().to_string(),
                Err(_) => std::fs::read_to_string(common.join("packed-refs"))
                    .ok()?
                    .lines()
                    .find_map(|l| {
                        let (sha, name) = l.split_once(' ')?;
                        (name == r).then(|| sha.to_string())
                    })?,
            }
        }
    };
    if !(commit.len() == 40 || commit.len() == 64) || !commit.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    Some(GitSource {
        commit,
        remote: origin_url(&common),
    })
}

/// `[remote "origin"] url = …` of a git config, with any `user:password@` removed.
fn origin_url(git: &Path) -> Option<String> {
    let text = std::fs::read_to_string(git.join("config")).ok()?;
    let mut in_origin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_origin = line.replace(' ', "") == "[remote\"origin\"]";
        } else if in_origin {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "url" {
                    return Some(redact(v.trim()));
                }
            }
        }
    }
    None
}

fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((cred, host)) if !cred.contains('/') => format!("{scheme}://{host}"),
            _ => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_buildx_writes_them() {
        assert_eq!(parse_opts("false").unwrap(), None);
        assert_eq!(parse_opts("true").unwrap().unwrap().mode, Mode::Max);
        let o = parse_opts("mode=min,builder-id=https://ci/run/1")
            .unwrap()
            .unwrap();
        assert_eq!(o.mode, Mode::Min);
        assert_eq!(o.builder_id.as_deref(), Some("https://ci/run/1"));
        assert!(parse_opts("mode=huge").is_err());
    }

    #[test]
    fn git_checkouts_are_read_without_git() {
        let d = tempfile::tempdir().unwrap();
        let g = d.path().join(".git");
        std::fs::create_dir_all(g.join("refs/heads")).unwrap();
        std::fs::write(g.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(
            g.join("packed-refs"),
            format!("# pack-refs\n{sha} refs/heads/main\n"),
        )
        .unwrap();
        std::fs::write(
            g.join("config"),
            "[core]\n\tbare = false\n[remote \"origin\"]\n\turl = https://user:tok@example.com/a/b.git\n",
        )
        .unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let s = git_source(&sub).unwrap();
        assert_eq!(s.commit, sha);
        assert_eq!(s.remote.as_deref(), Some("https://example.com/a/b.git"));
        std::fs::write(
            g.join("refs/heads/main"),
            "fedcba9876543210fedcba9876543210fedcba98\n",
        )
        .unwrap();
        assert_eq!(
            git_source(&sub).unwrap().commit,
            "fedcba9876543210fedcba9876543210fedcba98",
            "a loose ref wins over packed-refs"
        );
        assert!(git_source(tempfile::tempdir().unwrap().path()).is_none());
    }
}
