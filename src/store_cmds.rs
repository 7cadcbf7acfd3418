//! `rbuild du` and `rbuild prune`: what the store holds, and taking it back.

use crate::default_root;
use std::path::PathBuf;

/// Opens the store for du/prune, inside the build's user namespace (as an ordinary user,
/// files in the store belong to subordinate IDs only that namespace can remove).
pub(super) fn open_store_for_gc(root: &Option<PathBuf>) -> anyhow::Result<rbuild_cache::Store> {
    use anyhow::Context;
    let root = root.clone().unwrap_or_else(default_root);
    if !root.is_dir() {
        anyhow::bail!(
            "state directory {}: no such directory (nothing was built there yet)",
            root.display()
        );
    }
    let root = root.canonicalize()?;
    std::env::set_var("RBUILD_ROOT", &root);
    rbuild_sandbox::enter_build_namespace(&rbuild_sandbox::EnterOptions {
        state_dir: rbuild_cache::Layout::new(&root).state(),
        allow_single_id: true,
    })
    .context("setting up the build namespace")?;
    Ok(rbuild_cache::Store::open(&root)?)
}

pub(super) fn human(bytes: u64) -> String {
    rbuild_dag::units::human_bytes(bytes, rbuild_dag::units::SizeUnits::Decimal)
}

pub(super) fn run_du(args: rbuild::cli::DuArgs) -> anyhow::Result<()> {
    let store = open_store_for_gc(&args.root)?;
    let u = rbuild_cache::disk_usage(&store)?;
    let rows = [
        ("blobs", "compressed layers, configs, manifests", u.blobs),
        ("layers", "unpacked layers", u.layers),
        ("records", "cache records", u.records),
        (
            "cache-mounts",
            "RUN --mount=type=cache directories",
            u.mounts,
        ),
        ("tmp", "work in progress, or left by killed builds", u.tmp),
        (
            "metadata",
            "context stat caches, cache-miss explanations",
            u.metadata,
        ),
    ];
    let records = if args.verbose {
        Some(rbuild_cache::record_usage(&store)?)
    } else {
        None
    };
    let mounts = if args.verbose {
        rbuild_cache::gc::cache_mount_usage(&store)
    } else {
        Vec::new()
    };
    let report = if args.verify {
        Some(rbuild_cache::verify(&store)?)
    } else {
        None
    };
    let now = std::time::SystemTime::now();
    let ago = |t: std::time::SystemTime| now.duration_since(t).unwrap_or_default();
    if args.json {
        let mut o = serde_json::Map::new();
        for (k, _, v) in &rows {
            o.insert(k.to_string(), serde_json::json!({"count": v.count, "bytes": v.bytes, "reclaimable": v.reclaimable}));
        }
        o.insert("total_bytes".into(), u.total_bytes().into());
        o.insert("reclaimable_bytes".into(), u.reclaimable_bytes().into());
        o.insert("root".into(), store.root().display().to_string().into());
        if let Some(recs) = &records {
            let list: Vec<serde_json::Value> = recs
                .iter()
                .map(|r| {
                    serde_json::json!({"key": r.key, "created": r.created, "last_used_secs_ago": ago(r.last_used).as_secs(),
                        "diff_id": r.diff_id.as_ref().map(|d| d.to_string()), "bytes": r.bytes, "shared": r.shared})
                })
                .collect();
            o.insert("record_list".into(), list.into());
            let list: Vec<serde_json::Value> = mounts
                .iter()
                .map(|(id, b)| serde_json::json!({"id": id, "bytes": b}))
                .collect();
            o.insert("cache_mount_list".into(), list.into());
        }
        if let Some(r) = &report {
            o.insert("problems".into(), serde_json::json!(r.problems));
            o.insert("removed".into(), serde_json::json!(r.removed));
        }
        println!("{}", serde_json::Value::Object(o));
    } else {
        if let Some(recs) = &records {
            println!(
                "{:<14} {:>10} {:>7} {:>14}   {:<20}   LAYER",
                "RECORD", "SIZE", "SHARED", "LAST USED", "CREATED"
            );
            for r in recs {
                let layer = r
                    .diff_id
                    .as_ref()
                    .map(|d| d.hex()[..12].to_string())
                    .unwrap_or_else(|| "-".into());
                let shared = if r.shared { "yes" } else { "no" };
                println!(
                    "{:<14} {:>10} {:>7} {:>14}   {:<20}   {layer}",
                    &r.key[..r.key.len().min(12)],
                    human(r.bytes),
                    shared,
                    ago_text(ago(r.last_used)),
                    r.created
                );
            }
            for (id, b) in &mounts {
                println!("{:<14} {:>10}   cache mount {id}", "mount", human(*b));
            }
            println!();
        }
        println!(
            "{:<14} {:>8} {:>10} {:>12}   WHAT",
            "KIND", "COUNT", "SIZE", "RECLAIMABLE"
        );
        for (k, what, v) in &rows {
            println!(
                "{:<14} {:>8} {:>10} {:>12}   {}",
                k,
                v.count,
                human(v.bytes),
                human(v.reclaimable),
                what
            );
        }
        println!(
            "\nTotal:        {}\nReclaimable:  {}\nStore:        {}",
            human(u.total_bytes()),
            human(u.reclaimable_bytes()),
            store.root().display()
        );
        if let Some(r) = &report {
            println!(
                "verified {} blobs, {} layers ({} compared with their blobs), {} cache records: {} problems",
                r.blobs,
                r.layers,
                r.layers_compared,
                r.records,
                r.problems.len()
            );
            for p in &r.problems {
                println!("  {p}");
            }
            if !r.removed.is_empty() {
                println!(
                    "removed, to be fetched or unpacked again by the next build that needs them:"
                );
                for p in &r.removed {
                    println!("  {p}");
                }
            }
        }
    }
    match report {
        Some(r) if !r.is_ok() => anyhow::bail!(
            "the store at {} has {} problems",
            store.root().display(),
            r.problems.len()
        ),
        _ => Ok(()),
    }
}

/// `90s ago`, `5m ago`, `3h ago`, `2d ago`.
pub(super) fn ago_text(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub(super) fn run_prune(args: rbuild::cli::PruneArgs) -> anyhow::Result<()> {
    let older_than = rbuild::cli::parse_prune_filters(&args.filter).map_err(anyhow::Error::msg)?;
    let store = open_store_for_gc(&args.root)?;
    let opts = rbuild_cache::PruneOptions {
        keep_storage: args.keep_storage,
        older_than,
        all: args.all,
        wait: args.wait,
    };
    let r = rbuild_cache::prune(&store, &opts)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"records": r.records, "blobs": r.blobs, "layers": r.layers, "cache_mounts": r.mounts, "tmp": r.tmp, "bytes": r.bytes})
        );
    } else {
        println!(
            "removed {} cache records, {} blobs, {} layers, {} cache mounts, {} temporary entries: {} freed",
            r.records,
            r.blobs,
            r.layers,
            r.mounts,
            r.tmp,
            human(r.bytes)
        );
    }
    Ok(())
}
