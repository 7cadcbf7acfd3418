use super::*;

#[test]
fn resource_limits_parse_like_docker() {
    assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
    assert_eq!(parse_memory("64MiB").unwrap(), 64 << 20);
    assert_eq!(
        parse_memory("64MB").unwrap(),
        64 << 20,
        "docker's units are binary"
    );
    assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
    assert_eq!(parse_memory("67108864").unwrap(), 64 << 20);
    assert!(parse_memory("1m").unwrap_err().contains("at least 6 MiB"));
    assert!(parse_memory("64x")
        .unwrap_err()
        .contains("unknown size unit"));
    assert!(parse_memory("lots").is_err());
    assert_eq!(parse_cpus("0.5").unwrap(), 0.5);
    assert!(
        parse_cpus("0").is_err()
            && parse_cpus("-1").is_err()
            && parse_cpus("NaN").is_err()
            && parse_cpus("inf").is_err()
    );
    assert_eq!(parse_pids_limit("50").unwrap(), 50);
    assert_eq!(parse_pids_limit("0").unwrap(), 0, "unlimited");
    assert!(
        parse_pids_limit("-1").is_err()
            && parse_pids_limit("1.5").is_err()
            && parse_pids_limit("").is_err()
    );
}

#[test]
fn isolation_defaults_to_auto() {
    let cli = Cli::parse_from(["rbuild", "build", "."]);
    let Command::Build(b) = cli.command else {
        panic!()
    };
    assert_eq!(b.isolation, IsolationArg::Auto);
    assert_eq!((b.memory, b.cpus, b.pids_limit), (None, None, None));
    let cli = Cli::parse_from([
        "rbuild",
        "build",
        "--isolation",
        "strict",
        "--memory",
        "64m",
        "--cpus",
        "1.5",
        "--pids-limit",
        "20",
        ".",
    ]);
    let Command::Build(b) = cli.command else {
        panic!()
    };
    assert_eq!(b.isolation, IsolationArg::Strict);
    assert_eq!(
        (b.memory, b.cpus, b.pids_limit),
        (Some(64 << 20), Some(1.5), Some(20))
    );
    assert!(Cli::try_parse_from(["rbuild", "build", "--isolation", "partial", "."]).is_err());
}

#[test]
fn bare_context_means_build() {
    let a = normalize_args(vec!["rbuild".into(), ".".into()]);
    assert_eq!(a[1], "build");
    let a = normalize_args(vec!["rbuild".into(), "--help".into()]);
    assert_eq!(a[1], "--help");
    let cli = Cli::try_parse_from(normalize_args(vec![
        "rbuild".into(),
        "-t".into(),
        "x".into(),
        "ctx".into(),
    ]))
    .unwrap();
    let Command::Build(b) = cli.command else {
        panic!("not a build")
    };
    assert_eq!(b.tags, vec!["x"]);
    assert_eq!(b.context, PathBuf::from("ctx"));
    let cli = Cli::try_parse_from(normalize_args(vec![
        "rbuild".into(),
        "prune".into(),
        "--keep-storage".into(),
        "1GiB".into(),
    ]))
    .unwrap();
    let Command::Prune(p) = cli.command else {
        panic!("not a prune")
    };
    assert_eq!(p.keep_storage, Some(1 << 30));
}

#[test]
fn sizes_and_durations_parse_like_docker() {
    assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_size("1.5g").unwrap(), 1_500_000_000);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert!(parse_size("ten").is_err());
    assert!(parse_size("5XB").unwrap_err().contains("unknown size unit"));
    assert_eq!(parse_duration("24h").unwrap().as_secs(), 86400);
    assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
    assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86400);
    assert_eq!(parse_duration("1.5h").unwrap().as_secs(), 5400);
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("10").is_err(), "a unit is required");
    assert!(parse_duration("3y").is_err());
    assert_eq!(
        parse_prune_filters(&["until=30m".into()]).unwrap(),
        Some(std::time::Duration::from_secs(1800))
    );
    assert!(parse_prune_filters(&["type=regular".into()])
        .unwrap_err()
        .contains("only until="));
}

#[test]
fn labels_parse() {
    let l = parse_labels(&["a=1".into(), "b".into(), "c=x=y".into(), "a=2".into()]).unwrap();
    assert_eq!(
        l.into_iter().collect::<Vec<_>>(),
        [("a", "2"), ("b", ""), ("c", "x=y")].map(|(k, v)| (k.to_string(), v.to_string()))
    );
    assert!(parse_labels(&["=v".into()])
        .unwrap_err()
        .contains("key is empty"));
}

