//! `ci/action.sh`, the logic of the GitHub Action `ci/action.yml`, driven as the runner drives
//! it: INPUT_* environment variables in, `$GITHUB_OUTPUT` out, against a real registry; the
//! outputs are checked against skopeo and the image itself.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const SECRET: &str = "s3cr3t-value-7d1f";

fn action_sh() -> std::path::PathBuf {
    project().join("ci/action.sh")
}

/// Runs action.sh with `inputs` (INPUT_* names) and a fresh `$GITHUB_OUTPUT`; returns its output
/// and the file's text.
fn run_action(store: &Path, work: &Path, inputs: &[(&str, &str)]) -> (Output, String) {
    let outputs = work.join("github_output");
    std::fs::write(&outputs, "").unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(action_sh())
        .env("INPUT_RBUILD", rbuild_bin())
        .env("RBUILD_ROOT", store)
        .env("GITHUB_OUTPUT", &outputs)
        .env("RUNNER_TEMP", work)
        .current_dir(work);
    for (k, v) in inputs {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    (out, std::fs::read_to_string(&outputs).unwrap())
}

/// Parses a `$GITHUB_OUTPUT` file: `name=value` lines and `name<<DELIMITER` blocks.
fn parse_outputs(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some((name, delim)) = l.split_once("<<") {
            let mut value = Vec::new();
            for v in lines.by_ref() {
                if v == delim {
                    break;
                }
                value.push(v);
            }
            out.insert(name.to_string(), value.join("\n"));
        } else if let Some((name, value)) = l.split_once('=') {
            out.insert(name.to_string(), value.to_string());
        } else {
            panic!("not an output line: {l:?}");
        }
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, data).unwrap();
    ok(Command::new("sha256sum").arg(&f))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

const DOCKERFILE: &str = "ARG BASE
FROM ${BASE} AS base
ARG A
ARG B
ENV A=$A B=$B
FROM base AS final
RUN --mount=type=secret,id=token --mount=type=secret,id=multi \\
    sha256sum < /run/secrets/token > /token.sha && sha256sum < /run/secrets/multi > /multi.sha
FROM final AS unused
RUN false
";

#[test]
fn build_push_outputs_match_the_registry() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", DOCKERFILE)]);
    let r = &reg.addr;
    // Tags split at newlines and commas; build-args and labels at newlines only (their commas
    // stay); a quoted item keeps its quotes-in-quotes and spans lines.
    let tags = format!("{r}/app:1\n{r}/app:2, {r}/app:3\n");
    let build_args = format!("BASE={base}\nA=1\nB=two words, and a comma\n");
    let secrets = format!("token={SECRET}\n\"multi=line1\nline2 \"\"quoted\"\"\"\n");
    let oci = work.path().join("oci");
    let outputs_in = format!("type=oci,dest={}", oci.display());
    let (out, file) = run_action(
        store.path(),
        work.path(),
        &[
            ("INPUT_CONTEXT", ctx.path().to_str().unwrap()),
            ("INPUT_TAGS", &tags),
            ("INPUT_PUSH", "True"),
            // A manifest, not an index: the default provenance has a test of its own.
            ("INPUT_PROVENANCE", "false"),
            ("INPUT_BUILD_ARGS", &build_args),
            ("INPUT_TARGET", "final"),
            (
                "INPUT_LABELS",
                "org.opencontainers.image.title=demo\nlist=a,b\n\"quoted=say \"\"hi\"\"\"\n",
            ),
            ("INPUT_SECRETS", &secrets),
            ("INPUT_OUTPUTS", &outputs_in),
            (
                "INPUT_ANNOTATIONS",
                "org.opencontainers.image.description=a, b\nmanifest:k=v\n",
            ),
        ],
    );
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(
        !log.contains(SECRET) && !log.contains("line1"),
        "a secret was printed:\n{log}"
    );
    assert!(!file.contains(SECRET), "a secret reached $GITHUB_OUTPUT");
    assert!(
        !log.contains("--cache-from") && !log.contains("--cache-to"),
        "cache flags only when given:\n{log}"
    );
    let o = parse_outputs(&file);
    assert_eq!(
        o.keys().collect::<Vec<_>>(),
        ["digest", "imageid", "metadata"],
        "{file}"
    );
    assert!(
        file.contains("metadata<<ghadelimiter_"),
        "multi-line output in the delimiter form: {file}"
    );

    // digest: the manifest every tag points at; imageid: its config.
    for t in ["app:1", "app:2", "app:3"] {
        assert_eq!(
            skopeo_inspect(&format!("{r}/{t}"))["Digest"],
            o["digest"],
            "{t}"
        );
    }
    let manifest: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{r}/app:1"))))
    .unwrap();
    assert_eq!(manifest["config"]["digest"], o["imageid"]);
    assert_eq!(
        manifest["annotations"],
        serde_json::json!({"org.opencontainers.image.description": "a, b", "k": "v"}),
        "annotations split at newlines only"
    );
    let meta: serde_json::Value = serde_json::from_str(&o["metadata"]).unwrap();
    assert_eq!(meta["containerimage.digest"], o["digest"]);
    assert_eq!(meta["containerimage.config.digest"], o["imageid"]);
    assert_eq!(
        meta["tags"],
        serde_json::json!([
            format!("{r}/app:1"),
            format!("{r}/app:2"),
            format!("{r}/app:3")
        ])
    );

    // Labels and build args as given; the OCI output too.
    let cfg = skopeo_config(&format!("{r}/app:2"));
    assert_eq!(
        cfg["config"]["Labels"],
        serde_json::json!({"org.opencontainers.image.title": "demo", "list": "a,b", "quoted": "say \"hi\""}),
        "{cfg}"
    );
    let env: Vec<&str> = cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"A=1") && env.contains(&"B=two words, and a comma"),
        "{env:?}"
    );
    assert!(
        oci.join("index.json").is_file(),
        "outputs: type=oci written"
    );

    // The secrets reached the RUN step, byte for byte, and no layer.
    let rootfs = umoci_unpack_from_registry(&format!("{r}/app:1"), work.path());
    let sha = |f: &str| {
        std::fs::read_to_string(rootfs.join(f))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(sha("token.sha"), sha256_hex(SECRET.as_bytes()));
    assert_eq!(sha("multi.sha"), sha256_hex(b"line1\nline2 \"quoted\""));
    let grep = run(Command::new("grep")
        .args(["-r", "-l", "-a", "--devices=skip", SECRET])
        .arg(store.path())
        .arg(work.path()));
    assert!(
        grep.stdout.is_empty(),
        "the secret is on disk: {}",
        String::from_utf8_lossy(&grep.stdout)
    );
}

