//! The image config: what a stage's state says of it, its history, and the finished image's
//! config and manifest.

use super::*;

impl Builder {
    /// The final image config and manifest.
    pub(super) async fn assemble(self: &Arc<Self>, fs: &ImageFs) -> Result<BuiltImage> {
        // Every deferred step of the image runs from here, all at once.
        let resolved =
            futures_util::future::try_join_all(fs.layers.iter().map(|e| e.resolve())).await?;
        let mut history = fs.history.clone();
        for (e, r) in fs.layers.iter().zip(&resolved) {
            if let (LayerEntry::Deferred { history: h, .. }, None) = (e, r) {
                history[*h]["empty_layer"] = json!(true);
            }
        }
        let mut descs = Vec::new();
        for l in resolved.into_iter().flatten() {
            descs.push(l.desc.get().await?);
        }
        // A stage made outside the image earlier (another --target), or a build that needed
        // no blobs, left layers without blobs. Without an output that takes them, the
        // manifest names the layers as the plain tars they are.
        let descs = if self.image_needs_blobs() {
            self.with_blobs(descs).await?
        } else {
            descs
        };
        let mut config = fs.config.clone();
        let obj = config
            .as_object_mut()
            .ok_or_else(|| anyhow!("base image config is not an object"))?;
        obj.remove("container_config");
        obj.remove("container");
        obj.remove("docker_version");
        obj.remove("id");
        obj.remove("parent");
        obj.remove(rbuild_cache::export::INLINE_CONFIG_KEY);
        if self.opts.cache_to.contains(&CacheSpec::Inline) {
            let export = self.cache_records(CacheMode::Min, fs).await?;
            obj.insert(
                rbuild_cache::export::INLINE_CONFIG_KEY.into(),
                serde_json::from_slice(&export.to_json())?,
            );
        }
        let p = &self.platform;
        obj.insert("os".into(), json!(p.os));
        obj.insert("architecture".into(), json!(p.arch));
        match &p.variant {
            Some(v) => obj.insert("variant".into(), json!(v)),
            None => obj.remove("variant"),
        };
        obj.insert("created".into(), json!(now_rfc3339()));
        let mut c = obj.get("config").cloned().unwrap_or_else(|| json!({}));
        apply_state_to_config(&fs.state, &mut c);
        if !self.opts.labels.is_empty() {
            let mut labels = fs.state.labels.clone();
            labels.extend(self.opts.labels.clone());
            c["Labels"] = json!(labels);
        }
        obj.insert("config".into(), c);
        obj.insert(
            "rootfs".into(),
            json!({"type": "layers", "diff_ids": descs.iter().map(|d| d.diff_id.to_string()).collect::<Vec<_>>()}),
        );
        obj.insert("history".into(), Value::Array(history));
        let layers = if self.opts.force_compression && self.image_needs_blobs() {
            self.recompress_layers(descs).await?
        } else {
            descs
        };
        use crate::annotations::{annotations_for, AnnotationTarget};
        let (all, platform) = (&self.opts.annotations, &self.platform);
        let manifest = annotations_for(all, AnnotationTarget::Manifest, Some(platform));
        let mut image = image::assemble_json_with(config, layers, &manifest, &self.store)?;
        image.descriptor_annotations =
            annotations_for(all, AnnotationTarget::ManifestDescriptor, Some(platform));
        Ok(image)
    }

    /// Makes and stores the index of every platform's image, with the `index` and
    /// `index-descriptor` annotations.
    pub(super) fn assemble_index(
        &self,
        images: Vec<(Platform, BuiltImage)>,
        attestations: Vec<crate::attest::BuiltAttestation>,
    ) -> Result<crate::index::BuiltIndex> {
        use crate::annotations::{annotations_for, AnnotationTarget};
        let all = &self.opts.annotations;
        Ok(crate::index::assemble_index(
            images,
            attestations,
            &annotations_for(all, AnnotationTarget::Index, None),
            annotations_for(all, AnnotationTarget::IndexDescriptor, None),
            &self.store,
        )?)
    }
}

pub(super) fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(117).collect::<String>())
    } else {
        s
    }
}

