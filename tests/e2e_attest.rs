//! `--provenance`: SLSA provenance v1 in an in-toto statement, attached as BuildKit attaches
//! it (an attestation manifest in the pushed index), or as an OCI 1.1 referrer through the
//! distribution spec's tag fallback (`--attest-as referrers`; distribution 2.8 has no
//! referrers API). Statements are validated against JSON schemas by python3-jsonschema, and
//! read from the real registry with skopeo and plain HTTP.

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The index at `repo:tag`, and its attestation manifest's entry.
fn index_and_attestation(addr: &str, repo: &str, tag: &str) -> (Value, Value) {
    let index = json(&registry_get(addr, &format!("{repo}/manifests/{tag}")));
    let att = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .cloned()
        .unwrap_or_else(|| panic!("no attestation manifest: {index}"));
    (index, att)
}

/// The statement (layer 0) of the attestation manifest `digest`.
fn statement(addr: &str, repo: &str, digest: &str) -> (Value, Value) {
    let manifest = json(&registry_get(addr, &format!("{repo}/manifests/{digest}")));
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["mediaType"], "application/vnd.in-toto+json",
        "{manifest}"
    );
    assert_eq!(
        layer["annotations"]["in-toto.io/predicate-type"],
        "https://slsa.dev/provenance/v1"
    );
    let blob = registry_get(
        addr,
        &format!("{repo}/blobs/{}", layer["digest"].as_str().unwrap()),
    );
    (manifest, json(&blob))
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    ok(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com"))
}

#[test]
fn provenance_is_an_attestation_manifest_in_the_pushed_index() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let store = tempfile::tempdir().unwrap();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!("FROM {base}\nARG A\nCOPY f /f\nRUN --mount=type=secret,id=s cat /run/secrets/s > /dev/null && echo $A > /a\n"),
        ),
        ("f", "data\n"),
    ]);
    git(ctx.path(), &["init", "-q"]);
    git(
        ctx.path(),
        &[
            "remote",
            "add",
            "origin",
            "https://user:hunter2@example.com/team/app.git",
        ],
    );
    git(ctx.path(), &["add", "."]);
    git(ctx.path(), &["commit", "-q", "-m", "one"]);
    let commit = git(ctx.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let pushed = format!("{}/prov:1", reg.addr);
    ok(rbuild(store.path())
        .env("TOPSECRET", "s3cr3t-value")
        .args([
            "--provenance",
            "mode=max,builder-id=https://ci.example.com/run/7",
            "--build-arg",
            "A=1",
            "--secret",
            "id=s,env=TOPSECRET",
            "--push",
            "-t",
            &pushed,
        ])
        .arg(ctx.path()));
    let (index, att) = index_and_attestation(&reg.addr, "prov", "1");
    let image = &index["manifests"][0];
    assert_eq!(image["platform"]["architecture"], "amd64", "{index}");
    assert_eq!(att["platform"]["os"], "unknown");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        image["digest"]
    );
    // skopeo reads the index and picks the image, not the attestation.
    let insp = skopeo_inspect(&pushed);
    assert_eq!(insp["Architecture"], "amd64", "{insp}");

    let (manifest, stmt) = statement(&reg.addr, "prov", att["digest"].as_str().unwrap());
    assert!(
        manifest.get("subject").is_none(),
        "the index form: {manifest}"
    );
    assert_eq!(
        schema_errors("in-toto-statement-v1.schema.json", &stmt),
        Vec::<String>::new()
    );
    assert_eq!(
        schema_errors("slsa-provenance-v1.schema.json", &stmt["predicate"]),
        Vec::<String>::new()
    );
    let image_hex = image["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    assert_eq!(stmt["subject"][0]["digest"]["sha256"], image_hex);
    assert_eq!(
        stmt["subject"][0]["name"],
        format!(
            "pkg:docker/{}/prov@1?platform=linux%2Famd64",
            reg.addr.replace(':', "%3A")
        )
    );
    let p = &stmt["predicate"];
    let deps = p["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    // The base image as the registry names it.
    let base_digest = skopeo_inspect(&base)["Digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        deps.iter().any(|d| d["uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("pkg:docker/") && u.contains("/busybox@latest"))
            && format!("sha256:{}", d["digest"]["sha256"].as_str().unwrap()) == base_digest),
        "{deps:?}"
    );
    assert!(
        deps.iter()
            .any(|d| d["digest"]["gitCommit"] == commit.as_str()
                && d["uri"] == format!("git+https://example.com/team/app.git@{commit}")),
        "{deps:?}"
    );
    assert!(deps.iter().any(|d| d["name"] == "context"), "{deps:?}");
    let ext = &p["buildDefinition"]["externalParameters"];
    assert_eq!(ext["configSource"]["path"], "Dockerfile");
    let df = std::fs::read(ctx.path().join("Dockerfile")).unwrap();
    assert_eq!(
        format!(
            "sha256:{}",
            ext["configSource"]["digest"]["sha256"].as_str().unwrap()
        ),
        sha256(&df)
    );
    assert_eq!(ext["request"]["args"]["build-arg:A"], "1");
    assert_eq!(ext["request"]["secrets"][0]["id"], "s");
    assert_eq!(
        p["runDetails"]["builder"]["id"],
        "https://ci.example.com/run/7"
    );
    assert!(p["runDetails"]["builder"]["version"]["rbuild"].is_string());
    let text = stmt.to_string();
    assert!(!text.contains("s3cr3t-value"), "never a secret");
    assert!(!text.contains("hunter2"), "never a credential");
}

