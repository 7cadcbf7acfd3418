//! Cache keys: digests of exactly the inputs of a build step.

use crate::digest::{Digest, Hasher};

/// The identity of a step's result: a digest over its parent's key and its own inputs.
pub type CacheKey = Digest;

/// Builds a [`CacheKey`] from labelled, length-prefixed fields, so that no two different
/// input lists can hash alike by shifting bytes from one field to the next.
pub struct CacheKeyBuilder(Hasher);

impl CacheKeyBuilder {
    /// Starts a key for a step of the given kind (`run`, `copy`, `from`, ...).
    pub fn new(kind: &str) -> Self {
        let mut b = CacheKeyBuilder(Hasher::new());
        b.field("rbuild-cache-key-v1", kind.as_bytes());
        b
    }

    /// Adds one labelled field.
    pub fn field(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.0.update(&(part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// Adds a string field.
    pub fn str(&mut self, label: &str, value: &str) -> &mut Self {
        self.field(label, value.as_bytes())
    }

    /// Adds a list of strings as one field.
    pub fn strs<S: AsRef<str>>(&mut self, label: &str, values: &[S]) -> &mut Self {
        self.field(label, &(values.len() as u64).to_le_bytes());
        for v in values {
            self.field("item", v.as_ref().as_bytes());
        }
        self
    }

    /// The finished key.
    pub fn finish(&self) -> CacheKey {
        self.0.clone().finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_cannot_be_shifted() {
        let a = CacheKeyBuilder::new("run").str("a", "bc").str("d", "").finish();
        let b = CacheKeyBuilder::new("run").str("a", "b").str("d", "c").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn same_inputs_same_key() {
        let k = |cmd: &str| CacheKeyBuilder::new("run").strs("argv", &["sh", "-c", cmd]).finish();
        assert_eq!(k("true"), k("true"));
        assert_ne!(k("true"), k("false"));
    }
}
