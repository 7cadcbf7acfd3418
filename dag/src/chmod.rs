//! `COPY --chmod` values: parsed once, at dispatch, and applied by the copier.

/// A `--chmod` value: octal, or symbolic like chmod(1) (`u+x,go-w`, `a=rX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chmod {
    /// The value as written (in history and cache keys).
    pub spec: String,
    rule: Rule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// Absolute bits.
    Octal(u32),
    /// Clauses `(who mask, op, permission letters)`.
    Symbolic(Vec<(u32, char, String)>),
}

impl Chmod {
    /// Parses octal (`0755`, up to `07777`) or symbolic (`u+x,g-w,o=r`, `a+X`) modes; the
    /// errors are BuildKit's.
    pub fn parse(s: &str) -> Result<Chmod, String> {
        let bad = || format!("invalid chmod parameter: '{s}'");
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
            return match u32::from_str_radix(s, 8) {
                Ok(m) if m <= 0o7777 => Ok(Chmod {
                    spec: s.to_string(),
                    rule: Rule::Octal(m),
                }),
                _ => Err(format!(
                    "invalid chmod parameter: '{s}'. it should be octal string and between 0 and 07777"
                )),
            };
        }
        if s.is_empty() {
            return Err(bad());
        }
        let mut clauses = Vec::new();
        for clause in s.split(',') {
            let op_at = clause.find(['+', '-', '=']).ok_or_else(bad)?;
            let (who_s, rest) = clause.split_at(op_at);
            let mut who = 0;
            for c in who_s.chars() {
                who |= match c {
                    'u' => 0o700,
                    'g' => 0o070,
                    'o' => 0o007,
                    'a' => 0o777,
                    _ => return Err(bad()),
                };
            }
            if who == 0 {
                who = 0o777;
            }
            let op = rest.chars().next().ok_or_else(bad)?;
            let perms = &rest[1..];
            if !perms.chars().all(|c| "rwxXst".contains(c)) {
                return Err(bad());
            }
            clauses.push((who, op, perms.to_string()));
        }
        Ok(Chmod {
            spec: s.to_string(),
            rule: Rule::Symbolic(clauses),
        })
    }

    /// Absolute bits, as for files a COPY makes from nothing (secrets, inline files).
    pub fn octal(mode: u32) -> Chmod {
        Chmod {
            spec: format!("{mode:o}"),
            rule: Rule::Octal(mode & 0o7777),
        }
    }

    /// The parsed rule as cache keys hold it (`Octal(420)`, `Symbolic([(448, '+', "x")])`):
    /// unchanged since the rule was parsed in the builder, so keys stay valid.
    pub fn key_text(&self) -> String {
        format!("{:?}", self.rule)
    }

    /// The mode a file or directory of mode `mode` gets.
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        match &self.rule {
            Rule::Octal(m) => *m,
            Rule::Symbolic(clauses) => {
                let mut m = mode & 0o7777;
                for (who, op, perms) in clauses {
                    let mut bits = 0;
                    for c in perms.chars() {
                        bits |= match c {
                            'r' => 0o444,
                            'w' => 0o222,
                            'x' => 0o111,
                            'X' if is_dir || m & 0o111 != 0 => 0o111,
                            's' => 0o6000,
                            't' => 0o1000,
                            _ => 0,
                        };
                    }
                    let mask = who
                        | if *who & 0o700 != 0 { 0o4000 } else { 0 }
                        | if *who & 0o070 != 0 { 0o2000 } else { 0 }
                        | if *who == 0o777 { 0o1000 } else { 0 };
                    let bits = bits & mask;
                    m = match op {
                        '+' => m | bits,
                        '-' => m & !bits,
                        _ => (m & !mask) | bits,
                    };
                }
                m
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_apply_as_chmod_does() {
        assert_eq!(Chmod::parse("0755").unwrap().apply(0o600, false), 0o755);
        assert_eq!(Chmod::parse("u+x,go-w").unwrap().apply(0o666, false), 0o744);
        assert_eq!(Chmod::parse("a=rX").unwrap().apply(0o700, true), 0o555);
        assert_eq!(Chmod::parse("a=rX").unwrap().apply(0o600, false), 0o444);
        assert!(Chmod::parse("8")
            .unwrap_err()
            .contains("between 0 and 07777"));
        assert!(Chmod::parse("z+x").is_err());
        assert_eq!(Chmod::parse("+x").unwrap().apply(0o600, false), 0o711);
        assert!(
            Chmod::parse("g=u").is_err(),
            "copying another class's bits is not supported"
        );
        assert!(Chmod::parse("9999").is_err());
        assert!(Chmod::parse("").is_err());
    }
}
