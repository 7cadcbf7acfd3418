//! `--label`: labels set on the command line land in the image config, over the Dockerfile's
//! `LABEL`s, and a bad one fails before anything is built.

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