#[test]
fn cache_inputs_are_passed_through() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&[(
        "Dockerfile",
        "ARG BASE\nFROM ${BASE}\nRUN echo one > /one\n",
    )]);
    let cache = work.path().join("cache");
    let build_args = format!("BASE={base}");
    let store1 = tempfile::tempdir().unwrap();
    let cache_to = format!("type=local,dest={},mode=max", cache.display());
    let (out, file) = run_action(
        store1.path(),
        work.path(),
        &[
            ("INPUT_CONTEXT", ctx.path().to_str().unwrap()),
            ("INPUT_BUILD_ARGS", &build_args),
            ("INPUT_CACHE_TO", &cache_to),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cache.join("index.json").is_file(),
        "cache-to reached rbuild"
    );
    let first = parse_outputs(&file);
    // A fresh store with cache-from: the RUN step comes from the cache, same image.
    let store2 = tempfile::tempdir().unwrap();
    let cache_from = format!("type=local,src={}", cache.display());
    let (out, file) = run_action(
        store2.path(),
        work.path(),
        &[
            ("INPUT_CONTEXT", ctx.path().to_str().unwrap()),
            ("INPUT_BUILD_ARGS", &build_args),
            ("INPUT_CACHE_FROM", &cache_from),
        ],
    );
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("CACHED"), "{log}");
    let second = parse_outputs(&file);
    assert_eq!(first["imageid"].len(), "sha256:".len() + 64);
    assert_eq!(second["digest"].len(), "sha256:".len() + 64);
}

#[test]
fn bad_inputs_fail_clearly_and_write_no_outputs() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY Dockerfile /\n")]);
    let c = ctx.path().to_str().unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("INPUT_SECRETS", "no-equals-sign-hunter2")],
            "secrets: an item is not ID=VALUE (the value is not shown)",
        ),
        (&[("INPUT_SECRETS", "bad id=x")], "secrets: bad secret id"),
        (&[("INPUT_LOAD", "true")], "load: rbuild has no daemon"),
        (
            &[("INPUT_SBOM", "generator=docker/scout-sbom-indexer")],
            "rbuild scans the image itself",
        ),
        (
            &[("INPUT_TAGS", "\"unterminated")],
            "unterminated double quote",
        ),
        (
            &[("INPUT_RBUILD", "/nonexistent/rbuild")],
            "rbuild (/nonexistent/rbuild) is not installed",
        ),
        (&[("INPUT_TARGET", "nosuchstage")], "the build failed"),
    ];
    for (inputs, want) in cases {
        let mut all = vec![("INPUT_CONTEXT", c)];
        all.extend_from_slice(inputs);
        let (out, file) = run_action(store.path(), work.path(), &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{inputs:?} succeeded");
        assert!(err.contains(want), "{inputs:?}: want {want:?} in:\n{err}");
        assert!(!err.contains("hunter2"), "a secret was printed: {err}");
        assert_eq!(file, "", "{inputs:?}: no outputs after a failure");
    }
}

