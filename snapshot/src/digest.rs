//! Content digests (`sha256:<hex>`), the identity of everything in rbuild.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// Errors parsing a digest string.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Not of the form `sha256:<64 lowercase hex>`.
    #[error("invalid digest {0:?}: want sha256:<64 hex digits>")]
    Invalid(String),
}

/// A validated `sha256:<hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new();
        h.update(bytes);
        h.finish()
    }

    /// The digest whose SHA-256 sum is `sum`.
    pub fn from_sha256(sum: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(sum)))
    }

    /// The full `sha256:<hex>` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The algorithm (always `sha256` today).
    pub fn algorithm(&self) -> &str {
        "sha256"
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError::Invalid(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Invalid(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Incremental SHA-256 that yields a [`Digest`].
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self(Sha256::new())
    }
    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest(format!("sha256:{}", hex::encode(self.0.finalize())))
    }
}

/// A reader that hashes what passes through it and, given the digest the bytes must have,
/// fails at the end of the stream when they do not (an error of kind `InvalidData` naming
/// both), so that no caller takes a corrupt blob for a complete one.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Hasher,
    expected: Option<Digest>,
}

impl<R> VerifyingReader<R> {
    /// Checks the stream against `expected` at its end.
    pub fn new(inner: R, expected: Digest) -> Self {
        VerifyingReader {
            inner,
            hasher: Hasher::new(),
            expected: Some(expected),
        }
    }

    /// Only hashes (the digest is learnt from [`VerifyingReader::finish`]).
    pub fn hashing(inner: R) -> Self {
        VerifyingReader {
            inner,
            hasher: Hasher::new(),
            expected: None,
        }
    }

    /// The digest of what was read.
    pub fn finish(self) -> Digest {
        self.hasher.finish()
    }
}

/// The error a [`VerifyingReader`] (or a stream doing the same) ends with.
pub fn mismatch_error(expected: &Digest, actual: &Digest) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "blob {expected} in the store is corrupt: its content is {actual} (`rbuild du --verify` removes it)"
        ),
    )
}

impl<R: std::io::Read> std::io::Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            if let Some(want) = self.expected.take() {
                let got = self.hasher.clone().finish();
                if got != want {
                    return Err(mismatch_error(&want, &got));
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifying_reader_fails_at_the_end_of_wrong_content() {
        use std::io::Read;
        let want = Digest::of(b"right");
        let mut ok = Vec::new();
        VerifyingReader::new(&b"right"[..], want.clone())
            .read_to_end(&mut ok)
            .unwrap();
        let e = VerifyingReader::new(&b"wrong"[..], want.clone())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e
            .to_string()
            .contains(&format!("blob {want} in the store is corrupt")));
    }

    #[test]
    fn digest_of_empty_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_rejects_bad_forms() {
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(
            "md5:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .parse::<Digest>()
                .is_err()
        );
        assert!(
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
                .parse::<Digest>()
                .is_err()
        );
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        assert_eq!(d.hex().len(), 64);
    }
}