pub(super) fn history_entry(created_by: &str, empty: bool) -> Value {
    let mut h = json!({"created": now_rfc3339(), "created_by": created_by, "comment": "buildkit.dockerfile.v0"});
    if empty {
        h["empty_layer"] = json!(true);
    }
    h
}

/// `SOURCE_DATE_EPOCH` of this build (set from the environment, `--build-arg` or
/// `--reproducible` before the build starts): timestamps in the image are clamped to it.
pub fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
}

/// Now (or `SOURCE_DATE_EPOCH`) as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    let secs = source_date_epoch().unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    });
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Reads the Dockerfile-visible state out of an image config JSON.
pub(super) fn state_from_config(config: &Value) -> ImageState {
    let c = config.get("config").cloned().unwrap_or_else(|| json!({}));
    let strs = |v: Option<&Value>| -> Option<Vec<String>> {
        v.and_then(|v| v.as_array()).map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
    };
    let keys = |v: Option<&Value>| -> std::collections::BTreeSet<String> {
        v.and_then(|v| v.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let env = strs(c.get("Env"))
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect();
    let mut st = ImageState {
        env,
        ..Default::default()
    };
    st.user = c
        .get("User")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    st.workdir = c
        .get("WorkingDir")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string();
    st.cmd = strs(c.get("Cmd"));
    st.args_escaped = c.get("ArgsEscaped").and_then(Value::as_bool) == Some(true);
    st.entrypoint = strs(c.get("Entrypoint"));
    st.labels = c
        .get("Labels")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    st.exposed_ports = keys(c.get("ExposedPorts"));
    st.volumes = keys(c.get("Volumes"));
    st.stop_signal = c
        .get("StopSignal")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    if let Some(sh) = strs(c.get("Shell")) {
        st.shell = sh;
    }
    st.onbuild = strs(c.get("OnBuild")).unwrap_or_default();
    st.healthcheck = c
        .get("Healthcheck")
        .and_then(|h| serde_json::from_value(h.clone()).ok());
    st
}

/// Writes the Dockerfile-visible state into the `config` object of an image config.
pub(super) fn apply_state_to_config(st: &ImageState, c: &mut Value) {
    let set = |c: &mut Value, k: &str, v: Option<Value>| {
        let o = c.as_object_mut().unwrap();
        match v {
            Some(v) => {
                o.insert(k.to_string(), v);
            }
            None => {
                o.remove(k);
            }
        }
    };
    if !c.is_object() {
        *c = json!({});
    }
    let env: Vec<String> = st.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    set(c, "Env", (!env.is_empty()).then(|| json!(env)));
    set(c, "User", (!st.user.is_empty()).then(|| json!(st.user)));
    set(
        c,
        "WorkingDir",
        (st.workdir != "/" && !st.workdir.is_empty()).then(|| json!(st.workdir)),
    );
    set(c, "Cmd", st.cmd.as_ref().map(|v| json!(v)));
    set(c, "ArgsEscaped", st.args_escaped.then_some(json!(true)));
    set(c, "Entrypoint", st.entrypoint.as_ref().map(|v| json!(v)));
    set(
        c,
        "Labels",
        (!st.labels.is_empty()).then(|| json!(st.labels)),
    );
    let obj_of = |s: &std::collections::BTreeSet<String>| -> Value {
        Value::Object(s.iter().map(|k| (k.clone(), json!({}))).collect())
    };
    set(
        c,
        "ExposedPorts",
        (!st.exposed_ports.is_empty()).then(|| obj_of(&st.exposed_ports)),
    );
    set(
        c,
        "Volumes",
        (!st.volumes.is_empty()).then(|| obj_of(&st.volumes)),
    );
    set(c, "StopSignal", st.stop_signal.as_ref().map(|s| json!(s)));
    let default_shell = ["/bin/sh".to_string(), "-c".to_string()];
    set(
        c,
        "Shell",
        (st.shell.as_slice() != default_shell.as_slice()).then(|| json!(st.shell)),
    );
    set(
        c,
        "OnBuild",
        (!st.onbuild.is_empty()).then(|| json!(st.onbuild)),
    );
    set(
        c,
        "Healthcheck",
        st.healthcheck
            .as_ref()
            .and_then(|h| serde_json::to_value(h).ok()),
    );
}
