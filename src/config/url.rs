//! The one URL type of every backend ([`BackendUrl`]), the one percent codec, and the one
//! [`redact`].
//!
//! Backend URLs are `scheme://[user[:password]@]host[:port][,host[:port]…][/path][?query]`.
//! The `url` crate cannot hold the comma-separated host lists of etcd and ZooKeeper, so this
//! type takes them apart itself; the percent codec is the `percent-encoding` crate's, query
//! strings are `application/x-www-form-urlencoded` as the `url` crate reads them.

use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::{Error, Result};

/// What [`percent_encode`] leaves as it is: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// [`UNRESERVED`] and `/`, for paths.
const PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// Query options whose values are secret: [`redact`] hides them. Matched without regard to
/// case, also as a suffix (`db_password`, `auth_token`).
pub const SECRET_OPTIONS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "sslpassword",
    "token",
    "secret",
    "auth",
    "digest",
    "apikey",
    "api_key",
];

/// Whether the query option `name` holds a secret.
pub fn is_secret_option(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_OPTIONS
        .iter()
        .any(|s| n == *s || (n.ends_with(s) && n[..n.len() - s.len()].ends_with(['_', '-'])))
}

/// Percent-encodes everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// [`percent_encode`] that keeps `/`: for a path.
pub fn percent_encode_path(s: &str) -> String {
    utf8_percent_encode(s, PATH).to_string()
}

/// Decodes `%XX` escapes (`+` stays `+`).
///
/// # Errors
/// `InvalidConfig` for a malformed escape or a result that is not UTF-8; the message names
/// `what`, never the input (it may be a password).
pub fn percent_decode(s: &str, what: &str) -> Result<String> {
    let b = s.as_bytes();
    let malformed = b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(Error::config(format!(
            "malformed percent-encoding in {what}"
        )));
    }
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| Error::config(format!("{what} is not UTF-8 once percent-decoded")))
}

/// Byte ranges of a URL's parts, found without validating anything (so [`redact`] works on
/// any input).
struct Spans {
    /// The end of `scheme://`, if there is one.
    authority_start: Option<usize>,
    /// The authority: from `authority_start` to the first `/`, `?` or `#`.
    authority_end: usize,
    /// The query, without its `?`, up to `#` or the end.
    query: Option<(usize, usize)>,
}

fn spans(s: &str) -> Spans {
    let authority_start = s.find("://").map(|i| i + 3);
    let from = authority_start.unwrap_or(0);
    let authority_end = if authority_start.is_some() {
        s[from..]
            .find(['/', '?', '#'])
            .map_or(s.len(), |i| from + i)
    } else {
        from
    };
    let query = s[authority_end..].find('?').map(|i| {
        let start = authority_end + i + 1;
        let end = s[start..].find('#').map_or(s.len(), |j| start + j);
        (start, end)
    });
    Spans {
        authority_start,
        authority_end,
        query,
    }
}

/// `url` with the password of its user information and the values of secret query options
/// ([`SECRET_OPTIONS`]) replaced by `***`; everything else is left byte for byte (so a URL
/// without secrets comes back unchanged). Works on any input, parseable or not, in every URL
/// form (one host or several, nested shard URLs in a query included: their secrets are in
/// percent-encoded form, which this also finds).
pub fn redact(url: &str) -> String {
    let mut sp = spans(url);
    let mut out = String::with_capacity(url.len());
    let mut pos = 0;
    if let Some(start) = sp.authority_start {
        // The user information ends at the last '@' of the authority. A password with an
        // unencoded '/', '?' or '#' ends the authority early; then the last '@' of the rest
        // counts, if the text before it looks like user:password (no '=' of a query option).
        let authority = &url[start..sp.authority_end];
        let at = authority.rfind('@').map(|i| start + i).or_else(|| {
            let i = start + url[start..].rfind('@')?;
            (!url[start..i].contains('=')).then_some(i)
        });
        if let Some(at) = at {
            if let Some(colon) = url[start..at].find(':') {
                out.push_str(&url[..start + colon + 1]);
                out.push_str("***");
                pos = at;
                if at >= sp.authority_end {
                    sp = Spans {
                        query: spans(&url[at..]).query.map(|(a, b)| (a + at, b + at)),
                        ..sp
                    };
                }
            }
        }
    }
    let Some((qs, qe)) = sp.query else {
        out.push_str(&url[pos..]);
        return out;
    };
    out.push_str(&url[pos..qs]);
    let mut first = true;
    for pair in url[qs..qe].split('&') {
        if !first {
            out.push('&');
        }
        first = false;
        match pair.split_once('=') {
            Some((k, v)) => {
                let name = percent_decode_str(k).decode_utf8_lossy();
                if is_secret_option(&name) {
                    out.push_str(k);
                    out.push_str("=***");
                } else {
                    // A nested URL (a shard's) is percent-encoded: redact it decoded and keep
                    // the original text when it holds no secret.
                    let decoded = percent_decode_str(&v.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned();
                    if decoded.contains("://") && redact(&decoded) != decoded {
                        out.push_str(k);
                        out.push('=');
                        out.push_str(&percent_encode(&redact(&decoded)));
                    } else {
                        out.push_str(pair);
                    }
                }
            }
            None => out.push_str(pair),
        }
    }
    out.push_str(&url[qe..]);
    out
}

/// A backend URL taken apart: `scheme://[user[:password]@]hosts[/path][?query]`, where
/// `hosts` may list several `host[:port]` separated by commas.
///
/// `Debug` and `Display` show it [`redact`]ed; [`to_url_string`](Self::to_url_string) gives it
/// back with its secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendUrl {
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    hosts: String,
    path: String,
    query: Vec<(String, String)>,
}

