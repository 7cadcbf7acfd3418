//! A fault-injecting HTTP/1.1 proxy on loopback, in front of a real registry: it forwards
//! every request (one per connection) and, as its mode says, answers some with an error
//! first or breaks a blob off in the middle.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What the proxy does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every path answers 503 twice before it works.
    Every503Twice,
    /// Every blob answers 503 twice before it works.
    Blobs503Twice,
    /// The first GET of each blob breaks off half-way (the connection is closed).
    BlobResetOnce,
    /// As [`Fault::BlobResetOnce`], and the proxy drops `Range` headers, as a registry (or
    /// a proxy before it) without range support does: the retry gets the whole blob again.
    BlobResetNoRanges,
    /// Every blob's body has one byte flipped half-way (its length unchanged).
    BlobTampered,
    /// Manifests answer 429 with `Retry-After: 1` twice.
    Manifests429,
    /// The first request that uploads blob data (a PATCH or PUT with a body to an upload
    /// session) is cut off: its body is read, then the connection closes unanswered.
    UploadResetOnce,
}

/// A running proxy; `addr` is its `127.0.0.1:port`.
pub struct FaultProxy {
    /// Where to send requests.
    pub addr: String,
    /// How many faults it injected.
    pub injected: Arc<Mutex<u32>>,
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// Reads a request or response head (and whatever body bytes came with it).
fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Some((head, buf[end..].to_vec()));
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub fn start(upstream: &str, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let injected: Arc<Mutex<u32>> = Arc::default();
        let upstream = upstream.to_string();
        let inj = injected.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, seen, inj) = (upstream.clone(), seen.clone(), inj.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream, fault, &seen, &inj);
                });
            }
        });
        FaultProxy { addr, injected }
    }

    /// How many faults it injected so far.
    pub fn count(&self) -> u32 {
        *self.injected.lock().unwrap()
    }
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    fault: Fault,
    seen: &Mutex<HashMap<String, u32>>,
    injected: &Mutex<u32>,
) -> std::io::Result<()> {
    let Some((head, mut body)) = read_head(&mut client) else {
        return Ok(());
    };
    let first = head.lines().next().unwrap_or("").to_string();
    let mut parts = first.split(' ');
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let want = content_length(&head);
    while body.len() < want {
        let mut chunk = vec![0u8; want - body.len()];
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    // Upload sessions have paths of their own (a fresh id, a state query): one key for them
    // all, so that "twice per path" means twice, not twice per new session.
    let key = match path.split_once("/blobs/uploads/") {
        Some((repo, _)) => format!("{method} {repo}/blobs/uploads/*"),
        None => format!("{method} {}", path.split('?').next().unwrap_or("")),
    };
    let n = {
        let mut m = seen.lock().unwrap();
        let c = m.entry(key).or_insert(0);
        *c += 1;
        *c
    };
    let blob = path.contains("/blobs/sha256:") && method == "GET";
    let manifest = path.contains("/manifests/");
    let fail = |client: &mut TcpStream, status: &str, extra: &str| -> std::io::Result<()> {
        *injected.lock().unwrap() += 1;
        write!(
            client,
            "HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let upload = path.contains("/blobs/uploads/") && (method == "PATCH" || method == "PUT");
    if fault == Fault::UploadResetOnce && upload && !body.is_empty() {
        let mut first = injected.lock().unwrap();
        if *first == 0 {
            *first += 1;
            return client.shutdown(std::net::Shutdown::Both);
        }
    }
    match fault {
        Fault::Every503Twice if n <= 2 => return fail(&mut client, "503 Service Unavailable", ""),
        Fault::Blobs503Twice if blob && n <= 2 => {
            return fail(&mut client, "503 Service Unavailable", "")
        }
        Fault::Manifests429 if manifest && n <= 2 => {
            return fail(&mut client, "429 Too Many Requests", "Retry-After: 1\r\n")
        }
        _ => {}
    }
    // Forward, one request per connection.
    let mut up = TcpStream::connect(upstream)?;
    let mut req = String::new();
    for (i, l) in head.trim_end().lines().enumerate() {
        let lower = l.to_ascii_lowercase();
        if i > 0 && lower.starts_with("connection:") {
            continue;
        }
        if i > 0 && fault == Fault::BlobResetNoRanges && lower.starts_with("range:") {
            *injected.lock().unwrap() += 1;
            continue;
        }
        req.push_str(l);
        req.push_str("\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let Some((rhead, rbody)) = read_head(&mut up) else {
        return Ok(());
    };
    client.write_all(rhead.as_bytes())?;
    let reset = matches!(fault, Fault::BlobResetOnce | Fault::BlobResetNoRanges);
    if reset && blob && n == 1 && !rhead.starts_with("HTTP/1.1 3") {
        // Half of the blob, then the connection is gone.
        let half = content_length(&rhead) / 2;
        let mut sent = rbody.len().min(half);
        client.write_all(&rbody[..sent])?;
        let mut chunk = [0u8; 8192];
        while sent < half {
            let k = up.read(&mut chunk)?;
            if k == 0 {
                break;
            }
            let k = k.min(half - sent);
            client.write_all(&chunk[..k])?;
            sent += k;
        }
        *injected.lock().unwrap() += 1;
        return client.shutdown(std::net::Shutdown::Both);
    }
    if fault == Fault::BlobTampered && blob && rhead.starts_with("HTTP/1.1 200") {
        let mut whole = rbody;
        up.read_to_end(&mut whole)?;
        if let Some(b) = whole.get_mut(content_length(&rhead) / 2) {
            *b ^= 0xff;
            *injected.lock().unwrap() += 1;
        }
        return client.write_all(&whole);
    }
    client.write_all(&rbody)?;
    std::io::copy(&mut up, &mut client)?;
    Ok(())
}
