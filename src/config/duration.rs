//! The one duration grammar of every configuration: URL options, TOML settings, environment
//! overrides and CLI flags.
//!
//! A duration is a number with a unit, as the `humantime` crate reads it: `500ms`, `10s`,
//! `2m`, `1h`, `1.5s`, `1m30s`, `1h 30m`, `2d` (units `ns`, `us`, `ms`, `s`, `m`, `h`, `d`, `w`
//! and their long names). A bare number is ambiguous and rejected, with two deprecated
//! exceptions kept because they were documented: a bare number of seconds in the etcd settings
//! and in Consul URL options ([`Grammar::SecondsAlias`]). Durations above [`MAX`] are rejected:
//! no setting needs them, and arithmetic on them could overflow.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The longest duration a setting accepts: about ten years.
pub const MAX: Duration = Duration::from_secs(10 * 366 * 86_400);

/// Which spellings a setting accepts besides a number with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// A unit is required.
    UnitRequired,
    /// A bare number also counts, as seconds: deprecated, kept where it was documented (etcd
    /// settings, Consul URL options). Using it logs a warning.
    SecondsAlias,
}

fn invalid(input: &str, why: &str) -> Error {
    Error::config(format!(
        "invalid duration {input:?}: {why}; use a number with a unit, e.g. 500ms, 10s, 2m, 1h"
    ))
}

/// Parses a duration with a unit (see the [module docs](self)).
///
/// # Errors
/// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the input and the
/// accepted forms, for a missing or unknown unit, a malformed number, or a duration above
/// [`MAX`]. Never panics.
pub fn parse(input: &str) -> Result<Duration> {
    parse_with(input, Grammar::UnitRequired)
}

/// Parses how long to wait: the grammar of [`parse`] without its upper bound, for waits where
/// "longer than anyone will wait" means "without bound" (what
/// [`LockOptions::wait`](crate::LockOptions::wait) does with such a duration).
///
/// # Errors
/// As [`parse`], except that no duration is too long; a number too large to represent at all
/// is still an error.
pub fn parse_wait(input: &str) -> Result<Duration> {
    let s = input.trim();
    if s.is_empty() || s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse(input);
    }
    humantime::parse_duration(s).map_err(|e| invalid(input, &e.to_string()))
}

/// Parses a duration in the given grammar.
///
/// # Errors
/// As [`parse`]; with [`Grammar::SecondsAlias`] a bare finite, non-negative number is
/// accepted as seconds.
pub fn parse_with(input: &str, grammar: Grammar) -> Result<Duration> {
    let s = input.trim();
    if s.is_empty() {
        return Err(invalid(input, "it is empty"));
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match grammar {
            Grammar::UnitRequired => Err(invalid(input, "a unit is missing")),
            Grammar::SecondsAlias => {
                let secs: f64 = s
                    .parse()
                    .map_err(|_| invalid(input, "the number is malformed"))?;
                tracing::warn!(
                    duration = s,
                    "a duration without a unit is read as seconds; this spelling is deprecated, \
                     write {s}s"
                );
                from_secs(input, secs)
            }
        };
    }
    let d = humantime::parse_duration(s).map_err(|e| invalid(input, &e.to_string()))?;
    bounded(input, d)
}

/// A number of seconds (from a TOML number) as a duration: the deprecated
/// [`Grammar::SecondsAlias`] spelling.
///
/// # Errors
/// As [`parse`] for a negative, non-finite or too large number.
pub fn from_secs(what: &str, secs: f64) -> Result<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(invalid(what, "not a finite, non-negative number"));
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| invalid(what, "out of range"))?;
    bounded(what, d)
}

fn bounded(input: &str, d: Duration) -> Result<Duration> {
    if d > MAX {
        return Err(invalid(input, "longer than the maximum of 10 years"));
    }
    Ok(d)
}

/// Formats a duration the way [`parse`] reads it (`1500ms`, `10s`, `2m`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}us", d.as_micros())
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// What a TOML or JSON duration setting may hold before parsing.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Text(String),
    Number(f64),
}