fn sha256(bytes: &[u8]) -> String {
    rbuild_cache::Digest::of(bytes).to_string()
}

#[test]
fn min_provenance_leaves_out_argument_values_and_secret_ids() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let store = tempfile::tempdir().unwrap();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nARG A\nRUN echo $A > /a\n"),
    )]);
    let pushed = format!("{}/min:1", reg.addr);
    ok(rbuild(store.path())
        .env("TOPSECRET", "x")
        .args([
            "--provenance",
            "mode=min",
            "--build-arg",
            "A=value-of-a",
            "--secret",
            "id=s,env=TOPSECRET",
            "--push",
            "-t",
            &pushed,
        ])
        .arg(ctx.path()));
    let (_, att) = index_and_attestation(&reg.addr, "min", "1");
    let (_, stmt) = statement(&reg.addr, "min", att["digest"].as_str().unwrap());
    let text = stmt.to_string();
    assert!(!text.contains("value-of-a"), "{text}");
    assert!(
        stmt["predicate"]["buildDefinition"]["externalParameters"]["request"]
            .get("secrets")
            .is_none()
    );
    assert_eq!(
        schema_errors("slsa-provenance-v1.schema.json", &stmt["predicate"]),
        Vec::<String>::new()
    );
}

#[test]
fn referrers_form_lists_the_attestation_under_the_fallback_tag() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let store = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", &format!("FROM {base}\nRUN echo hi > /hi\n"))]);
    let pushed = format!("{}/refs:1", reg.addr);
    // Reproducible: a second push makes the same attestation.
    let push = || {
        ok(rbuild(store.path())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args([
                "--provenance",
                "true",
                "--attest-as",
                "referrers",
                "--push",
                "-t",
                &pushed,
            ])
            .arg(ctx.path()))
    };
    push();
    let (index, att) = index_and_attestation(&reg.addr, "refs", "1");
    let image_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let (manifest, stmt) = statement(&reg.addr, "refs", att["digest"].as_str().unwrap());
    assert_eq!(
        manifest["artifactType"],
        "application/vnd.docker.attestation.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(manifest["subject"]["digest"], image_digest);
    assert_eq!(
        schema_errors("in-toto-statement-v1.schema.json", &stmt),
        Vec::<String>::new()
    );
    // distribution 2.8 has no referrers API: the tag schema holds the list.
    let tag = image_digest.replace(':', "-");
    let referrers = json(&registry_get(&reg.addr, &format!("refs/manifests/{tag}")));
    assert_eq!(
        referrers["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let listed = referrers["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{referrers}");
    assert_eq!(listed[0]["digest"], att["digest"]);
    assert_eq!(
        listed[0]["artifactType"],
        "application/vnd.docker.attestation.manifest.v1+json"
    );
    // A second push of the same attestation lists it once.
    push();
    let referrers = json(&registry_get(&reg.addr, &format!("refs/manifests/{tag}")));
    assert_eq!(referrers["manifests"].as_array().unwrap().len(), 1);
}

#[test]
fn reproducible_builds_with_provenance_give_the_same_index() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let mut digests = Vec::new();
    for _ in 0..2 {
        let store = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let ctx = context(&[
            ("Dockerfile", &format!("FROM {base}\nCOPY f /f\n")),
            ("f", "x\n"),
        ]);
        let layout = out.path().join("oci");
        ok(rbuild(store.path())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["--provenance", "mode=max", "--output"])
            .arg(format!("type=oci,dest={}", layout.display()))
            .arg(ctx.path()));
        let top = json(&std::fs::read(layout.join("index.json")).unwrap());
        assert_eq!(
            top["manifests"][0]["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let d = top["manifests"][0]["digest"].as_str().unwrap().to_string();
        let index = json(
            &std::fs::read(
                layout
                    .join("blobs/sha256")
                    .join(d.strip_prefix("sha256:").unwrap()),
            )
            .unwrap(),
        );
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");
        digests.push(d);
    }
    assert_eq!(digests[0], digests[1]);
}

/// An executable that `cargo auditable` would have made: the static busybox with a `.dep-v0`
/// section holding the zlib-compressed dependency list (the format `auditable-info` reads).
fn auditable_binary(dir: &std::path::Path) {
    let deps = dir.join("deps.json");
    std::fs::write(
        &deps,
        r#"{"packages":[{"name":"demo-app","version":"0.3.1","source":"local","root":true,"dependencies":[1]},{"name":"serde","version":"1.0.200","source":"crates.io"}]}"#,
    )
    .unwrap();
    ok(Command::new("python3")
        .arg("-c")
        .arg("import sys, zlib; open(sys.argv[2], 'wb').write(zlib.compress(open(sys.argv[1], 'rb').read()))")
        .arg(&deps)
        .arg(dir.join("deps.zlib")));
    ok(Command::new("objcopy")
        .arg(format!(
            "--add-section=.dep-v0={}",
            dir.join("deps.zlib").display()
        ))
        .arg(busybox_static())
        .arg(dir.join("app")));
    std::fs::remove_file(&deps).unwrap();
    std::fs::remove_file(dir.join("deps.zlib")).unwrap();
}

#[test]
fn the_sbom_lists_debian_python_npm_and_rust_packages_as_valid_spdx() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_debian();
    let store = tempfile::tempdir().unwrap();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {base}\nCOPY py /usr/lib/python3/dist-packages/\nCOPY node /app/node_modules/\nCOPY app /usr/local/bin/app\n"
            ),
        ),
        (
            "py/demo_pkg-1.2.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: demo_pkg\nVersion: 1.2.0\nLicense: MIT\n\nLong description.\n",
        ),
        (
            "node/left-pad/package.json",
            r#"{"name": "left-pad", "version": "1.3.0", "license": "WTFPL"}"#,
        ),
        (
            "node/@types/node/package.json",
            r#"{"name": "@types/node", "version": "20.1.0", "license": "MIT"}"#,
        ),
    ]);
    auditable_binary(ctx.path());
    let pushed = format!("{}/sbom:1", reg.addr);
    ok(rbuild(store.path())
        .args(["--sbom", "true", "--push", "-t", &pushed])
        .arg(ctx.path()));
    let (_, att) = index_and_attestation(&reg.addr, "sbom", "1");
    let manifest = json(&registry_get(
        &reg.addr,
        &format!("sbom/manifests/{}", att["digest"].as_str().unwrap()),
    ));
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["annotations"]["in-toto.io/predicate-type"],
        "https://spdx.dev/Document"
    );
    let stmt = json(&registry_get(
        &reg.addr,
        &format!("sbom/blobs/{}", layer["digest"].as_str().unwrap()),
    ));
    assert_eq!(
        schema_errors("in-toto-statement-v1.schema.json", &stmt),
        Vec::<String>::new()
    );
    let doc = &stmt["predicate"];
    assert_eq!(spdx_errors(doc), Vec::<String>::new(), "{doc}");
    let purls: Vec<&str> = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["externalRefs"][0]["referenceLocator"].as_str())
        .collect();
    for want in [
        "pkg:pypi/demo-pkg@1.2.0",
        "pkg:npm/left-pad@1.3.0",
        "pkg:npm/%40types/node@20.1.0",
        "pkg:cargo/demo-app@0.3.1",
        "pkg:cargo/serde@1.0.200",
    ] {
        assert!(purls.contains(&want), "{want} missing: {purls:?}");
    }
    assert!(
        purls
            .iter()
            .any(|p| p.starts_with("pkg:deb/debian/libc6@") && p.ends_with("&distro=debian-12")),
        "{purls:?}"
    );
    assert!(
        purls.iter().filter(|p| p.starts_with("pkg:deb/")).count() > 50,
        "{purls:?}"
    );
}
