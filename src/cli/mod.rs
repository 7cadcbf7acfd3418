//! Command-line interface (clap).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// rbuild: build OCI images from Dockerfiles without a daemon and without privilege.
#[derive(Debug, Parser)]
#[command(name = "rbuild", version, about, long_about = None)]
#[command(after_help = AFTER_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The end of `rbuild --help`.
const AFTER_HELP: &str = "`rbuild CONTEXT` is short for `rbuild build CONTEXT`.

Exit status:
  0  success
  1  the command failed (a build step, the Dockerfile, an input, the registry, the store)
  2  usage error: an unknown flag or a bad value
  rbuild doctor: 0 full sandbox, 1 degraded, 2 no sandboxed build possible";

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // one value per process, parsed once
pub enum Command {
    /// Build an image from a Dockerfile and a context directory.
    Build(BuildArgs),
    /// Show the disk usage of the store (blobs, unpacked layers, cache records, cache mounts).
    Du(DuArgs),
    /// Remove build cache: least recently used records first, then everything nothing keeps.
    Prune(PruneArgs),
    /// Check what this environment lets rbuild do, with a fix for everything missing.
    /// Exit status 0: full sandbox; 1: degraded; 2: no sandboxed build possible.
    Doctor(DoctorArgs),
    /// Print a shell completion script, e.g. `rbuild completion bash >
    /// /etc/bash_completion.d/rbuild`.
    Completion(CompletionArgs),
    /// Print the man page (roff), e.g. `rbuild man > ~/.local/share/man/man1/rbuild.1`, or
    /// write one page per subcommand into a directory.
    Man(ManArgs),
}

/// Options of `rbuild completion`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Options of `rbuild man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write rbuild.1 and a page per subcommand (rbuild-build.1, ...) into this directory
    /// instead of printing rbuild.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Options of `rbuild doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// One JSON object instead of a report.
    #[arg(long)]
    pub json: bool,

    /// State directory whose filesystem is checked (as for `rbuild build`).
    #[arg(long, value_name = "DIR", env = "RBUILD_ROOT")]
    pub root: Option<PathBuf>,
}

/// Options of `rbuild du`.
#[derive(Debug, Args)]
pub struct DuArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also list every cache record (least recently used first) and cache mount.
    #[arg(short, long)]
    pub verbose: bool,

    /// Also check the store: hash every blob, and check that every cache record and layer
    /// name points at what it should; exit 1 if anything is wrong.
    #[arg(long)]
    pub verify: bool,

    /// State directory (as for `rbuild build`).
    #[arg(long, value_name = "DIR", env = "RBUILD_ROOT")]
    pub root: Option<PathBuf>,
}

/// Options of `rbuild prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Keep at most this much cache (e.g. `10GB`, `512MiB`), removing least recently used
    /// records first.
    #[arg(long = "keep-storage", value_name = "SIZE", value_parser = parse_size)]
    pub keep_storage: Option<u64>,

    /// `until=DURATION` (e.g. `24h`, `7d`, `1h30m`): remove records not used for that long.
    #[arg(long, value_name = "until=DURATION")]
    pub filter: Vec<String>,

    /// Remove all build cache, cache mounts included (images kept by name stay).
    #[arg(short, long)]
    pub all: bool,

    /// How long to wait for running builds on the store to end.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub wait: std::time::Duration,

    /// One JSON object instead of a summary line.
    #[arg(long)]
    pub json: bool,

    /// State directory (as for `rbuild build`).
    #[arg(long, value_name = "DIR", env = "RBUILD_ROOT")]
    pub root: Option<PathBuf>,
}

/// Parses `--keep-storage`: bytes, or a number with `K`/`M`/`G`/`T` (powers of 1000) or
/// `KiB`/`MiB`/… (powers of 1024), as docker does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    rbuild_dag::units::parse_size(s, rbuild_dag::units::SizeUnits::Decimal)
}

/// Parses one `--platform` entry (`linux/arm64`, `arm64`, `linux/arm/v7`), normalised.
pub fn parse_platform(s: &str) -> Result<rbuild_dag::Platform, String> {
    rbuild_dag::Platform::parse(s).map_err(|e| e.to_string())
}

/// `--provenance`, parsed (`None` inside: `false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance(pub Option<crate::attest::provenance::ProvenanceOpts>);

