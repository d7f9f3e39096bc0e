//! Human-readable durations as written in the config file: `"250ms"`, `"5s"`, `"1m30s"`, `"1h"`.
//!
//! A duration is one or more `<integer><unit>` terms with units `h`, `m`, `s`, `ms`, `us`, `ns`,
//! largest unit first, each unit at most once, no spaces. [`format_duration`] writes the same
//! form, so a validated config serializes back to what a user would write.

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("the duration is empty")]
    Empty,
    #[error("expected a number at `{rest}`")]
    ExpectedNumber { rest: String },
    #[error("fractions are not supported (`{term}`)")]
    Fraction { term: String },
    #[error("missing unit after `{number}`")]
    MissingUnit { number: String },
    #[error("unknown unit `{unit}`")]
    UnknownUnit { unit: String },
    #[error("unit `{unit}` is repeated or out of order (write the largest unit first)")]
    UnitOrder { unit: String },
    #[error("the duration is too large")]
    Overflow,
}

/// The accepted units, largest first, with their length in nanoseconds.
const UNITS: &[(&str, u128)] = &[
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses `"1m30s"`-style durations. See the module docs for the grammar.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = text;
    let mut total: u128 = 0;
    // Index into UNITS of the smallest unit seen so far; the next unit must be smaller.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::ExpectedNumber {
                rest: rest.to_owned(),
            });
        }
        let (number, after) = rest.split_at(digits);
        if let Some(fraction) = after.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            let unit = fraction[digits..]
                .bytes()
                .take_while(u8::is_ascii_alphabetic)
                .count();
            return Err(DurationError::Fraction {
                term: format!("{number}.{}", &fraction[..digits + unit]),
            });
        }
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 {
            return Err(DurationError::MissingUnit {
                number: number.to_owned(),
            });
        }
        let (unit, after) = after.split_at(unit_len);
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(DurationError::UnknownUnit {
                unit: unit.to_owned(),
            });
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(DurationError::UnitOrder {
                unit: unit.to_owned(),
            });
        }
        last_unit = Some(index);
        let value: u128 = number.parse().map_err(|_| DurationError::Overflow)?;
        total = value
            .checked_mul(UNITS[index].1)
            .and_then(|nanos| total.checked_add(nanos))
            .ok_or(DurationError::Overflow)?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    Ok(Duration::new(secs, nanos))
}

/// Writes a duration the way the config file spells it: `"30s"`, `"1m30s"`, `"250ms"`, `"0s"`.
/// [`parse_duration`] reads the result back to the same value.
pub fn format_duration(duration: Duration) -> String {
    let mut nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, len) in UNITS {
        let count = nanos / len;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push_str(unit);
            nanos %= len;
        }
    }
    out
}

/// `serialize_with` helper: a duration as its human string.
pub(crate) fn serialize<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_duration(*duration))
}

/// `serialize_with` helper: an optional duration as its human string, or null.
pub(crate) fn serialize_option<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(d) => serializer.serialize_str(&format_duration(*d)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_simple_and_compound_durations() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0s", Duration::ZERO),
            ("1500ms", Duration::from_millis(1500)),
            ("10us", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_durations() {
        let cases = [
            ("", DurationError::Empty),
            (
                "30",
                DurationError::MissingUnit {
                    number: "30".into(),
                },
            ),
            ("5 s", DurationError::MissingUnit { number: "5".into() }),
            ("5sec", DurationError::UnknownUnit { unit: "sec".into() }),
            ("s", DurationError::ExpectedNumber { rest: "s".into() }),
            ("-5s", DurationError::ExpectedNumber { rest: "-5s".into() }),
            ("30s1m", DurationError::UnitOrder { unit: "m".into() }),
            ("1s1s", DurationError::UnitOrder { unit: "s".into() }),
            (
                "1.5s",
                DurationError::Fraction {
                    term: "1.5s".into(),
                },
            ),
            ("99999999999999999999999h", DurationError::Overflow),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn formats_and_round_trips() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::new(5400, 1_001), "1h30m1us1ns"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration));
        }
        assert_eq!(
            parse_duration(&format_duration(Duration::MAX)),
            Ok(Duration::MAX)
        );
    }
}
