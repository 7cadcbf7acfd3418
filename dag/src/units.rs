//! Sizes as docker spells them, bytes as rbuild prints them, and the `PATH` an image gets
//! when it sets none: the one home of each, for the parser, the CLI and the sandbox.

/// `PATH` when the image sets none (BuildKit's and docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What `K`, `M`, `G` and `T` without an `i` mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeUnits {
    /// Powers of 1000, as `docker system prune --keep-storage` (go-units `FromHumanSize`);
    /// `KiB`, `MiB`, … are powers of 1024.
    Decimal,
    /// Powers of 1024 whatever follows the letter, as `--memory` and `--mount size=`
    /// (go-units `RAMInBytes`).
    Binary,
}

/// Parses a size: bytes, or a number (with a fraction or not) and a unit of `b`, `k`, `m`,
/// `g`, `t` with `i`, `b` or `ib` after it or not, in any case.
pub fn parse_size(s: &str, units: SizeUnits) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64m, 512MiB, 10GB)"))?;
    let lower = unit.trim().to_ascii_lowercase();
    let (letter, binary) = match lower.as_str() {
        "" | "b" => ("", false),
        u => match u.strip_suffix("ib").or_else(|| u.strip_suffix('i')) {
            Some(l) => (l, true),
            None => (u.strip_suffix('b').unwrap_or(u), false),
        },
    };
    let base: f64 = if binary || units == SizeUnits::Binary {
        1024.0
    } else {
        1000.0
    };
    let power = match letter {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => {
            return Err(format!(
                "{s:?}: unknown size unit {unit:?} (B, K, M, G, T, with B, i or iB after them)"
            ))
        }
    };
    Ok((n * base.powi(power)).round() as u64)
}

/// Bytes for people: `512 B`, `1.5 MiB` (binary units) or `1.5 MB` (decimal units, as
/// `docker system df`).
pub fn human_bytes(b: u64, units: SizeUnits) -> String {
    let (base, names): (f64, [&str; 5]) = match units {
        SizeUnits::Binary => (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"]),
        SizeUnits::Decimal => (1000.0, ["B", "kB", "MB", "GB", "TB"]),
    };
    let mut v = b as f64;
    let mut i = 0;
    while v >= base && i + 1 < names.len() {
        v /= base;
        i += 1;
    }
    if i == 0 || (units == SizeUnits::Binary && v.fract() == 0.0) {
        format!("{v:.0} {}", names[i])
    } else {
        format!("{v:.1} {}", names[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_docker_reads_them() {
        use SizeUnits::*;
        assert_eq!(parse_size("10GB", Decimal).unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512MiB", Decimal).unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g", Decimal).unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096", Decimal).unwrap(), 4096);
        assert_eq!(parse_size("64m", Binary).unwrap(), 64 << 20);
        assert_eq!(parse_size("64MB", Binary).unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5g", Binary).unwrap(), 3 << 29);
        assert_eq!(parse_size("2Ti", Binary).unwrap(), 2 << 40);
        assert!(parse_size("ten", Binary).is_err());
        assert!(parse_size("5XB", Decimal)
            .unwrap_err()
            .contains("unknown size unit"));
    }

    #[test]
    fn bytes_print_in_either_unit() {
        assert_eq!(human_bytes(1536 << 20, SizeUnits::Binary), "1.5 GiB");
        assert_eq!(human_bytes(64 << 20, SizeUnits::Binary), "64 MiB");
        assert_eq!(human_bytes(100, SizeUnits::Binary), "100 B");
        assert_eq!(human_bytes(1_500_000, SizeUnits::Decimal), "1.5 MB");
        assert_eq!(human_bytes(999, SizeUnits::Decimal), "999 B");
    }
}
