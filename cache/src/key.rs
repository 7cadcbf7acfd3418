//! Cache keys: digests of exactly the inputs of a build step.

use crate::digest::{Digest, Hasher};

/// The identity of a step's result: a digest over its parent's key and its own inputs.
pub type CacheKey = Digest;

/// Builds a [`CacheKey`] from labelled, length-prefixed fields, so that no two different
/// input lists can hash alike by shifting bytes from one field to the next.
pub struct CacheKeyBuilder {
    hasher: Hasher,
    /// `(label, digest of the value)` of every top-level field, to tell what changed.
    fields: Vec<(String, String)>,
    depth: usize,
}

impl CacheKeyBuilder {
    /// Starts a key for a step of the given kind (`run`, `copy`, `from`, ...).
    pub fn new(kind: &str) -> Self {
        let mut b = CacheKeyBuilder {
            hasher: Hasher::new(),
            fields: Vec::new(),
            depth: 0,
        };
        b.field("rbuild-cache-key-v1", kind.as_bytes());
        b
    }

    /// Adds one labelled field.
    pub fn field(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.hasher.update(&(part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        if self.depth == 0 {
            self.record(label, value);
        }
        self
    }

    fn record(&mut self, label: &str, value: &[u8]) {
        let d = crate::digest::Digest::of(value);
        match self.fields.iter_mut().find(|(l, _)| l == label) {
            // A label used twice (several files, several mounts) folds into one entry.
            Some((_, v)) => {
                *v = crate::digest::Digest::of(format!("{v}{d}").as_bytes()).hex()[..16].to_string()
            }
            None => self
                .fields
                .push((label.to_string(), d.hex()[..16].to_string())),
        }
    }

    /// The labelled fields so far, with short digests of their values.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// Adds a string field.
    pub fn str(&mut self, label: &str, value: &str) -> &mut Self {
        self.field(label, value.as_bytes())
    }

    /// Adds a list of strings as one field.
    pub fn strs<S: AsRef<str>>(&mut self, label: &str, values: &[S]) -> &mut Self {
        let mut all = Vec::new();
        for v in values {
            all.extend_from_slice(&(v.as_ref().len() as u64).to_le_bytes());
            all.extend_from_slice(v.as_ref().as_bytes());
        }
        self.record(label, &all);
        self.depth += 1;
        self.field(label, &(values.len() as u64).to_le_bytes());
        for v in values {
            self.field("item", v.as_ref().as_bytes());
        }
        self.depth -= 1;
        self
    }

    /// The finished key.
    pub fn finish(&self) -> CacheKey {
        self.hasher.clone().finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_cannot_be_shifted() {
        let a = CacheKeyBuilder::new("run")
            .str("a", "bc")
            .str("d", "")
            .finish();
        let b = CacheKeyBuilder::new("run")
            .str("a", "b")
            .str("d", "c")
            .finish();
        assert_ne!(a, b);
    }

    #[test]
    fn fields_say_what_changed() {
        let k = |cmd: &str, env: &str| {
            let mut b = CacheKeyBuilder::new("run");
            b.strs("argv", &["sh", "-c", cmd]).str("env", env);
            b.fields().to_vec()
        };
        let (a, b) = (k("true", "A=1"), k("true", "A=2"));
        let changed: Vec<&str> = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.0.as_str())
            .collect();
        assert_eq!(changed, vec!["env"]);
        assert_eq!(
            a.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
            vec!["rbuild-cache-key-v1", "argv", "env"]
        );
    }

    #[test]
    fn same_inputs_same_key() {
        let k = |cmd: &str| {
            CacheKeyBuilder::new("run")
                .strs("argv", &["sh", "-c", cmd])
                .finish()
        };
        assert_eq!(k("true"), k("true"));
        assert_ne!(k("true"), k("false"));
    }
}
