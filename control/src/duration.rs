//! Human durations for TTL flags: `90s`, `30m`, `1h`, `1h30m`, `7d`, `10y` (a year is 365 days).
//! Sans-IO; used by the CLI and stored as whole seconds in state files.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}; write e.g. 90s, 30m, 1h, 1h30m, 7d or 10y")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

/// Parse `<number><unit>` groups (`s`, `m`, `h`, `d`, `w`, `y`); a bare number means seconds.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = num.unwrap_or(0);
            num = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or_else(|| err("too large"))?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(err("unknown unit (use s, m, h, d, w or y)")),
        };
        let n = num
            .take()
            .ok_or_else(|| err("a unit needs a number before it"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| err("too large"))?;
    }
    if num.is_some() {
        return Err(err("the last number has no unit"));
    }
    Ok(Duration::from_secs(total))
}

/// The shortest exact rendering: `1h30m`, `24h`, `7d`, `90s`, `0s`.
pub fn format(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [
        ("y", 365 * 86_400),
        ("d", 86_400),
        ("h", 3600),
        ("m", 60),
        ("s", 1),
    ] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        for (input, secs) in [
            ("90", 90),
            ("90s", 90),
            ("30m", 1800),
            ("1h", 3600),
            ("1h30m", 5400),
            ("7d", 604_800),
            ("2w", 1_209_600),
            ("10y", 315_360_000),
            ("0s", 0),
        ] {
            assert_eq!(parse(input), Ok(Duration::from_secs(secs)), "{input}");
        }
        for bad in [
            "",
            "h",
            "1x",
            "1h30",
            "-1h",
            "1.5h",
            "99999999999999999999y",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for secs in [0, 59, 60, 3600, 5400, 86_400, 90_061, 315_360_000] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format(Duration::from_secs(86_400)), "1d");
    }
}
