//! Durations in the spec are Go-style strings (`90s`, `10m`, `1h30m`), the form
//! Packer and Kubernetes users already write. The CRD enforces the same grammar this
//! parser accepts, so a value the apiserver admits always parses here: each number
//! has at most 9 digits (below `u32::MAX`), and with the fields' 32-character limit
//! no sum can overflow. `tests/durations.rs` checks the two against each other on
//! the real apiserver.

use std::time::Duration;

use kube::core::Rule;

const PATTERN: &str = "^([0-9]{1,9}(ms|s|m|h))+$";

/// CEL rule attached to every duration field of the spec.
pub fn rule() -> Rule {
    Rule::new(format!("self.matches('{PATTERN}')"))
        .message("must be a duration such as 90s, 10m or 1h30m (units: ms, s, m, h; at most 9 digits a number)")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: expected a duration such as 90s, 10m or 1h30m (units: ms, s, m, h; at most 9 digits a number)"
)]
pub struct ParseDurationError(pub String);

pub fn parse(text: &str) -> Result<Duration, ParseDurationError> {
    let err = || ParseDurationError(text.to_string());
    if text.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return Err(err());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        let part = unit
            .checked_mul(u32::try_from(value).map_err(|_| err())?)
            .ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1m1s"), Ok(Duration::from_secs(61)));
    }

    #[test]
    fn the_largest_admitted_values_parse() {
        assert!(parse("999999999h").is_ok());
        assert!(parse("999999999h999999999h999999999h99h").is_ok());
        assert!(parse("000000001s").is_ok());
    }

    #[test]
    fn rejects_what_the_crd_rejects() {
        for bad in [
            "",
            "10",
            "m",
            "5 m",
            "1.5h",
            "-1s",
            "10d",
            "1h30",
            "5000000000s",
            "1000000000ms",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
