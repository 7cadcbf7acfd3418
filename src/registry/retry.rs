//! Asking a registry again: which failures may go away (5xx, 429, connection errors and
//! resets, bodies cut short) and how long to wait before the next try (exponential backoff
//! with jitter from `backon`, or the registry's own `Retry-After`). Errors that will not go
//! away (401/403 after the token flow, 404, a digest mismatch) fail at once.

use super::RegistryError;
use backon::BackoffBuilder;
use oci_client::errors::OciDistributionError;
use std::sync::Arc;
use std::time::Duration;

/// How many times, and how patiently, a registry request is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries after the first (`--registry-retries`, `RBUILD_REGISTRY_RETRIES`; 0: none).
    pub retries: usize,
    /// The first wait; each next one doubles, with jitter.
    pub min_delay: Duration,
    /// The longest wait (a `Retry-After` is capped at it too).
    pub max_delay: Duration,
}

/// Tries after the first, by default: with the delays below, about 6 s of waiting in all.
pub const DEFAULT_RETRIES: usize = 5;

impl Default for RetryPolicy {
    fn default() -> Self {
        let retries = std::env::var("RBUILD_REGISTRY_RETRIES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_RETRIES);
        RetryPolicy {
            retries,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The waits before each try again, in order; as many as `retries`.
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.retries)
            .with_jitter()
            .build()
    }
}

/// Says that a request is tried again (one line per retry, in the build's output).
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

/// `Some(retry_after)` when `e` may go away if asked again (`retry_after`: what the registry
/// asked for, if it did); `None` when it will not.
pub fn transient(e: &RegistryError) -> Option<Option<Duration>> {
    match e {
        RegistryError::Unreachable { .. } => Some(None),
        RegistryError::Busy { retry_after, .. } => Some(*retry_after),
        RegistryError::Registry { source, .. } => match source {
            OciDistributionError::ServerError { code, .. }
                if *code >= 500 || *code == 429 || *code == 408 =>
            {
                Some(None)
            }
            // A connection reset, a body cut short, a timeout while reading.
            OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => Some(None),
            _ => None,
        },
        _ => None,
    }
}

/// The wait before the next try: the registry's `Retry-After` where it gave one (capped),
/// else the next backoff delay; `None` when no try is left.
pub fn next_wait(
    policy: &RetryPolicy,
    delays: &mut impl Iterator<Item = Duration>,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let backoff = delays.next()?;
    Some(match retry_after {
        Some(d) => d.min(policy.max_delay),
        None => backoff,
    })
}

/// The wait before trying again after `e`; `None` when `e` will not go away or no try is
/// left.
pub fn wait_after(
    policy: &RetryPolicy,
    delays: &mut impl Iterator<Item = Duration>,
    e: &RegistryError,
) -> Option<Duration> {
    next_wait(policy, delays, transient(e)?)
}

/// Parses a `Retry-After` header: seconds (an HTTP date is taken as "soon").
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_bounded_in_count_and_length() {
        let p = RetryPolicy {
            retries: 4,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let d: Vec<Duration> = p.delays().collect();
        assert_eq!(d.len(), 4);
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)), "{d:?}");
        let mut it = p.delays();
        assert_eq!(
            next_wait(&p, &mut it, Some(Duration::from_secs(30))),
            Some(Duration::from_secs(1)),
            "Retry-After is capped"
        );
        let none = RetryPolicy { retries: 0, ..p };
        assert_eq!(next_wait(&none, &mut none.delays(), None), None);
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
    }
}
