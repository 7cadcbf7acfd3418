//! The `rbuild` command.

use clap::Parser;
use rbuild::build::{build, BuildOptions};
use rbuild::cli::{normalize_args, parse_build_args, parse_output, BuildArgs, Cli, Command, OutputSpec};
use rbuild::progress::Progress;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    // The same binary is the RUN-step helper inside the sandbox.
    rbuild_sandbox::dispatch_helper();
    let cli = Cli::parse_from(normalize_args(std::env::args_os().collect()));
    match cli.command {
        Command::Build(args) => match run_build(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The state directory when `--root` is not given.
fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/rbuild");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(x).join("rbuild");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/rbuild")
}

fn run_build(args: BuildArgs) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let root = match &args.root {
        Some(r) => r.clone(),
        None => default_root(),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating state directory {}", root.display()))?;
    let root = root.canonicalize()?;
    // An ordinary user's build re-executes inside a user namespace, where it is root: pin the
    // state directory now so the inner process does not pick root's default.
    std::env::set_var("RBUILD_ROOT", &root);
    let mut outputs = Vec::new();
    for o in &args.outputs {
        outputs.push(parse_output(o).map_err(anyhow::Error::msg)?);
    }
    if args.push && !outputs.contains(&OutputSpec::Registry) {
        outputs.push(OutputSpec::Registry);
    }
    let context = args.context.clone();
    if !context.is_dir() {
        bail!("build context {}: not a directory", context.display());
    }
    let dockerfile = args.file.clone().unwrap_or_else(|| context.join("Dockerfile"));
    if !dockerfile.is_file() {
        bail!("Dockerfile {}: no such file", dockerfile.display());
    }
    let context = context.canonicalize()?;
    let dockerfile = dockerfile.canonicalize()?;

    if let Some(what) = &args.print {
        let text = std::fs::read_to_string(&dockerfile)?;
        let df = rbuild_dag::parse(&text, &dockerfile).map_err(|e| anyhow::anyhow!("{e}"))?;
        let resolved = rbuild_dag::resolve_global_args(&df, &parse_build_args(&args.build_args)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let plan = rbuild_dag::graph::plan(&df, args.target.as_deref(), &resolved).map_err(|e| anyhow::anyhow!("{e}"))?;
        match what.as_str() {
            "dag" => print!("{}", rbuild_dag::graph::to_text(&plan)),
            "dot" => print!("{}", rbuild_dag::graph::to_dot(&plan)),
            other => bail!("--print {other}: want dag or dot"),
        }
        return Ok(());
    }
    let ns = rbuild_sandbox::enter_build_namespace(&rbuild_sandbox::EnterOptions {
        state_dir: root.join("run"),
        allow_single_id: true,
    })
    .context("setting up the build namespace")?;

    let progress = Progress::new(args.progress);
    progress.info(&format!("isolation: {}", ns.mode));
    for w in &ns.warnings {
        progress.warn(w);
    }
    if outputs.is_empty() {
        progress.warn("no output given: the image stays in rbuild's store only (use --push or --output)");
    }
    let store = rbuild_cache::Store::open(&root)?;
    let opts = BuildOptions {
        context,
        dockerfile,
        tags: args.tags.clone(),
        build_args: parse_build_args(&args.build_args),
        target: args.target.clone(),
        outputs,
        insecure_registries: args.insecure_registries.clone(),
        no_cache: args.no_cache,
        network: args.network,
        compression: args.compression,
        platform: args.platform.clone(),
        secrets: rbuild::mounts::parse_secrets(&args.secrets)?,
        jobs: args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(build(store.clone(), opts, progress.clone()))?;
    let image = &outcome.image;
    progress.info(&format!("image {} (manifest {})", image.config_digest, image.manifest_digest));
    if let Some(p) = &args.iidfile {
        rbuild_cache::write_file_atomic(p, image.config_digest.as_str().as_bytes())?;
    }
    if let Some(p) = &args.metadata_file {
        let meta = serde_json::json!({
            "containerimage.digest": image.manifest_digest.to_string(),
            "containerimage.config.digest": image.config_digest.to_string(),
            "containerimage.descriptor": {
                "mediaType": image.manifest_media_type,
                "digest": image.manifest_digest.to_string(),
                "size": image.manifest_bytes.len(),
            },
            "image.name": args.tags.join(","),
            "tags": args.tags,
            "pushed": outcome.pushed.as_ref().map(|d| d.to_string()),
        });
        rbuild_cache::write_file_atomic(p, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    }
    Ok(())
}
