//! `--label`: labels set on the command line land in the image config, over the Dockerfile's
//! `LABEL`s, and a bad one fails before anything is built. `--annotation`: on the manifest
//! (per platform too) and on the descriptors naming it, in an OCI layout, a docker archive and
//! a registry, as skopeo reads them.

mod common;
use common::*;
use std::process::Command;

#[test]
fn labels_from_the_command_line_override_the_dockerfile() {
    ensure_tools();
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nLABEL a=dockerfile b=kept\nCOPY Dockerfile /\n",
    )]);
    let layout = out.path().join("oci");
    ok(rbuild(store.path())
        .args([
            "--label", "a=cli", "--label", "c=x=y", "--label", "empty", "--output",
        ])
        .arg(format!("type=oci,dest={}", layout.display()))
        .arg(ctx.path()));
    let cfg: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci:{}", layout.display()))))
    .unwrap();
    assert_eq!(
        cfg["config"]["Labels"],
        serde_json::json!({"a": "cli", "b": "kept", "c": "x=y", "empty": ""}),
        "{cfg}"
    );
    // The same build without --label keeps the Dockerfile's labels only.
    let layout2 = out.path().join("oci2");
    ok(rbuild(store.path())
        .arg("--output")
        .arg(format!("type=oci,dest={}", layout2.display()))
        .arg(ctx.path()));
    let cfg: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci:{}", layout2.display()))))
    .unwrap();
    assert_eq!(
        cfg["config"]["Labels"],
        serde_json::json!({"a": "dockerfile", "b": "kept"}),
        "{cfg}"
    );
}

#[test]
fn an_empty_label_key_is_refused_before_the_build() {
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY Dockerfile /\n")]);
    let dest = out.path().join("oci");
    let res = run(rbuild(store.path())
        .args(["--label", "=v", "--output"])
        .arg(format!("type=oci,dest={}", dest.display()))
        .arg(ctx.path()));
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--label \"=v\": the key is empty"), "{err}");
    assert!(!dest.exists(), "nothing written");
}

#[test]
fn annotations_land_on_the_manifest_and_its_descriptors() {
    ensure_tools();
    let reg = Registry::start();
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY Dockerfile /\n")]);
    let (layout, archive) = (out.path().join("oci"), out.path().join("image.tar"));
    let pushed = format!("{}/annotated:1", reg.addr);
    ok(rbuild(store.path())
        .args([
            "--annotation",
            "org.opencontainers.image.title=t=1",
            "--annotation",
            "manifest[linux/arm64]:arm=only",
            "--annotation",
            "manifest[linux/amd64],manifest-descriptor:both=yes",
            "-t",
            &pushed,
            "--push",
            "--output",
        ])
        .arg(format!("type=oci,dest={}", layout.display()))
        .arg("--output")
        .arg(format!("type=docker,dest={}", archive.display()))
        .arg(ctx.path()));
    let want = serde_json::json!({"org.opencontainers.image.title": "t=1", "both": "yes"});
    for src in [
        format!("oci:{}:1", layout.display()),
        format!("docker://{pushed}"),
    ] {
        let raw: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(&src)))
        .unwrap();
        assert_eq!(raw["annotations"], want, "{src}: {raw}");
    }
    // The descriptors: the layout's index.json entry and the archive's.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0]["annotations"];
    assert_eq!(entry["both"], "yes", "{index}");
    assert_eq!(entry["org.opencontainers.image.ref.name"], "1", "{index}");
    assert!(
        entry.get("org.opencontainers.image.title").is_none(),
        "{index}"
    );
    let index = ok(Command::new("tar")
        .args(["-xOf"])
        .arg(&archive)
        .arg("index.json"));
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["both"], "yes",
        "{index}"
    );
}

#[test]
fn index_annotations_and_unknown_types_are_refused_before_the_build() {
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY Dockerfile /\n")]);
    let dest = out.path().join("oci");
    for (flag, code, says) in [
        (
            "index:k=v",
            1,
            "--annotation k: index annotations are not supported for a single-platform image",
        ),
        ("layer:k=v", 2, "unknown annotation type \"layer\""),
        ("k", 2, "want [TYPE:]KEY=VALUE"),
    ] {
        let res = run(rbuild(store.path())
            .args(["--annotation", flag, "--output"])
            .arg(format!("type=oci,dest={}", dest.display()))
            .arg(ctx.path()));
        assert_eq!(res.status.code(), Some(code), "{flag}");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains(says), "{flag}: {err}");
        assert!(!dest.exists(), "nothing written");
    }
}