#[test]
fn outputs_parse() {
    assert_eq!(
        parse_output("type=oci,dest=/x").unwrap().0,
        OutputSpec::Oci("/x".into())
    );
    assert_eq!(
        parse_output("type=registry").unwrap().0,
        OutputSpec::Registry
    );
    assert_eq!(
        parse_output("out").unwrap().0,
        OutputSpec::Local("out".into())
    );
    assert!(parse_output("type=oci").unwrap_err().contains("needs dest"));
    assert!(parse_output("type=zip,dest=x")
        .unwrap_err()
        .contains("unknown type"));
}

#[test]
fn compression_comes_from_flags_and_outputs_alike() {
    use rbuild_snapshot::Compression;
    let (out, c) =
        parse_output("type=image,compression=zstd,compression-level=9,force-compression=true")
            .unwrap();
    assert_eq!(out, OutputSpec::Registry);
    assert_eq!(c.resolve().unwrap(), (Compression::Zstd { level: 9 }, true));
    assert_eq!(
        CompressionChoice::default().resolve().unwrap(),
        (Compression::Gzip { level: 6 }, false)
    );
    // Flags and an output agree, or the build is refused.
    let flags = CompressionChoice {
        kind: Some(CompressionArg::Zstd),
        ..Default::default()
    };
    assert_eq!(flags.merge(c, "--output").unwrap().kind, c.kind);
    let gz = parse_output("type=oci,dest=/o,compression=gzip").unwrap().1;
    assert!(flags
        .merge(gz, "--output type=oci")
        .unwrap_err()
        .contains("differs"));
    for (bad, want) in [
        ("type=oci,dest=/o,compression=lz4", "want gzip"),
        ("type=oci,dest=/o,compression-level=x", "not a number"),
        ("type=oci,dest=/o,force-compression=yes", "true or false"),
        ("type=local,dest=/o,compression=zstd", "no layers"),
    ] {
        assert!(parse_output(bad).unwrap_err().contains(want), "{bad}");
    }
    let level = |kind, level| CompressionChoice {
        kind: Some(kind),
        level: Some(level),
        force: None,
    };
    assert!(level(CompressionArg::Gzip, 10).resolve().is_err());
    assert!(level(CompressionArg::Zstd, 0).resolve().is_err());
    assert!(level(CompressionArg::Uncompressed, 1).resolve().is_err());
    assert_eq!(
        level(CompressionArg::Gzip, 0).resolve().unwrap().0,
        Compression::Gzip { level: 0 }
    );
}

#[test]
fn cache_specs_parse() {
    let r = |s: &str| CacheSpec::Registry {
        reference: s.into(),
        mode: CacheMode::Min,
    };
    assert_eq!(
        parse_cache_spec("reg:5000/app:cache", true).unwrap(),
        r("reg:5000/app:cache")
    );
    assert_eq!(
        parse_cache_spec("type=registry,ref=reg/app:c", true).unwrap(),
        r("reg/app:c")
    );
    assert_eq!(
        parse_cache_spec("type=registry,ref=reg/app:c,mode=max", false).unwrap(),
        CacheSpec::Registry {
            reference: "reg/app:c".into(),
            mode: CacheMode::Max
        }
    );
    assert_eq!(
        parse_cache_spec("type=local,src=/c", true).unwrap(),
        CacheSpec::Local {
            dir: "/c".into(),
            mode: CacheMode::Min
        }
    );
    assert_eq!(
        parse_cache_spec("type=local,dest=/c,mode=max", false).unwrap(),
        CacheSpec::Local {
            dir: "/c".into(),
            mode: CacheMode::Max
        }
    );
    assert_eq!(
        parse_cache_spec("type=inline", false).unwrap(),
        CacheSpec::Inline
    );
    assert!(parse_cache_spec("type=local,dest=/c", true)
        .unwrap_err()
        .contains("unknown key \"dest\""));
    assert!(parse_cache_spec("type=local", false)
        .unwrap_err()
        .contains("needs dest="));
    assert!(parse_cache_spec("type=registry", true)
        .unwrap_err()
        .contains("needs ref="));
    assert!(parse_cache_spec("type=registry,ref=x,mode=all", false)
        .unwrap_err()
        .contains("min or max"));
    assert!(parse_cache_spec("type=inline", true)
        .unwrap_err()
        .contains("type=registry"));
    assert!(parse_cache_spec("type=s3,ref=x", false)
        .unwrap_err()
        .contains("unknown type"));
    assert!(
        parse_cache_spec("somewhere", false).is_err(),
        "an export needs a type"
    );
}