fn parse_sbom(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ if s.contains("generator=") => Err(format!(
            "{s:?}: rbuild scans the image itself; it runs no SBOM generator image"
        )),
        _ => Err(format!("{s:?}: want true or false")),
    }
}

fn parse_provenance(s: &str) -> Result<Provenance, String> {
    crate::attest::provenance::parse_opts(s).map(Provenance)
}

/// Parses a duration like docker's: `90s`, `30m`, `24h`, `7d`, `1h30m`, `1.5h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 30m, 24h, 7d, 1h30m)");
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..split].parse().map_err(|_| bad())?;
        let unit_end = rest[split..]
            .find(|c: char| c.is_ascii_digit())
            .map(|i| split + i)
            .unwrap_or(rest.len());
        let secs = match &rest[split..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "w" => 7.0 * 86400.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

/// Parses `rbuild prune --filter` values: only `until=DURATION` is known.
pub fn parse_prune_filters(filters: &[String]) -> Result<Option<std::time::Duration>, String> {
    let mut until = None;
    for f in filters {
        match f.split_once('=') {
            Some(("until", d)) => until = Some(parse_duration(d)?),
            _ => return Err(format!("--filter {f:?}: only until=DURATION is supported")),
        }
    }
    Ok(until)
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// `tty` on a terminal, `plain` otherwise.
    Auto,
    /// Live view of the running steps (a terminal only).
    Tty,
    /// One line per event, step output included.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// gzip (level 6): what every registry and runtime reads.
    Gzip,
    /// zstd (level 3): smaller and several times faster; needs containerd ≥ 1.5 / podman ≥ 3.
    Zstd,
    /// A plain tar.
    Uncompressed,
}

/// What a build asks of layer compression: `--compression`, `--compression-level` and
/// `--force-compression`, or the same keys of an `--output`, as buildx takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompressionChoice {
    /// The algorithm (gzip when unset).
    pub kind: Option<CompressionArg>,
    /// The level (the algorithm's default when unset).
    pub level: Option<i32>,
    /// Whether layers compressed otherwise (base images, cached layers) are recompressed.
    pub force: Option<bool>,
}

impl CompressionChoice {
    /// `other` on top of this; `what` names `other` in the error when both set a key to
    /// different values.
    pub fn merge(self, other: CompressionChoice, what: &str) -> Result<Self, String> {
        fn one<T: PartialEq + std::fmt::Debug>(
            a: Option<T>,
            b: Option<T>,
            key: &str,
            what: &str,
        ) -> Result<Option<T>, String> {
            match (a, b) {
                (Some(x), Some(y)) if x != y => Err(format!(
                    "{what}: {key} {y:?} differs from the {key} already asked for ({x:?}); rbuild compresses each layer once for every output"
                )),
                (x, y) => Ok(y.or(x)),
            }
        }
        Ok(CompressionChoice {
            kind: one(self.kind, other.kind, "compression", what)?,
            level: one(self.level, other.level, "compression-level", what)?,
            force: one(self.force, other.force, "force-compression", what)?,
        })
    }

    /// The compression of new layers, its level checked, and whether to force it on all.
    pub fn resolve(self) -> Result<(rbuild_snapshot::Compression, bool), String> {
        use rbuild_snapshot::Compression;
        let force = self.force.unwrap_or(false);
        let c = match (self.kind.unwrap_or(CompressionArg::Gzip), self.level) {
            (CompressionArg::Gzip, l) => match l.unwrap_or(6) {
                l @ 0..=9 => Compression::Gzip { level: l as u32 },
                l => return Err(format!("--compression-level {l}: gzip takes 0 to 9")),
            },
            (CompressionArg::Zstd, l) => match l.unwrap_or(3) {
                l @ 1..=22 => Compression::Zstd { level: l },
                l => return Err(format!("--compression-level {l}: zstd takes 1 to 22")),
            },
            (CompressionArg::Uncompressed, None) => Compression::Uncompressed,
            (CompressionArg::Uncompressed, Some(l)) => {
                return Err(format!(
                    "--compression-level {l}: uncompressed layers have no level"
                ))
            }
        };
        Ok((c, force))
    }
}

/// Network for RUN steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    /// The builder's own network (what `docker build` gives RUN).
    Host,
    /// A network namespace with only loopback.
    None,
}

