//! Self-test of rbuild-sandbox: enters the build namespace and runs one RUN step (or a
//! benchmark of `/bin/true` steps) on a given root filesystem, the way rbuild does.
//!
//! ```text
//! rbuild-sandbox-selftest --state DIR --rootfs DIR [--rootfs DIR]... [--net none] [--user U]
//!                         [--cwd DIR] [--keep] [--no-single-id] [--bench N]
//!                         [--isolation auto|strict] [--memory BYTES] [--pids-limit N] -- ARGV...
//! ```
//! Exit status: 0 when the step exited 0, 1 when it failed, 2 on a sandbox error, 3 when the
//! build namespace could not be entered.

#![forbid(unsafe_code)]

use rbuild_sandbox::probe::IsolationPolicy;
use rbuild_sandbox::{ExitKind, Limits, Network, RunSpec};
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    rbuild_sandbox::dispatch_helper();
    let mut args = std::env::args().skip(1);
    let (mut state, mut lowers, mut net, mut user, mut cwd, mut keep, mut bench) = (
        None,
        vec![],
        Network::Host,
        String::new(),
        "/".to_string(),
        false,
        0usize,
    );
    let mut argv = vec![];
    let mut single = true;
    let mut policy = IsolationPolicy::Auto;
    let mut limits = Limits::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--state" => state = args.next().map(PathBuf::from),
            "--rootfs" => lowers.extend(args.next().map(PathBuf::from)),
            "--net" => {
                net = if args.next().as_deref() == Some("none") {
                    Network::None
                } else {
                    Network::Host
                }
            }
            "--user" => user = args.next().unwrap_or_default(),
            "--cwd" => cwd = args.next().unwrap_or_default(),
            "--keep" => keep = true,
            "--no-single-id" => single = false,
            "--isolation" => {
                policy = if args.next().as_deref() == Some("strict") {
                    IsolationPolicy::Strict
                } else {
                    IsolationPolicy::Auto
                }
            }
            "--memory" => limits.memory = args.next().and_then(|n| n.parse().ok()),
            "--pids-limit" => {
                limits.pids = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .map(rbuild_sandbox::ProcessLimit::Cgroup)
            }
            "--bench" => bench = args.next().and_then(|n| n.parse().ok()).unwrap_or(50),
            "--" => {
                argv.extend(args.by_ref());
            }
            other => {
                eprintln!("selftest: unknown argument {other}");
                std::process::exit(64);
            }
        }
    }
    let Some(state) = state else {
        eprintln!("selftest: --state DIR is required");
        std::process::exit(64);
    };
    let ns = match rbuild_sandbox::enter_build_namespace(&rbuild_sandbox::EnterOptions {
        state_dir: state.clone(),
        allow_single_id: single,
    }) {
        Ok(ns) => ns,
        Err(e) => {
            println!("enter error: {e}");
            std::process::exit(3);
        }
    };
    println!("mode: {}", ns.mode);
    for w in &ns.warnings {
        println!("warning: {w}");
    }
    println!("proc_clone: {:?}", ns.proc_clone);
    // As rbuild does: the probe's trials and the real /proc clone pick the isolation.
    let mode = rbuild_sandbox::probe::build_mode(&state, ns.proc_locked.clone());
    let isolation = match mode.choose(policy) {
        Ok((iso, lost)) => {
            if let Some(w) = lost {
                println!("warning: {w}");
            }
            iso
        }
        Err(e) => {
            println!("enter error: {e}");
            std::process::exit(3);
        }
    };
    println!("isolation: {isolation:?}: {}", mode.describe(isolation));
    let steps = state.join("steps");
    let mk = |i: usize| -> (PathBuf, PathBuf) {
        let base = steps.join(format!("{}-{i}", std::process::id()));
        let (u, w) = (base.join("upper"), base.join("work"));
        std::fs::create_dir_all(&u).expect("upperdir");
        std::fs::create_dir_all(&w).expect("workdir");
        (u, w)
    };
    let spec = |u: PathBuf, w: PathBuf, argv: Vec<String>| {
        RunSpec::builder()
            .lowerdirs(lowers.clone())
            .upperdir(u)
            .workdir(w)
            .argv(argv)
            .cwd(cwd.clone())
            .user(user.clone())
            .network(net)
            .isolation(isolation)
            .limits(limits)
            .build()
            .expect("spec")
    };
    if bench > 0 {
        let mut times = vec![];
        for i in 0..bench {
            let (u, w) = mk(i);
            let s = spec(u.clone(), w.clone(), vec!["/bin/true".into()]);
            let t = Instant::now();
            let r = rbuild_sandbox::run(&s, &mut std::io::sink());
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let _ = std::fs::remove_dir_all(u.parent().unwrap());
            match r {
                Ok(o) if o.status == ExitKind::Exited(0) => {}
                other => {
                    println!("bench: step {i} failed: {other:?}");
                    std::process::exit(2);
                }
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |f: f64| times[((times.len() - 1) as f64 * f).round() as usize];
        println!(
            "bench: n={} median={:.2}ms min={:.2}ms p90={:.2}ms max={:.2}ms",
            times.len(),
            q(0.5),
            times[0],
            q(0.9),
            times[times.len() - 1]
        );
        return;
    }
    let (u, w) = mk(0);
    let s = spec(u.clone(), w, argv);
    println!("--- output ---");
    let r = rbuild_sandbox::run(&s, &mut std::io::stdout());
    println!("--- end ---");
    if keep {
        println!("upper: {}", u.display());
    } else {
        let _ = std::fs::remove_dir_all(u.parent().unwrap());
    }
    match r {
        Ok(o) => {
            println!("status: {:?}", o.status);
            println!("created: {}", o.created_mountpoints.join(","));
            if let Some(hit) = &o.limit_hit {
                println!("limit: {hit}");
            }
            for w in &o.warnings {
                println!("step warning: {w}");
            }
            std::process::exit(if o.status == ExitKind::Exited(0) {
                0
            } else {
                1
            });
        }
        Err(e) => {
            println!("run error: {e}");
            std::process::exit(2);
        }
    }
}
