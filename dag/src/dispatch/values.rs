//! Values of config instructions written as docker writes them: ports, signals, healthcheck
//! durations.

use super::*;

/// Parses one EXPOSE word (`80`, `80/udp`, `8000-8002/tcp`, legacy
/// `[ip:][host:]container`) into `port/proto` entries, expanding ranges like BuildKit.
pub(super) fn parse_port(raw: &str) -> Result<Vec<String>, String> {
    let container = raw.rsplit(':').next().unwrap_or(raw);
    let (port, proto) = match container.split_once('/') {
        Some((a, b)) => (a, b.to_ascii_lowercase()),
        None => (container, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid port: {raw:?}: invalid proto: {proto}"));
    }
    let num = |s: &str| -> Result<u32, String> {
        match s.parse::<u32>() {
            Ok(n) if n <= 65535 && s.chars().all(|c| c.is_ascii_digit()) => Ok(n),
            _ => Err(format!("invalid containerPort: {port}")),
        }
    };
    let (start, end) = match port.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(port)?, num(port)?),
    };
    if end < start {
        return Err(format!("invalid containerPort: {port}"));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

/// Validates a `--chmod` value: octal up to 07777 or a symbolic mode (`u+x,g-w`).
pub(super) fn validate_signal(s: &str) -> Result<(), String> {
    if s.parse::<u32>().is_ok() {
        return Ok(());
    }
    let n = s.strip_prefix("SIG").unwrap_or(s);
    const KNOWN: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
        "PIPE", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
        "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    if KNOWN.contains(&n) || n.starts_with("RTMIN") || n.starts_with("RTMAX") {
        Ok(())
    } else {
        Err(format!("Invalid signal: {s}"))
    }
}

/// Parses a Go duration (`30s`, `1m30s`, `500ms`, `1.5h`) into nanoseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    let err = || format!("time: invalid duration {s:?}");
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if n == 0 {
            return Err(err());
        }
        let num: f64 = rest[..n].parse().map_err(|_| err())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(err()),
        };
        total += num * mult;
        rest = &rest[u..];
    }
    Ok(total.round() as u64)
}

/// Formats nanoseconds like Go's `time.Duration.String()` (e.g. `1m30s`, `500ms`).
pub fn format_duration(ns: u64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", trim_frac(ns as f64 / 1e3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", trim_frac(ns as f64 / 1e6));
    }
    let h = ns / 3_600_000_000_000;
    let m = (ns / 60_000_000_000) % 60;
    let s = (ns % 60_000_000_000) as f64 / 1e9;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_frac(s)));
    out
}

pub(super) fn trim_frac(f: f64) -> String {
    let s = format!("{f:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Go `%q` of a `[]string`: `["a" "b"]`.
pub(super) fn go_quote_list(v: &[String]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .collect();
    format!("[{}]", items.join(" "))
}

/// Go `%+v` of the healthcheck config, as BuildKit writes it into history.
pub(super) fn go_healthcheck(h: &Healthcheck) -> String {
    format!(
        "{{Test:[{}] Interval:{} Timeout:{} StartPeriod:{} StartInterval:{} Retries:{}}}",
        h.test.join(" "),
        format_duration(h.interval),
        format_duration(h.timeout),
        format_duration(h.start_period),
        format_duration(h.start_interval),
        h.retries
    )
}