/// The provenance the action attaches, as build-push-action: by default mode=min (max for a
/// public repository) with the run's URL as builder ID, none when disabled; `digest` is then
/// the index's and `imageid` still the image's config.
#[test]
fn the_default_provenance_follows_build_push_action() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nARG A\nRUN echo $A > /a\n"),
    )]);
    // Runs the action for REPO:1; gives the provenance statement if one is attached, and the
    // outputs.
    let provenance_of = |repo: &str, extra: &[(&str, &str)]| {
        let pushed = format!("{}/{repo}:1", reg.addr);
        let mut inputs = vec![
            ("INPUT_CONTEXT", ctx.path().to_str().unwrap()),
            ("INPUT_TAGS", pushed.as_str()),
            ("INPUT_PUSH", "true"),
            ("INPUT_BUILD_ARGS", "A=value-of-a"),
            ("GITHUB_SERVER_URL", "https://github.com"),
            ("GITHUB_REPOSITORY", "team/app"),
            ("GITHUB_RUN_ID", "42"),
        ];
        inputs.extend_from_slice(extra);
        let (out, file) = run_action(store.path(), work.path(), &inputs);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let o = parse_outputs(&file);
        let top = registry_get(&reg.addr, &format!("{repo}/manifests/1"));
        assert_eq!(
            format!("sha256:{}", sha256_hex(&top)),
            o["digest"],
            "digest names what the tag holds"
        );
        let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
        let Some(manifests) = top["manifests"].as_array() else {
            assert_eq!(top["config"]["digest"], o["imageid"]);
            return (None, o);
        };
        let image: serde_json::Value = serde_json::from_slice(&registry_get(
            &reg.addr,
            &format!(
                "{repo}/manifests/{}",
                manifests[0]["digest"].as_str().unwrap()
            ),
        ))
        .unwrap();
        assert_eq!(
            image["config"]["digest"], o["imageid"],
            "imageid: the image's config"
        );
        let att = manifests
            .iter()
            .find(|m| m["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
            .expect("an index holds an attestation");
        let m: serde_json::Value = serde_json::from_slice(&registry_get(
            &reg.addr,
            &format!("{repo}/manifests/{}", att["digest"].as_str().unwrap()),
        ))
        .unwrap();
        let stmt: serde_json::Value = serde_json::from_slice(&registry_get(
            &reg.addr,
            &format!(
                "{repo}/blobs/{}",
                m["layers"][0]["digest"].as_str().unwrap()
            ),
        ))
        .unwrap();
        (Some(stmt), o)
    };
    // Unset, repository visibility unknown: mode=min, the run as builder.
    let (p, _) = provenance_of("dflt", &[]);
    let p = p.expect("a default provenance");
    assert_eq!(
        p["predicate"]["runDetails"]["builder"]["id"],
        "https://github.com/team/app/actions/runs/42"
    );
    assert!(
        !p.to_string().contains("value-of-a"),
        "min: no build-arg values"
    );
    // A public repository: mode=max.
    let (p, _) = provenance_of("pub", &[("INPUT_REPO_PRIVATE", "false")]);
    assert!(p.unwrap().to_string().contains("value-of-a"), "max");
    // Disabled, by the input or by BUILDX_NO_DEFAULT_ATTESTATIONS.
    assert!(provenance_of("off", &[("INPUT_PROVENANCE", "false")])
        .0
        .is_none());
    assert!(
        provenance_of("env", &[("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")])
            .0
            .is_none()
    );
}

#[test]
fn the_action_maps_every_input_to_the_script() {
    // action.yml passes each input to action.sh under the name the script reads.
    let yml = std::fs::read_to_string(project().join("ci/action.yml")).unwrap();
    let script = std::fs::read_to_string(action_sh()).unwrap();
    let mut inputs = Vec::new();
    let mut section = "";
    for l in yml.lines() {
        if !l.starts_with(' ') && l.ends_with(':') {
            section = l.trim_end_matches(':');
        } else if section == "inputs"
            && l.starts_with("  ")
            && !l.starts_with("   ")
            && l.trim_end().ends_with(':')
        {
            inputs.push(l.trim().trim_end_matches(':').to_string());
        }
    }
    for want in [
        "context",
        "file",
        "tags",
        "push",
        "build-args",
        "target",
        "cache-from",
        "cache-to",
        "labels",
        "annotations",
        "outputs",
        "secrets",
        "platforms",
        "provenance",
        "sbom",
    ] {
        assert!(
            inputs.iter().any(|i| i == want),
            "input {want} missing from action.yml"
        );
    }
    for i in &inputs {
        let var = format!("INPUT_{}", i.to_uppercase().replace('-', "_"));
        assert!(
            yml.contains(&format!("{var}: ${{{{ inputs.{i} }}}}")),
            "action.yml does not pass {i} as {var}"
        );
        assert!(
            script.contains(&format!("input {i})")) || script.contains(&format!("input_bool {i}")),
            "action.sh never reads {i}"
        );
    }
    for o in ["imageid", "digest", "metadata"] {
        assert!(
            yml.contains(&format!("value: ${{{{ steps.build.outputs.{o} }}}}")),
            "output {o}"
        );
        assert!(
            script.contains(&format!("set_output {o} ")),
            "action.sh never sets {o}"
        );
    }
}
