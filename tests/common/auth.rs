//! Registry credentials and a registry-free image, for the auth tests.

use rbuild::image::{assemble, LayerDesc, OCI_LAYER_GZIP};
use rbuild_cache::{Digest, Store};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Writes `DIR/config.json` with `user:pass` for `registry`, as `docker login` does.
pub fn docker_config(dir: &Path, registry: &str, user: &str, pass: &str) {
    let auth = base64(&format!("{user}:{pass}"));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
}

fn base64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A one-layer image made here (no base needed).
pub fn tiny_image(store: &Store) -> rbuild::image::BuiltImage {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    tar.append_data(&mut h, "secret.txt", &b"hi\n"[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let layer = LayerDesc {
        digest: store.put_blob_bytes(&gz).unwrap(),
        diff_id: Digest::of(&tar),
        size: gz.len() as u64,
        media_type: OCI_LAYER_GZIP.into(),
    };
    let config = serde_json::from_value(serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})).unwrap();
    assemble(config, vec![layer], BTreeMap::new(), store).unwrap()
}