/// `--isolation` of RUN steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// The full sandbox where possible; where the masks on /proc are locked, RUN steps share
    /// rbuild's PID namespace (a warning says what was lost and how to get it back).
    Auto,
    /// The full sandbox (own user, mount, PID, IPC and UTS namespaces and /proc), or no build.
    Strict,
    /// No namespaces: RUN steps run in rbuild's own root filesystem (containers where no
    /// namespace can be made).
    None,
}

/// Parses `--memory`: bytes, or a number with `k`, `m`, `g` or `t` (`b`, `i` and `ib` after it
/// allowed), all powers of 1024 as in `docker run --memory`; at least 6 MiB, as docker requires.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = rbuild_dag::units::parse_size(s, rbuild_dag::units::SizeUnits::Binary)
        .map_err(|e| format!("--memory {e}"))?;
    if bytes < 6 << 20 {
        return Err(format!("--memory {s:?}: a RUN step needs at least 6 MiB"));
    }
    Ok(bytes)
}

/// Parses `--cpus`: a positive number of CPUs, at least 0.01.
pub fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(c) if c.is_finite() && c >= 0.01 => Ok(c),
        _ => Err(format!(
            "--cpus {s:?}: want a number of CPUs of at least 0.01, e.g. 0.5 or 2"
        )),
    }
}

/// Parses `--pids-limit`: a whole number of processes; 0 means unlimited.
pub fn parse_pids_limit(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("--pids-limit {s:?}: want a whole number of processes (0: unlimited)"))
}

