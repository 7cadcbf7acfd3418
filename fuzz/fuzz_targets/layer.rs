//! The layer applier: any tar, unpacked as an overlay lower layer and then applied over the
//! result as a plain root filesystem, gives a value or an error and never writes, removes
//! or changes anything outside its destination (a sentinel directory beside it is checked
//! after every input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbuild_snapshot::{apply_layer, unpack_layer, UnpackOptions};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn snapshot(dir: &Path) -> Vec<(String, u64, u32, u64)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        out.push((
            e.file_name().to_string_lossy().into_owned(),
            md.ino(),
            md.mode(),
            md.len(),
        ));
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let base = tempfile::tempdir().unwrap();
    let outside = base.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("sentinel"), b"keep").unwrap();
    let root = base.path().join("root");
    fs::create_dir(&root).unwrap();
    let before = (snapshot(base.path()), snapshot(&outside));
    let opts = UnpackOptions::default();
    let _ = unpack_layer(data, &root, &opts);
    let _ = apply_layer(data, &root, &opts);
    let after = (snapshot(base.path()), snapshot(&outside));
    // The root directory itself may change its mode or size; nothing else may.
    let strip = |v: &Vec<(String, u64, u32, u64)>| {
        v.iter()
            .filter(|e| e.0 != "root")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before.0), strip(&after.0), "beside the root");
    assert_eq!(before.1, after.1, "in the sentinel directory");
    assert_eq!(fs::read(outside.join("sentinel")).unwrap(), b"keep");
    // Make sure the tempdir can go, whatever modes the layer left.
    open_up(&root);
});

fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                open_up(&e.path());
            }
        }
    }
}
