//! The Kubernetes Jobs of `ci/k8s/`: each parses, and holds exactly the security settings its
//! comments explain (the ones the environment matrix backs), the store on an emptyDir and the
//! registry credentials from a Secret at `$DOCKER_CONFIG/config.json`. No cluster is needed.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

/// The manifest `ci/k8s/NAME`, read with python3's YAML parser.
fn manifest(name: &str) -> Value {
    if !run(Command::new("python3").args(["-c", "import yaml"]))
        .status
        .success()
    {
        let _ = run(Command::new("apt-get").args(["update", "-qq"]));
        ok(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3-yaml",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    let path = project().join("ci/k8s").join(name);
    let text = ok(Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path));
    serde_json::from_str(&text).unwrap()
}

/// Checks what every variant shares; returns the rbuild container.
fn common_shape(m: &Value) -> Value {
    assert_eq!(m["apiVersion"], "batch/v1");
    assert_eq!(m["kind"], "Job");
    let pod = &m["spec"]["template"]["spec"];
    assert_eq!(pod["hostUsers"], false, "the pod's own user namespace");
    assert_eq!(pod["restartPolicy"], "Never");
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let c = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rbuild")
        .unwrap()
        .clone();
    assert_eq!(c["args"][0], "build");
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    let mount_at = |path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .clone()
    };
    // Every mount names a volume of the pod.
    for vm in c["volumeMounts"].as_array().unwrap() {
        volume(vm["name"].as_str().unwrap());
    }
    // The store: an emptyDir at RBUILD_ROOT (the image's default too).
    let root = env("RBUILD_ROOT").unwrap();
    assert_eq!(root, "/var/lib/rbuild");
    let store = mount_at(root.as_str().unwrap());
    assert!(
        volume(store["name"].as_str().unwrap())
            .get("emptyDir")
            .is_some(),
        "the store is an emptyDir"
    );
    // Registry credentials: the Secret's .dockerconfigjson as $DOCKER_CONFIG/config.json.
    let dc = env("DOCKER_CONFIG").unwrap();
    let creds = mount_at(dc.as_str().unwrap());
    assert_eq!(creds["readOnly"], true);
    let secret = &volume(creds["name"].as_str().unwrap())["secret"];
    assert_eq!(
        secret["items"],
        json!([{"key": ".dockerconfigjson", "path": "config.json"}])
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], 0, "root of the pod's user namespace");
    assert_eq!(
        sc["appArmorProfile"]["type"], "Unconfined",
        "the default AppArmor profile denies mount"
    );
    assert!(sc.get("privileged").is_none(), "never privileged");
    c
}

#[test]
fn job_gives_sys_admin_in_the_pods_user_namespace_only() {
    let c = common_shape(&manifest("job.yaml"));
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"], json!({"add": ["SYS_ADMIN"]}));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(
        sc.get("procMount").is_none(),
        "not needed with SYS_ADMIN in the pod's user namespace (matrix case f)"
    );
    // The API refuses allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert!(sc.get("allowPrivilegeEscalation").is_none());
}

#[test]
fn job_unmasked_has_no_added_capability_and_an_unmasked_proc() {
    let c = common_shape(&manifest("job-unmasked.yaml"));
    let sc = &c["securityContext"];
    assert!(sc.get("capabilities").is_none());
    assert_eq!(sc["procMount"], "Unmasked");
    assert_eq!(
        sc["seccompProfile"]["type"], "Unconfined",
        "default profiles refuse unshare without SYS_ADMIN"
    );
}

#[test]
fn job_masked_proc_keeps_the_default_proc() {
    let c = common_shape(&manifest("job-masked-proc.yaml"));
    let sc = &c["securityContext"];
    assert!(sc.get("capabilities").is_none());
    assert!(sc.get("procMount").is_none());
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined");
}