/// Options of `rbuild build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build context: a directory, a tar archive (plain, gzip or zstd), an http(s) URL of
    /// one, or `-` for a tar archive or a lone Dockerfile on standard input.
    pub context: PathBuf,

    /// The Dockerfile [default: CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Name and tag of the image, e.g. `registry:5000/app:1` (repeatable).
    #[arg(short = 't', long = "tag", value_name = "REF")]
    pub tags: Vec<String>,

    /// Set a build-time variable (repeatable). `--build-arg NAME` takes NAME's value from the environment.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_args: Vec<String>,

    /// Build this stage (and what it needs) instead of the last one.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,

    /// SLSA provenance v1 of each image, attached as BuildKit attaches it (an attestation
    /// manifest in the image index, which it then always makes): `true` (= `mode=max`),
    /// `false`, `mode=min|max`, `builder-id=URI`, comma-separated.
    #[arg(long, value_name = "OPTS", value_parser = parse_provenance)]
    pub provenance: Option<Provenance>,

    /// An SPDX 2.3 SBOM of each image's filesystem (Debian packages, Python distributions, npm
    /// packages, crates of `cargo auditable` binaries), attached as `--provenance` is:
    /// `true` or `false` (buildx's `--sbom`).
    #[arg(long, value_name = "BOOL", value_parser = parse_sbom)]
    pub sbom: Option<bool>,

    /// How attestations are attached: `index` (an attestation manifest in the image index, as
    /// BuildKit before 0.32), or `referrers` (an OCI 1.1 artifact with a `subject`, in the index
    /// and listed as a referrer of the image: through the tag schema where the registry has no
    /// referrers API).
    #[arg(long = "attest-as", value_enum, default_value = "index")]
    pub attest_as: crate::attest::AttestForm,

    /// An OCI annotation (repeatable), as buildx takes it: `[TYPE[,TYPE]:]KEY=VALUE`, TYPE being
    /// `manifest` (the default) or `manifest-descriptor` (an OCI layout's `index.json` entry),
    /// each optionally for one platform (`manifest[linux/arm64]:KEY=VALUE`). `index` and
    /// `index-descriptor` need an image index, which a single-platform build does not make.
    #[arg(long = "annotation", value_name = "[TYPE:]KEY=VALUE", value_parser = crate::annotations::parse_annotation)]
    pub annotations: Vec<crate::annotations::Annotation>,

    /// Set a label in the image config (repeatable), over the Dockerfile's `LABEL`s.
    /// `--label KEY` sets an empty value, as docker does.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// Push the image to the registry of every `--tag` (same as `--output type=registry`).
    #[arg(long)]
    pub push: bool,

    /// Where the result goes (repeatable): `type=registry`, `type=oci,dest=DIR`,
    /// `type=docker,dest=FILE.tar`, `type=local,dest=DIR`. A bare path means `type=local,dest=PATH`.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,

    /// Speak plain HTTP to this registry (repeatable). Loopback registries use HTTP anyway.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// Do not use the build cache: every step runs.
    #[arg(long)]
    pub no_cache: bool,

    /// Ask the registry what each base image tag points to now. Without it, a tag resolved
    /// less than 10 minutes ago is not asked again, and when the registry cannot be reached
    /// the last resolution is used (with a warning).
    #[arg(long)]
    pub pull: bool,

    /// When a base image's registry cannot be reached, use what its tag pointed to at the
    /// last successful resolution only if that is at most this old (`30m`, `24h`, `7d`).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub stale_tag_max_age: std::time::Duration,

    /// Let `ADD <url>` and context URLs fetch from link-local addresses (169.254.0.0/16,
    /// fe80::/10, fd00:ec2::254), where clouds serve the machine's metadata and credentials;
    /// refused by default.
    #[arg(long)]
    pub allow_link_local_urls: bool,

    /// How many times a registry request is tried again after a failure that may go away
    /// (5xx, 429 with its Retry-After, a connection error or reset, a body cut short), with
    /// exponential backoff and jitter; 0: never [default: 5, or `RBUILD_REGISTRY_RETRIES`].
    #[arg(long, value_name = "N")]
    pub registry_retries: Option<usize>,

    /// Grants an entitlement, as `docker buildx build --allow` does: `security.insecure` lets
    /// `RUN --security=insecure` steps keep every capability of their user namespace, with no
    /// seccomp filter (what a nested build needs).
    #[arg(long = "allow", value_enum, value_name = "ENTITLEMENT")]
    pub allow: Vec<Entitlement>,

    /// Network of RUN steps.
    #[arg(long, value_enum, default_value = "host")]
    pub network: NetworkArg,

    /// How much of the sandbox RUN steps must get: `auto` takes what the environment allows and
    /// says what was lost, `strict` fails instead, `none` runs them without namespaces.
    #[arg(long, value_enum, default_value = "auto")]
    pub isolation: IsolationArg,

    /// Memory limit of each RUN step: bytes, or with a unit (`64m`, `512MiB`, `2g`; binary units, as docker).
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    pub memory: Option<u64>,

    /// CPU time of each RUN step, in CPUs (`0.5`: half of one).
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus)]
    pub cpus: Option<f64>,

    /// Maximum number of processes (and threads) of each RUN step [default: 2048]; 0: unlimited.
    #[arg(long = "pids-limit", value_name = "N", env = "RBUILD_PIDS_LIMIT", value_parser = parse_pids_limit)]
    pub pids_limit: Option<u64>,

    /// Progress output.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,

    /// Write the image ID (the config digest) to this file.
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,

    /// Write build metadata as JSON to this file (image digest, config digest, tags).
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,

    /// Reproducible output: timestamps clamped to `SOURCE_DATE_EPOCH` (from the environment or
    /// `--build-arg`; 0 when unset), so the same inputs give the same digests anywhere.
    #[arg(long)]
    pub reproducible: bool,

    /// Compression of new layers (default gzip). The same as an --output's `compression=`.
    #[arg(long, value_enum)]
    pub compression: Option<CompressionArg>,

    /// Compression level of new layers: 0-9 for gzip (default 6), 1-22 for zstd (default 3).
    /// The same as an --output's `compression-level=`.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub compression_level: Option<i32>,

    /// Recompress the layers of the image that are compressed otherwise (base images, layers
    /// cached from another compression), as buildx's `force-compression=true`.
    #[arg(long)]
    pub force_compression: bool,

    /// Target platforms, comma-separated or repeated (default: this machine's). More than one
    /// builds an image per platform, in one plan, and makes an image index of them; RUN steps
    /// of a foreign architecture run through qemu-user (binfmt_misc; see `rbuild doctor`).
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]", value_delimiter = ',', value_parser = parse_platform)]
    pub platforms: Vec<rbuild_dag::Platform>,

    /// A secret for `RUN --mount=type=secret` (repeatable): `id=ID,src=FILE` or `id=ID,env=VAR`.
    /// Secrets never enter a layer, a cache key or the image history.
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<String>,

    /// Forward an SSH agent to `RUN --mount=type=ssh` (repeatable): `default` (from
    /// `$SSH_AUTH_SOCK`), `ID=SOCKET`, or `default=SOCKET`.
    #[arg(long = "ssh", value_name = "default|ID=SOCKET")]
    pub ssh: Vec<String>,

    /// An extra named context (repeatable): `NAME=DIR` (for `COPY --from=NAME`),
    /// `NAME=docker-image://REF` or `NAME=oci-layout://DIR[:TAG]` (replaces the image NAME in
    /// `FROM` and `COPY --from`).
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    pub build_contexts: Vec<String>,

    /// Print the stage graph (`dag`: text, `dot`: Graphviz) of what would be built, and exit.
    #[arg(long, value_name = "dag|dot")]
    pub print: Option<String>,

    /// How much of rbuild's own CPU work (COPY/ADD, turning a step's changes into a layer)
    /// runs at once [default: number of cores]. RUN steps are not bounded by it: independent
    /// ones all run at once, as in BuildKit.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Import build cache (repeatable): `type=registry,ref=REF` (a cache artifact written by
    /// `--cache-to type=registry`, or an image pushed with an inline cache), `type=local,src=DIR`,
    /// or a bare `REF`. Layers are fetched only when a step or the output needs them.
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,

    /// Export build cache (repeatable): `type=registry,ref=REF[,mode=min|max]`,
    /// `type=local,dest=DIR[,mode=min|max]`, or `type=inline` (into the pushed image's config).
    /// `mode=min` (default) exports the steps of the final image, `mode=max` every step built.
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,

    /// State directory [default: $XDG_DATA_HOME/rbuild, ~/.local/share/rbuild, or /var/lib/rbuild as root].
    #[arg(long, value_name = "DIR", env = "RBUILD_ROOT")]
    pub root: Option<PathBuf>,
}

