//! The `rbuild` command.

#![forbid(unsafe_code)]

use rbuild::build::{build, BuildOptions};
use rbuild::cli::{
    normalize_args, parse_build_args, parse_output, BuildArgs, Cli, Command, CompressionChoice,
    OutputSpec,
};
use rbuild::progress::Progress;
use std::path::PathBuf;
use std::process::ExitCode;

mod store_cmds;
use store_cmds::{run_du, run_prune};

fn main() -> ExitCode {
    // The same binary is the RUN-step helper inside the sandbox.
    rbuild_sandbox::dispatch_helper();
    // Before any thread starts: fewer arenas, less memory kept resident (issue 13, item 6).
    rbuild_sandbox::limit_malloc_arenas(2);
    let matches = cli_command().get_matches_from(normalize_args(std::env::args_os().collect()));
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let res = match cli.command {
        Command::Build(args) => run_build(args),
        Command::Du(args) => run_du(args),
        Command::Prune(args) => run_prune(args),
        Command::Doctor(args) => return run_doctor(args),
        Command::Completion(args) => {
            let mut cmd = cli_command();
            clap_complete::generate(args.shell, &mut cmd, "rbuild", &mut std::io::stdout());
            Ok(())
        }
        Command::Man(args) => run_man(args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} {e:#}", rbuild::progress::error_prefix());
            ExitCode::FAILURE
        }
    }
}

/// The command line, its version naming the commit it was built from (build.rs).
fn cli_command() -> clap::Command {
    <Cli as clap::CommandFactory>::command().version(env!("RBUILD_LONG_VERSION"))
}

