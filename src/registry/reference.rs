//! Image references, parsed by the grammar of docker/distribution's `reference` package
//! into oci-spec's [`Reference`].
//!
//! Not oci-spec's own parser: it matches one regex whose tag part, `[\w][\w.-]{0,127}` with
//! Unicode classes, compiles to an NFA of 19 MB at first use, 4.4 MB of which stays resident
//! (heaptrack, 2026-12-07): a third of rbuild's 60 MiB memory budget for one string. The
//! grammar is small and checked here by hand; a test compares both parsers on generated
//! strings.

use oci_client::{ParseError, Reference};

/// The longest repository name (docker/distribution's `NameTotalLengthMax`).
const NAME_MAX: usize = 255;

/// The longest tag.
const TAG_MAX: usize = 128;

/// Parses `s` as docker does, normalised (`busybox` → `docker.io/library/busybox:latest`).
pub(crate) fn parse(s: &str) -> Result<Reference, ParseError> {
    if s.is_empty() {
        return Err(ParseError::NameEmpty);
    }
    // Neither a name nor a tag holds an `@`; a digest follows the first.
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    // A tag follows the last `:` after the last `/` (one before it is a registry's port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if !is_name(name) || !tag.is_none_or(is_tag) || !digest.is_none_or(is_digest) {
        return Err(ParseError::ReferenceInvalidFormat);
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_MAX {
        return Err(ParseError::NameTooLong);
    }
    if let Some(d) = digest {
        let (alg, hex) = d.split_once(':').ok_or(ParseError::DigestInvalidFormat)?;
        let want = match alg {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err(ParseError::DigestUnsupported),
        };
        if hex.len() != want {
            return Err(ParseError::DigestInvalidLength);
        }
    }
    let (tag, digest) = (tag.map(str::to_string), digest.map(str::to_string));
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t, d),
        (None, Some(d)) => Reference::with_digest(registry, repository, d),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest".into())),
    })
}

/// `[domain "/"] path-component ("/" path-component)*`.
fn is_name(name: &str) -> bool {
    let mut parts = name.split('/');
    let first = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    rest.iter().all(|p| is_path_component(p))
        && (is_path_component(first) || (!rest.is_empty() && is_domain(first)))
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*`, a separator being `.`, `_`, `__` or `-`*.
fn is_path_component(p: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = p.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    // Between two runs of alphanumerics: one separator.
    b.split(|c| alnum(*c))
        .filter(|sep| !sep.is_empty())
        .all(|sep| matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|c| *c == b'-'))
}

/// `domain-component ("." domain-component)* [":" [0-9]+]`.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    host.split('.').all(component)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(t: &str) -> bool {
    let word = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_MAX
        && word(&b[0])
        && b.iter().all(|c| word(c) || *c == b'.' || *c == b'-')
}

/// `algorithm ":" hex{32,}`, an algorithm being `[A-Za-z][A-Za-z0-9]*` parts joined by one
/// of `-_+.`.
fn is_digest(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let part = |p: &str| {
        p.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && p.bytes().all(|c| c.is_ascii_alphanumeric())
    };
    alg.split(['-', '_', '+', '.']).all(part)
        && hex.len() >= 32
        && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

/// The registry and repository of a valid name, as docker splits them: the first component
/// is a registry if it has a `.` or a `:` or is `localhost`; Docker Hub's official images
/// are under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (domain, rest) = match name.split_once('/') {
        Some((d, r)) if d.contains(['.', ':']) || d == "localhost" => (d, r),
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let rest = if domain == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest.to_string()
    };
    (domain.to_string(), rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// oci-spec's parser, for strings both grammars read the same (ASCII: its `\w` is
    /// Unicode's, docker's is ASCII).
    fn theirs(s: &str) -> Result<Reference, ParseError> {
        s.parse::<Reference>()
    }

    #[test]
    fn known_references_parse_as_oci_spec_parses_them() {
        let hex = "a".repeat(64);
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "docker.io/busybox".into(),
            "index.docker.io/library/busybox".into(),
            "localhost/x".into(),
            "localhost:5000/a/b:c".into(),
            format!("127.0.0.1:5000/x@sha256:{hex}"),
            format!("x:y@sha256:{hex}"),
            format!("x@sha512:{hex}"),
            format!("x@md5:{}", "a".repeat(32)),
            "x@sha256:short".into(),
            "a__b".into(),
            "a___b".into(),
            "a--b".into(),
            "a-.b".into(),
            "a._b".into(),
            "UPPER".into(),
            "Host.Com/x".into(),
            "Host/x".into(),
            "x/Y".into(),
            ":tag".into(),
            "x:".into(),
            "x@".into(),
            "-x".into(),
            "x/".into(),
            "//x".into(),
            "x//y".into(),
            "host:abc/x".into(),
            "host:/x".into(),
            "[::1]:5000/x".into(),
            "a.b:5000".into(),
            "a.-b.c/x".into(),
            format!("x:{}", "t".repeat(128)),
            format!("x:{}", "t".repeat(129)),
            format!("x/{}", "y".repeat(260)),
            "x:.t".into(),
            "x:_t".into(),
            "x:-t".into(),
            "x@sha256:x:y".into(),
            "x@@sha256:y".into(),
            "a.b:5000/x:y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into(),
            "x:t@sha384:0123".into(),
        ];
        for s in &cases {
            assert_eq!(parse(s), theirs(s), "{s:?}");
        }
    }

    #[test]
    fn generated_strings_parse_as_oci_spec_parses_them() {
        // A fixed xorshift: the same strings on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"ab0Z.-_:/@";
        let (mut ok, mut err) = (0, 0);
        for _ in 0..200_000 {
            let len = 1 + next() % 14;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char)
                .collect();
            let mine = parse(&s);
            assert_eq!(mine, theirs(&s), "{s:?}");
            if mine.is_ok() {
                ok += 1
            } else {
                err += 1
            }
        }
        // Both sides of the grammar were reached.
        assert!(ok > 1000 && err > 1000, "{ok} valid, {err} invalid");
    }
}