/// Inserts `build` when the first argument is not a subcommand or a top-level flag.
pub fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        let top_level = matches!(first, "-h" | "--help" | "-V" | "--version");
        let subcommand = first == "help"
            || <Cli as clap::CommandFactory>::command()
                .find_subcommand(first)
                .is_some();
        if !top_level && !subcommand {
            args.insert(1, "build".into());
        }
    }
    args
}

/// One parsed `--output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// Push to the registry of every tag.
    Registry,
    /// An OCI image layout directory.
    Oci(PathBuf),
    /// A `docker load` archive.
    Docker(PathBuf),
    /// The root filesystem, unpacked.
    Local(PathBuf),
}

/// Parses one `--output` value, and what it asks of layer compression.
pub fn parse_output(spec: &str) -> Result<(OutputSpec, CompressionChoice), String> {
    let mut comp = CompressionChoice::default();
    if !spec.contains('=') {
        return Ok((OutputSpec::Local(PathBuf::from(spec)), comp));
    }
    let mut kind = None;
    let mut dest = None;
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--output {spec:?}: {part:?} is not KEY=VALUE"))?;
        match k {
            "type" => kind = Some(v.to_string()),
            "dest" => dest = Some(PathBuf::from(v)),
            "push" if v == "true" => kind = Some("registry".into()),
            "name" | "push" => {}
            "compression" => {
                comp.kind = Some(CompressionArg::from_str(v, false).map_err(|_| {
                    format!("--output {spec:?}: compression {v:?}: want gzip, zstd or uncompressed")
                })?)
            }
            "compression-level" => {
                comp.level = Some(v.parse().map_err(|_| {
                    format!("--output {spec:?}: compression-level {v:?} is not a number")
                })?)
            }
            "force-compression" => {
                comp.force = Some(v.parse().map_err(|_| {
                    format!("--output {spec:?}: force-compression {v:?}: want true or false")
                })?)
            }
            _ => return Err(format!("--output {spec:?}: unknown key {k:?}")),
        }
    }
    let kind = kind.ok_or_else(|| format!("--output {spec:?}: missing type="))?;
    let need_dest = |kind: &str| {
        dest.clone()
            .ok_or_else(|| format!("--output {spec:?}: type={kind} needs dest="))
    };
    let out = match kind.as_str() {
        "registry" | "image" => OutputSpec::Registry,
        "oci" => OutputSpec::Oci(need_dest("oci")?),
        "docker" | "tar" => OutputSpec::Docker(need_dest("docker")?),
        "local" => OutputSpec::Local(need_dest("local")?),
        other => {
            return Err(format!(
                "--output {spec:?}: unknown type {other:?} (registry, oci, docker, local)"
            ))
        }
    };
    if matches!(out, OutputSpec::Local(_)) && comp != CompressionChoice::default() {
        return Err(format!(
            "--output {spec:?}: a local directory has no layers to compress"
        ));
    }
    Ok((out, comp))
}