impl BackendUrl {
    /// Parses a backend URL. Surrounding whitespace is ignored; the scheme is lower-cased.
    ///
    /// # Errors
    /// `InvalidConfig` for no `scheme://`, a malformed scheme, whitespace or `#` inside
    /// (percent-encode a `#` in a password as `%23`), or malformed percent-encoding in the user
    /// information or path. The message shows the URL [`redact`]ed.
    pub fn parse(input: &str) -> Result<Self> {
        let s = input.trim();
        let bad =
            |why: &str| Error::config(format!("malformed backend URL {:?}: {why}", redact(s)));
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://…"))?;
        if scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(bad("the scheme is malformed"));
        }
        if rest.contains('#') {
            return Err(bad("it contains '#' (percent-encode it as %23)"));
        }
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace or control characters"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, q),
            None => (rest, ""),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        let (user, password, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (u, p) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                let user = percent_decode(u, "the URL's user name")?;
                let password = p
                    .map(|p| percent_decode(p, "the URL's password"))
                    .transpose()?;
                (Some(user).filter(|u| !u.is_empty()), password, hosts)
            }
            None => (None, None, authority),
        };
        let path = percent_decode(path, "the URL's path")?;
        let query = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Ok(BackendUrl {
            scheme: scheme.to_ascii_lowercase(),
            user,
            password,
            hosts: hosts.to_string(),
            path,
            query,
        })
    }

    /// The scheme, lower-cased (`etcd`, `zk`, `consul+https`, `sharded+ring`).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The decoded user name, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The decoded password, if any. Do not log it.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The host list as written (`h1:2379,h2:2379`), empty when there is none.
    pub fn host_list(&self) -> &str {
        &self.hosts
    }

    /// The hosts, split at commas and trimmed; empty items are kept (so a backend can reject
    /// `h:1,`). No hosts at all gives an empty list.
    pub fn hosts(&self) -> Vec<&str> {
        if self.hosts.is_empty() {
            return Vec::new();
        }
        self.hosts.split(',').map(str::trim).collect()
    }

    /// The decoded path (`""`, `"/"`, `"/app"`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The decoded query options, in order.
    pub fn query(&self) -> &[(String, String)] {
        &self.query
    }

    /// Sets the password (the user must be set).
    pub fn set_password(&mut self, password: impl Into<String>) {
        self.password = Some(password.into());
    }

    /// The URL with its secrets, encoded again. Do not log it.
    pub fn to_url_string(&self) -> String {
        let mut s = format!("{}://", self.scheme);
        if self.user.is_some() || self.password.is_some() {
            s.push_str(&percent_encode(self.user.as_deref().unwrap_or("")));
            if let Some(p) = &self.password {
                s.push(':');
                s.push_str(&percent_encode(p));
            }
            s.push('@');
        }
        s.push_str(&self.hosts);
        s.push_str(&percent_encode_path(&self.path));
        if !self.query.is_empty() {
            s.push('?');
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &self.query {
                q.append_pair(k, v);
            }
            s.push_str(&q.finish());
        }
        s
    }

    /// The first option in `names` (aliases of one setting) that is present.
    pub fn option(&self, names: &[&str]) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
    }

    /// Checks that every query option is one of `known`.
    ///
    /// # Errors
    /// `InvalidConfig` naming the first unknown option and the known ones.
    pub fn only_options(&self, backend: &str, known: &[&str]) -> Result<()> {
        match self
            .query
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(Error::config(format!(
                "unknown {backend} URL option {k:?}; known: {}",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.to_url_string()))
    }
}

impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendUrl({:?})", redact(&self.to_url_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_host_urls_parse() {
        let u = BackendUrl::parse(
            " etcd://app:p%40ss%3Aw%2Frd@10.0.0.1:2379,10.0.0.2:2379/?namespace=myapp/&timeout=3s ",
        )
        .unwrap();
        assert_eq!(u.scheme(), "etcd");
        assert_eq!(u.user(), Some("app"));
        assert_eq!(u.password(), Some("p@ss:w/rd"));
        assert_eq!(u.hosts(), ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(u.path(), "/");
        assert_eq!(u.option(&["timeout"]), Some("3s"));
        let again = BackendUrl::parse(&u.to_url_string()).unwrap();
        assert_eq!(again, u);
        for shown in [format!("{u}"), format!("{u:?}")] {
            assert!(
                !shown.contains("p%40ss") && !shown.contains("p@ss"),
                "{shown}"
            );
            assert!(shown.contains("***"), "{shown}");
        }
        assert!(BackendUrl::parse("zk://h").unwrap().hosts() == ["h"]);
        assert!(BackendUrl::parse("memory://").unwrap().hosts().is_empty());
    }

    #[test]
    fn malformed_urls_are_errors_without_secrets() {
        for bad in [
            "",
            "no scheme",
            "://h",
            "1x://h",
            "etcd://u:pa#ss@h:1",
            "etcd://u:pw@h:1 ?x",
            "etcd://u:%zz@h:1",
            "etcd://u:%ff@h:1",
            "etcd://h:1/%",
        ] {
            let e = BackendUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig, "{bad}");
            assert!(
                !e.message().contains("pa#ss") && !e.message().contains("%zz"),
                "{e}"
            );
        }
    }

    #[test]
    fn redact_hides_every_secret() {
        let cases = [
            ("etcd://u:secret@h:1", "etcd://u:***@h:1"),
            (
                "etcd://app:pw@h1:2379,h2:2379",
                "etcd://app:***@h1:2379,h2:2379",
            ),
            ("consul://h?token=T0K&dc=x", "consul://h?token=***&dc=x"),
            (
                "consul://h?dc=x&ACL_TOKEN=abc",
                "consul://h?dc=x&ACL_TOKEN=***",
            ),
            ("zk://u:p@a,b/app?x=1", "zk://u:***@a,b/app?x=1"),
            (
                "postgres://h/db?password=pw&sslmode=x",
                "postgres://h/db?password=***&sslmode=x",
            ),
            ("not a url ?token=abc", "not a url ?token=***"),
            ("u:pw@h", "u:pw@h"),
            ("memory://", "memory://"),
            ("memory://?b", "memory://?b"),
            ("etcd://h:1?namespace=a/", "etcd://h:1?namespace=a/"),
            ("etcd://user@h:1", "etcd://user@h:1"),
            // Unencoded delimiters in a password still do not let it through.
            ("etcd://u:pa#ss@h:1", "etcd://u:***@h:1"),
            ("etcd://u:pa/ss@h:1", "etcd://u:***@h:1"),
            (
                "etcd://u:p?ss@h:1?timeout=3s&password=x",
                "etcd://u:***@h:1?timeout=3s&password=***",
            ),
            (
                "consul://h:8500?user=a@b&token=x",
                "consul://h:8500?user=a@b&token=***",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
        let nested = format!(
            "sharded+ring://?shard={}&shard=memory%3A%2F%2F",
            percent_encode("etcd://u:hunter2@h:1,h2:2")
        );
        let r = redact(&nested);
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.ends_with("&shard=memory%3A%2F%2F"), "{r}");
        // Never panics, whatever the input.
        for s in [
            "://",
            "a://@",
            "a://:@?",
            "?&=&",
            "x://u:@",
            "%",
            "a://b?%zz=%zz",
            "é://é:é@é?é=é",
        ] {
            let _ = redact(s);
        }
    }

    #[test]
    fn secret_option_names() {
        for s in [
            "token",
            "Password",
            "acl_token",
            "db-password",
            "sslpassword_x",
        ] {
            let want = s != "sslpassword_x";
            assert_eq!(is_secret_option(s), want, "{s}");
        }
        assert!(!is_secret_option("key"));
        assert!(!is_secret_option("namespace"));
    }

    #[test]
    fn codec() {
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(percent_encode_path("a/b c"), "a/b%20c");
        assert_eq!(percent_decode("a%20b+c", "x").unwrap(), "a b+c");
        assert!(percent_decode("%2", "x").is_err());
    }
}