fn de_with<'de, D: serde::Deserializer<'de>>(
    d: D,
    grammar: Grammar,
) -> std::result::Result<Duration, D::Error> {
    let parsed = match Raw::deserialize(d)? {
        Raw::Text(s) => parse_with(&s, grammar),
        Raw::Number(n) => match grammar {
            Grammar::SecondsAlias => {
                tracing::warn!(
                    seconds = n,
                    "a duration given as a number is read as seconds; this spelling is \
                     deprecated, write it as a string with a unit"
                );
                from_secs(&n.to_string(), n)
            }
            Grammar::UnitRequired => Err(invalid(
                &n.to_string(),
                "a bare number is ambiguous (seconds? milliseconds?)",
            )),
        },
    };
    parsed.map_err(|e| serde::de::Error::custom(e.message()))
}

/// `#[serde(deserialize_with = "…")]` for a duration setting that needs a unit.
///
/// # Errors
/// As [`parse`], as a deserializer error.
pub fn de_unit_required<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Duration, D::Error> {
    de_with(d, Grammar::UnitRequired)
}

/// `#[serde(deserialize_with = "…")]` for a duration setting that also takes the deprecated
/// bare number of seconds.
///
/// # Errors
/// As [`parse_with`], as a deserializer error.
pub fn de_seconds_alias<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Duration, D::Error> {
    de_with(d, Grammar::SecondsAlias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn one_grammar() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h 30m", Duration::from_secs(5400)),
            ("1.5s", Duration::from_millis(1500)),
            (" 0s ", Duration::ZERO),
            ("2d", Duration::from_secs(2 * 86_400)),
        ];
        for (s, d) in ok {
            assert_eq!(parse(s).unwrap(), d, "{s}");
        }
        for bad in [
            "",
            "10",
            "1.5",
            "s",
            "10x",
            "-1s",
            "1..2s",
            "1e300",
            "1e300s",
            "NaN",
            "inf",
            "99999999999999999999h",
            "18446744073709551615s",
            "11y",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
            assert!(e.message().contains("500ms"), "{e}");
        }
    }

    #[test]
    fn waits_have_no_upper_bound() {
        assert_eq!(
            parse_wait("3000000000000000h").unwrap(),
            Duration::from_secs(3_000_000_000_000_000 * 3600)
        );
        assert!(parse("3000000000000000h").is_err());
        for bad in ["", "10", "x", "99999999999999999999h"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds_alias_only_where_asked() {
        assert_eq!(
            parse_with("10", Grammar::SecondsAlias).unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse_with("2.5", Grammar::SecondsAlias).unwrap(),
            Duration::from_millis(2500)
        );
        for bad in ["1e300", "-5", "NaN", "inf", "99999999999999999999999"] {
            assert!(parse_with(bad, Grammar::SecondsAlias).is_err(), "{bad}");
        }
        assert!(from_secs("x", f64::NAN).is_err());
        assert!(from_secs("x", 1e300).is_err());
        assert!(from_secs("x", -1.0).is_err());
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(1500),
            Duration::from_secs(10),
            Duration::from_secs(120),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse(&format(d)).unwrap(), d, "{}", format(d));
        }
    }

    #[test]
    fn serde_helpers() {
        #[derive(Deserialize)]
        struct S {
            #[serde(deserialize_with = "de_unit_required")]
            a: Duration,
            #[serde(deserialize_with = "de_seconds_alias")]
            b: Duration,
        }
        let s: S = toml::from_str("a = \"3s\"\nb = 1.5\n").unwrap();
        assert_eq!(
            (s.a, s.b),
            (Duration::from_secs(3), Duration::from_millis(1500))
        );
        assert!(toml::from_str::<S>("a = 3\nb = 1\n").is_err());
        assert!(toml::from_str::<S>("a = \"3s\"\nb = 1e300\n").is_err());
        assert!(toml::from_str::<S>("a = \"3s\"\nb = nan\n").is_err());
    }
}