/// Which steps a cache export covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// The steps whose results make up the final image.
    Min,
    /// Every step of every stage the build ran or reused.
    Max,
}

/// One parsed `--cache-from` or `--cache-to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSpec {
    /// A cache artifact (or an image with an inline cache) in a registry.
    Registry {
        /// The image reference of the artifact.
        reference: String,
        /// What to export (ignored for import).
        mode: CacheMode,
    },
    /// An OCI image layout directory holding a cache artifact.
    Local {
        /// The directory.
        dir: PathBuf,
        /// What to export (ignored for import).
        mode: CacheMode,
    },
    /// Cache records in the pushed image's own config (export only; import with `type=registry`).
    Inline,
}

/// Parses a `--cache-from` (`import`) or `--cache-to` value.
pub fn parse_cache_spec(spec: &str, import: bool) -> Result<CacheSpec, String> {
    let flag = if import { "--cache-from" } else { "--cache-to" };
    if !spec.contains('=') {
        if import && !spec.is_empty() {
            return Ok(CacheSpec::Registry {
                reference: spec.to_string(),
                mode: CacheMode::Min,
            });
        }
        return Err(format!(
            "{flag} {spec:?}: want type=registry,ref=REF, type=local,{}=DIR or type=inline",
            if import { "src" } else { "dest" }
        ));
    }
    let (mut kind, mut reference, mut dir, mut mode) = (None, None, None, CacheMode::Min);
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{flag} {spec:?}: {part:?} is not KEY=VALUE"))?;
        match k {
            "type" => kind = Some(v.to_string()),
            "ref" => reference = Some(v.to_string()),
            "src" if import => dir = Some(PathBuf::from(v)),
            "dest" if !import => dir = Some(PathBuf::from(v)),
            "mode" if !import => {
                mode = match v {
                    "min" => CacheMode::Min,
                    "max" => CacheMode::Max,
                    _ => {
                        return Err(format!(
                            "{flag} {spec:?}: mode must be min or max, not {v:?}"
                        ))
                    }
                }
            }
            // Options of other builders that change nothing here.
            "compression" | "compression-level" | "force-compression" | "oci-mediatypes"
            | "image-manifest" | "ignore-error" | "digest" | "tag" => {}
            _ => return Err(format!("{flag} {spec:?}: unknown key {k:?}")),
        }
    }
    match kind.as_deref().unwrap_or("registry") {
        "registry" => Ok(CacheSpec::Registry {
            reference: reference
                .ok_or_else(|| format!("{flag} {spec:?}: type=registry needs ref="))?,
            mode,
        }),
        "local" => Ok(CacheSpec::Local {
            dir: dir.ok_or_else(|| {
                format!(
                    "{flag} {spec:?}: type=local needs {}=",
                    if import { "src" } else { "dest" }
                )
            })?,
            mode,
        }),
        "inline" if !import => Ok(CacheSpec::Inline),
        "inline" => Err(format!(
            "{flag} {spec:?}: an inline cache is read with type=registry,ref=IMAGE"
        )),
        other => Err(format!(
            "{flag} {spec:?}: unknown type {other:?} (registry, local{})",
            if import { "" } else { ", inline" }
        )),
    }
}

/// Parses `--build-arg` values; `NAME` alone takes the value from the environment (and is
/// skipped when unset, as docker does).
pub fn parse_build_args(args: &[String]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for a in args {
        match a.split_once('=') {
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    out.insert(a.clone(), v);
                }
            }
        }
    }
    out
}

/// Parses `--label` values (`KEY=VALUE`, or `KEY` for an empty value); the last one of a key wins.
pub fn parse_labels(
    labels: &[String],
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for l in labels {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        if k.is_empty() {
            return Err(format!("--label {l:?}: the key is empty (want KEY=VALUE)"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
/// An entitlement of `--allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Entitlement {
    /// `RUN --security=insecure`.
    #[value(name = "security.insecure")]
    SecurityInsecure,
}