fn run_man(args: rbuild::cli::ManArgs) -> anyhow::Result<()> {
    match args.dir {
        None => clap_mangen::Man::new(cli_command()).render(&mut std::io::stdout())?,
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(cli_command(), &dir)
                .map_err(|e| anyhow::anyhow!("writing man pages to {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

fn run_doctor(args: rbuild::cli::DoctorArgs) -> ExitCode {
    use rbuild_sandbox::probe::Verdict;
    let root = args.root.clone().unwrap_or_else(default_root);
    if let Err(e) = std::fs::create_dir_all(rbuild_cache::Layout::new(&root).tmp()) {
        eprintln!(
            "error: creating the state directory {}: {e}",
            root.display()
        );
        return ExitCode::from(2);
    }
    let p = rbuild_sandbox::probe::probe(&root, &rbuild_cache::Layout::new(&root).tmp());
    let verdict = p.build_verdict();
    let word = |v: Verdict| match v {
        Verdict::NotNeeded => "not needed",
        Verdict::Ok => "ok",
        Verdict::Degraded => "degraded",
        Verdict::Missing => "missing",
    };
    // The mode a build would get here, under the default --isolation=auto.
    let build_line = match p.mode.choose(rbuild_sandbox::probe::IsolationPolicy::Auto) {
        Ok((isolation, _)) => format!(
            "{}; limits: {}{}",
            p.mode.describe(isolation),
            p.pids.describe(rbuild_sandbox::limits::DEFAULT_PIDS_LIMIT),
            // As the build's line says it (limits::resolve with no flags).
            match p.pids {
                rbuild_sandbox::limits::PidsBound::Rlimit => {
                    format!(", {}", rbuild_sandbox::limits::NO_STEP_CGROUP)
                }
                _ => String::new(),
            }
        ),
        Err(e) => e,
    };
    let summary = match verdict {
        Verdict::Ok | Verdict::NotNeeded => {
            format!("a build gets the full sandbox: RUN steps: {build_line}")
        }
        Verdict::Degraded => {
            format!("a build works, with what is marked degraded above: RUN steps: {build_line}")
        }
        Verdict::Missing => format!(
            "no sandboxed build is possible here: {}",
            p.checks
                .iter()
                .filter(|c| c.verdict == Verdict::Missing)
                .map(|c| c.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if args.json {
        let checks: Vec<serde_json::Value> = p
            .checks
            .iter()
            .map(|c| serde_json::json!({"check": c.name, "verdict": word(c.verdict), "detail": c.detail, "fix": c.fix}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"verdict": word(verdict), "summary": summary, "run_steps": build_line, "checks": checks})
        );
    } else {
        for c in &p.checks {
            println!("{:<10} {:<28} {}", word(c.verdict), c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("{:<10} {:<28} fix: {f}", "", "");
            }
        }
        println!("\n{}: {summary}", word(verdict));
    }
    ExitCode::from(match verdict {
        Verdict::Ok | Verdict::NotNeeded => 0,
        Verdict::Degraded => 1,
        Verdict::Missing => 2,
    })
}

/// Picks what RUN steps get from the environment probe (the trials of `rbuild doctor`, and
/// the build namespace's real attempt to clone /proc) and `--isolation`, and prepares the
/// cgroups for the resource limits. Says which in one line, then what was lost and how to get it
/// back. Runs before any thread exists.
fn choose_sandbox(
    args: &BuildArgs,
    root: &std::path::Path,
    ns: Option<&rbuild_sandbox::BuildNamespace>,
    progress: &Progress,
) -> anyhow::Result<(rbuild_sandbox::Isolation, rbuild_sandbox::Limits)> {
    use rbuild::cli::IsolationArg;
    use rbuild_sandbox::probe::{build_mode, IsolationPolicy, OverlayKind, SandboxMode};
    let policy = match args.isolation {
        IsolationArg::Auto => IsolationPolicy::Auto,
        IsolationArg::Strict => IsolationPolicy::Strict,
        IsolationArg::None => IsolationPolicy::None,
    };
    let mode = match (policy, ns) {
        // No namespaces will be made: nothing to try.
        (IsolationPolicy::None, _) => SandboxMode {
            user_namespaces: false,
            overlay: OverlayKind::None,
            proc_locked: None,
            container: None,
        },
        // --isolation=auto where user namespaces are refused (see run_build).
        (_, None) => SandboxMode {
            user_namespaces: false,
            overlay: OverlayKind::None,
            proc_locked: None,
            container: rbuild_sandbox::probe::root_in_container(),
        },
        (_, Some(ns)) => build_mode(
            &rbuild_cache::Layout::new(root).tmp(),
            ns.proc_locked.clone(),
        ),
    };
    let (isolation, lost) = mode.choose(policy).map_err(anyhow::Error::msg)?;
    let limits = resolve_limits(args, isolation, root);
    let limits_note = format!("; limits: {}", limits.note);
    let limits_lost = limits.lost;
    let limits = limits.limits;
    let sandbox = match ns {
        Some(ns) => ns.mode.to_string(),
        None => format!(
            "none ({})",
            rbuild_sandbox::container_evidence().unwrap_or_default()
        ),
    };
    progress.info(&format!(
        "sandbox: {sandbox}; RUN steps: {}{limits_note}",
        mode.describe(isolation)
    ));
    for w in [lost, limits_lost].into_iter().flatten() {
        progress.warn(&w);
    }
    Ok((isolation, limits))
}

/// The limits RUN steps get: `--memory`, `--cpus` and `--pids-limit` against the cgroups
/// rbuild may use (none under `--isolation=none`) and, for the process limit, `RLIMIT_NPROC`.
fn resolve_limits(
    args: &BuildArgs,
    isolation: rbuild_sandbox::Isolation,
    root: &std::path::Path,
) -> rbuild_sandbox::limits::Resolved {
    use rbuild_sandbox::cgroup::{self, Controller};
    use rbuild_sandbox::limits::{pids_cgroup, resolve, Asked, PidsBound};
    let asked = Asked {
        memory: args.memory,
        cpus: args.cpus,
        pids: args.pids_limit,
    };
    let none;
    let cg = if isolation == rbuild_sandbox::Isolation::None {
        let why = "--isolation=none puts RUN steps in no cgroup of their own";
        none = cgroup::Prepared {
            missing: Controller::ALL
                .into_iter()
                .map(|c| (c, why.to_string()))
                .collect(),
            ..Default::default()
        };
        &none
    } else {
        // Even with nothing to enforce: each step gets a cgroup of its own where one can be made.
        cgroup::prepared()
    };
    let scratch = rbuild_cache::Layout::new(root).tmp();
    let pids = PidsBound::find(pids_cgroup(cg), isolation, || {
        rbuild_sandbox::probe::nproc_rlimit_bounds(&scratch)
    });
    resolve(&asked, cg, &pids)
}

/// The state directory when `--root` is not given.
fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/rbuild");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(x).join("rbuild");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/rbuild")
}

fn run_build(args: BuildArgs) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let root = match &args.root {
        Some(r) => r.clone(),
        None => default_root(),
    };
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating state directory {}", root.display()))?;
    let root = root.canonicalize()?;
    // An ordinary user's build re-executes inside a user namespace, where it is root: pin the
    // state directory now so the inner process does not pick root's default.
    std::env::set_var("RBUILD_ROOT", &root);
    let mut outputs = Vec::new();
    let mut compression = CompressionChoice {
        kind: args.compression,
        level: args.compression_level,
        force: args.force_compression.then_some(true),
    };
    for o in &args.outputs {
        let (out, comp) = parse_output(o).map_err(anyhow::Error::msg)?;
        compression = compression
            .merge(comp, &format!("--output {o:?}"))
            .map_err(anyhow::Error::msg)?;
        outputs.push(out);
    }
    let (compression, force_compression) = compression.resolve().map_err(anyhow::Error::msg)?;
    let cache_from = args
        .cache_from
        .iter()
        .map(|c| rbuild::cli::parse_cache_spec(c, true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let cache_to = args
        .cache_to
        .iter()
        .map(|c| rbuild::cli::parse_cache_spec(c, false))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let labels = rbuild::cli::parse_labels(&args.labels).map_err(anyhow::Error::msg)?;
    let mut platforms: Vec<rbuild_dag::Platform> = Vec::new();
    for p in &args.platforms {
        if platforms.contains(p) {
            bail!("--platform {p}: named twice");
        }
        platforms.push(p.clone());
    }
    if platforms.is_empty() {
        platforms.push(rbuild_dag::Platform::host());
    }
    if platforms.len() > 1 && outputs.iter().any(|o| matches!(o, OutputSpec::Docker(_))) {
        // As BuildKit: `docker load` takes one image, not an index.
        bail!("--output type=docker: a docker archive holds one platform's image; with several platforms use type=oci or type=registry");
    }
    if let Some(a) = args.annotations.iter().find(|a| {
        // Attestations make an index even for one platform.
        platforms.len() == 1
            && args.provenance.as_ref().is_none_or(|p| p.0.is_none())
            && args.sbom != Some(true)
            && a.targets.iter().any(|(t, _)| t.needs_index())
    }) {
        // As BuildKit: index annotations have no image index to go on.
        bail!(
            "--annotation {}: index annotations are not supported for a single-platform image (it has no image index)",
            a.key
        );
    }
    if args.push && !outputs.contains(&OutputSpec::Registry) {
        outputs.push(OutputSpec::Registry);
    }
    // The context: a directory now; a tar archive or stdin once the store exists to unpack into.
    let context_arg = args.context.clone();
    let from_stdin = context_arg.as_os_str() == "-";
    let from_url = rbuild::remote::is_context_url(&context_arg);
    let context_is_dir = !from_stdin && !from_url && context_arg.is_dir();
    if !from_stdin && !from_url && !context_is_dir && !context_arg.is_file() {
        bail!(
            "build context {}: no such directory or file",
            context_arg.display()
        );
    }
    let mut dockerfile = PathBuf::new();
    let mut context = context_arg.clone();
    if context_is_dir {
        dockerfile = args
            .file
            .clone()
            .unwrap_or_else(|| context_arg.join("Dockerfile"));
        if !dockerfile.is_file() {
            bail!("Dockerfile {}: no such file", dockerfile.display());
        }
        context = context_arg.canonicalize()?;
        dockerfile = dockerfile.canonicalize()?;
    }
    if let Some(what) = &args.print {
        if !context_is_dir {
            bail!("--print needs a directory context");
        }
        let text = std::fs::read_to_string(&dockerfile)?;
        let df = rbuild_dag::parse(&text, &dockerfile).map_err(|e| anyhow::anyhow!("{e}"))?;
        let resolved = rbuild_dag::resolve_global_args(&df, &parse_build_args(&args.build_args))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let plan = rbuild_dag::graph::plan(&df, args.target.as_deref(), &resolved)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        match what.as_str() {
            "dag" => print!("{}", rbuild_dag::graph::to_text(&plan)),
            "dot" => print!("{}", rbuild_dag::graph::to_dot(&plan)),
            other => bail!("--print {other}: want dag or dot"),
        }
        return Ok(());
    }
    // --isolation=none makes no namespace at all (where none can be made): RUN steps rewrite
    // this container's own root, which must be a throwaway one. --isolation=auto goes there
    // by itself as root in a container that refuses user namespaces (Docker's default seccomp
    // profile), where the sandbox is impossible and Kaniko is what users had.
    let auto_none = args.isolation == rbuild::cli::IsolationArg::Auto
        && rbuild_sandbox::probe::root_in_container().is_some()
        && rbuild_sandbox::probe::user_namespaces_refused(&root).is_some();
    let ns = if args.isolation == rbuild::cli::IsolationArg::None || auto_none {
        if rbuild_sandbox::container_evidence().is_none() {
            bail!(
                "--isolation=none rewrites the root filesystem of the machine it runs on with the image's files, and this does not look \
                 like a throwaway container (rbuild wants a container marker such as /.dockerenv or $container and an overlay root \
                 filesystem): refusing. Set RBUILD_ALLOW_ROOT_REWRITE=1 if it really is one"
            );
        }
        if !rustix::process::geteuid().is_root() {
            bail!("--isolation=none needs root (the image's files belong to many users)");
        }
        keep_ca_certificates(&root);
        None
    } else {
        Some(
            rbuild_sandbox::enter_build_namespace(&rbuild_sandbox::EnterOptions {
                state_dir: rbuild_cache::Layout::new(&root).state(),
                allow_single_id: true,
            })
            .context("setting up the build namespace")?,
        )
    };

    // Secrets from environment variables leave the environment (still single-threaded), and
    // nothing that shares this PID namespace may read this process's memory or /proc files:
    // only a process with CAP_SYS_PTRACE over it could, never a RUN step.
    let secrets = rbuild::mounts::parse_secrets(&args.secrets)?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .context("making rbuild non-dumpable")?;

    // SOURCE_DATE_EPOCH: --build-arg wins over the environment; --reproducible defaults it to 0.
    // Set while the process is still single-threaded.
    let build_args = parse_build_args(&args.build_args);
    if let Some(v) = build_args.get("SOURCE_DATE_EPOCH") {
        std::env::set_var("SOURCE_DATE_EPOCH", v);
    } else if args.reproducible && std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
        std::env::set_var("SOURCE_DATE_EPOCH", "0");
    }
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        if v.trim().parse::<i64>().is_err() {
            bail!("SOURCE_DATE_EPOCH={v:?}: want whole seconds since 1970");
        }
    }
    rbuild::registry::ensure_trust_anchors(&rbuild_cache::Layout::new(&root).state());
    let progress = Progress::new(args.progress);
    let (isolation, limits) = choose_sandbox(&args, &root, ns.as_ref(), &progress)?;
    for w in ns.iter().flat_map(|ns| &ns.warnings) {
        progress.warn(w);
    }
    if outputs.is_empty() {
        progress.warn(
            "no output given: the image stays in rbuild's store only (use --push or --output)",
        );
    }
    // A store on overlayfs (a container's own root) cannot hold overlay upperdirs: the first
    // RUN finds out and falls back (rbuild_sandbox::RootfsMode), saying how to get the direct path back.
    let store = rbuild_cache::Store::open(&root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Cache mounts without an `id=` belong to this project: the context directory, or what
    // a remote context was named by (an unpacked one lives in a fresh temp directory).
    let project = if from_stdin {
        "-".to_string()
    } else if context_is_dir {
        std::fs::canonicalize(&context_arg)
            .unwrap_or_else(|_| context_arg.clone())
            .display()
            .to_string()
    } else {
        context_arg.display().to_string()
    };
    let mut unpacked_context = None;
    let mut _download = rbuild::remote::Cleanup::default();
    if !context_is_dir {
        let dir = store.temp_dir("context")?;
        unpacked_context = Some(dir.clone());
        let input: Box<dyn std::io::Read + Send> = if from_stdin {
            Box::new(std::io::stdin())
        } else if from_url {
            let url = context_arg.to_string_lossy().into_owned();
            let d = runtime.block_on(rbuild::remote::download(
                &store,
                &url,
                None,
                args.allow_link_local_urls,
            ))?;
            _download.0.push(d.path.clone());
            Box::new(std::fs::File::open(&d.path)?)
        } else {
            Box::new(
                std::fs::File::open(&context_arg)
                    .with_context(|| format!("opening {}", context_arg.display()))?,
            )
        };
        if unpack_context(input, &dir)
            .with_context(|| format!("unpacking the build context {}", context_arg.display()))?
        {
            dockerfile = match &args.file {
                Some(f) if f.is_relative() => dir.join(f),
                Some(f) => f.clone(),
                None => dir.join("Dockerfile"),
            };
        } else {
            // Standard input held a Dockerfile, not an archive: the context is empty.
            dockerfile = dir.join("Dockerfile");
        }
        if !dockerfile.is_file() {
            let _ = rbuild_cache::remove_tree(&dir);
            bail!(
                "Dockerfile {}: not in the build context",
                dockerfile.display()
            );
        }
        context = dir;
    }
    let opts = BuildOptions {
        context,
        dockerfile,
        tags: args.tags.clone(),
        build_args: parse_build_args(&args.build_args),
        target: args.target.clone(),
        outputs,
        insecure_registries: args.insecure_registries.clone(),
        no_cache: args.no_cache,
        pull: args.pull,
        stale_tag_max_age: args.stale_tag_max_age,
        allow_link_local_urls: args.allow_link_local_urls,
        registry_retries: args.registry_retries,
        allow_insecure: args
            .allow
            .contains(&rbuild::cli::Entitlement::SecurityInsecure),
        network: args.network,
        compression,
        force_compression,
        platforms,
        provenance: args.provenance.clone().and_then(|p| p.0),
        sbom: args.sbom.unwrap_or(false),
        attest_form: args.attest_as,
        secrets,
        build_contexts: parse_named_contexts(&args.build_contexts)?,
        ssh: rbuild::mounts::parse_ssh(&args.ssh)?,
        cache_from,
        cache_to,
        labels,
        annotations: args.annotations.clone(),
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        isolation,
        limits,
        rootfs: rbuild_sandbox::RootfsOptions::default(),
        own_mount_namespace: ns.is_some(),
        project,
    };
    let mut opts = opts;
    if isolation == rbuild_sandbox::Isolation::None {
        opts.rootfs.keep_paths = paths_to_keep(&opts, &args);
    }
    let outcome = runtime.block_on(build(store.clone(), opts, progress.clone()));
    progress.summary(outcome.is_err());
    if let Some(dir) = &unpacked_context {
        let _ = rbuild_cache::remove_tree(dir);
    }
    let outcome = outcome?;
    let built = &outcome.result;
    match built {
        rbuild::index::Built::Image(image) => progress.info(&format!(
            "image {} (manifest {})",
            image.config_digest, image.manifest_digest
        )),
        rbuild::index::Built::Index(index) => {
            for (p, image) in &index.images {
                progress.info(&format!(
                    "image {} for {p} (manifest {})",
                    image.config_digest, image.manifest_digest
                ));
            }
            progress.info(&format!("index {}", index.digest));
        }
    }
    if let Some(p) = &args.iidfile {
        rbuild_cache::write_file_atomic(p, built.id().as_str().as_bytes())?;
    }
    if let Some(p) = &args.metadata_file {
        let mut meta = serde_json::json!({
            "containerimage.digest": built.digest().to_string(),
            "containerimage.descriptor": {
                "mediaType": built.media_type(),
                "digest": built.digest().to_string(),
                "size": built.bytes().len(),
            },
            "image.name": args.tags.join(","),
            "tags": args.tags,
            "pushed": outcome.pushed.as_ref().map(|d| d.to_string()),
        });
        // As buildx: a multi-platform build's metadata names no single config.
        if let Some(config) = built.single_config() {
            meta["containerimage.config.digest"] = serde_json::json!(config.to_string());
        }
        rbuild_cache::write_file_atomic(p, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    }
    Ok(())
}

/// `--isolation=none` replaces `/etc/ssl` with the image's files: registry clients made later
/// in the build read a copy of the CA bundle in the store (through `SSL_CERT_FILE`).
/// Called while the process is single-threaded.
fn keep_ca_certificates(store: &std::path::Path) {
    let bundle = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(rbuild::registry::CA_BUNDLES.map(PathBuf::from));
    let state = rbuild_cache::Layout::new(store).state();
    for b in bundle {
        let copy = state.join("ca-certificates.crt");
        if b.is_file()
            && std::fs::create_dir_all(&state).is_ok()
            && std::fs::copy(&b, &copy).is_ok()
        {
            std::env::set_var("SSL_CERT_FILE", &copy);
            return;
        }
    }
}

/// What `--isolation=none` must not remove when it rewrites `/`: rbuild's store, binary and
/// inputs, where its outputs go, and registry credentials.
fn paths_to_keep(opts: &BuildOptions, args: &BuildArgs) -> Vec<PathBuf> {
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut keep = vec![opts.context.clone(), opts.dockerfile.clone()];
    if let Ok(root) = std::env::var("RBUILD_ROOT") {
        keep.push(PathBuf::from(root));
    }
    if let Ok(exe) = std::env::current_exe() {
        keep.push(exe);
    }
    for o in &opts.outputs {
        match o {
            OutputSpec::Oci(d) | OutputSpec::Local(d) | OutputSpec::Docker(d) => keep.push(abs(d)),
            _ => {}
        }
    }
    keep.extend(
        args.iidfile
            .iter()
            .chain(args.metadata_file.iter())
            .map(|p| abs(p)),
    );
    for v in opts.build_contexts.values() {
        if !v.contains("://") {
            keep.push(PathBuf::from(v));
        }
    }
    for s in opts.secrets.values() {
        if let rbuild::mounts::SecretSource::File(f) = s {
            keep.push(abs(f));
        }
    }
    keep.extend(opts.ssh.values().map(|p| abs(p)));
    keep.extend(rbuild::registry::docker_config_dir());
    keep
}

/// `--build-context NAME=VALUE` values; directories are made absolute.
fn parse_named_contexts(
    specs: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for spec in specs {
        let (name, value) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--build-context {spec:?}: want NAME=VALUE"))?;
        let value = if value.contains("://") {
            value.to_string()
        } else {
            let p = PathBuf::from(value);
            if !p.is_dir() {
                anyhow::bail!("--build-context {name}={value}: not a directory");
            }
            p.canonicalize()?.display().to_string()
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

/// Unpacks a context archive (plain tar, gzip or zstd) into `dir`. Returns `false` without
/// writing anything when the input is not an archive but a Dockerfile, which then becomes
/// `dir/Dockerfile` (as `docker build -` does).
fn unpack_context(
    input: Box<dyn std::io::Read + Send>,
    dir: &std::path::Path,
) -> anyhow::Result<bool> {
    use std::io::{BufRead, Read};
    let mut r = std::io::BufReader::with_capacity(1 << 20, input);
    let head = r.fill_buf()?.to_vec();
    let compressed = head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let is_tar = head.len() > 262 && &head[257..262] == b"ustar";
    if !compressed && !is_tar {
        let mut text = Vec::new();
        r.read_to_end(&mut text)?;
        std::fs::write(dir.join("Dockerfile"), text)?;
        return Ok(false);
    }
    let plain = rbuild_snapshot::decompress(r)?;
    rbuild_snapshot::apply_layer(plain, dir, &rbuild_snapshot::UnpackOptions::default())?;
    Ok(true)
}
