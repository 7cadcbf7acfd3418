//! A registry that sends more than it should is cut off with an error that says so (issue 10,
//! item 7): a manifest over 8 MiB, and a blob whose descriptor gives no size.

mod common;
use common::*;
use std::io::{Read, Write};
use std::process::Command;

/// What the hostile registry answers for a path: status, content type and a body of
/// `len` bytes made by repeating `fill` after `head`.
struct Reply {
    head: Vec<u8>,
    fill: u8,
    len: usize,
}

/// An HTTP/1.1 server on loopback answering each request with `route(path)` (no
/// Content-Length: the body ends when the connection closes, as a registry may do).
fn serve(route: fn(&str) -> Option<Reply>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                let Some(r) = route(&path) else {
                    let _ = write!(
                        s,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    return;
                };
                let _ = write!(s, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(&r.head);
                let chunk = vec![r.fill; 1 << 16];
                let mut left = r.len.saturating_sub(r.head.len());
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    port
}

/// The config digest the "nosize" manifest names (of nothing the server sends).
const CONFIG: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

fn route(path: &str) -> Option<Reply> {
    let json = |s: String| Reply {
        head: s.into_bytes(),
        fill: b' ',
        len: 0,
    };
    match path {
        "/v2/" => Some(json("{}".into())),
        // 64 MiB of JSON whitespace: a manifest that never seems to end.
        "/v2/big/manifests/latest" => Some(Reply {
            head: b"{".to_vec(),
            fill: b' ',
            len: 64 << 20,
        }),
        "/v2/nosize/manifests/latest" => Some(json(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CONFIG}"}},"layers":[]}}"#
        ))),
        p if p == format!("/v2/nosize/blobs/{CONFIG}") => Some(Reply {
            head: Vec::new(),
            fill: 0,
            len: 65 << 20,
        }),
        _ => None,
    }
}

fn build_from(image: &str) -> String {
    let ctx = context(&[("Dockerfile", &format!("FROM {image}\nRUN true\n"))]);
    let t = tempfile::tempdir().unwrap();
    let res = run(Command::new("timeout")
        .arg("300")
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(!res.status.success(), "{err}");
    err
}

#[test]
fn a_manifest_over_8_mib_is_refused() {
    let port = serve(route);
    let err = build_from(&format!("127.0.0.1:{port}/big:latest"));
    assert!(
        err.contains("fetching the manifest: the registry sent more than the 8388608 bytes rbuild reads of a manifest"),
        "{err}"
    );
}

#[test]
fn a_blob_without_a_size_is_read_only_up_to_a_bound() {
    let port = serve(route);
    let err = build_from(&format!("127.0.0.1:{port}/nosize:latest"));
    assert!(
        err.contains(&format!("blob {CONFIG} has no size in its manifest"))
            && err.contains("more than the 67108864 bytes"),
        "{err}"
    );
}
