//! A capsule's egress policy (a Wrenn extension of the spec): which destinations its guest may
//! open connections to.
//!
//! Evaluated for every packet the guest sends that is not an answer to a connection made *to*
//! it (the platform's own traffic to envd and the port proxy is never affected):
//! 1. a destination in `allow_out` passes;
//! 2. one in `deny_out` is refused (TCP reset, ICMP administratively prohibited for the rest);
//! 3. with `internet` false everything else is refused too, except DNS to the guest's
//!    resolvers when `allow_out` names a domain (so the name can be looked up at all);
//! 4. everything else passes.
//!
//! Whatever the policy, the platform never lets a guest reach its host, another capsule,
//! private ranges (RFC 1918, CGNAT, loopback) or link-local addresses (cloud metadata), and
//! never routes IPv6 to it. Entries are IPv4 addresses, CIDR blocks or domain names; a domain
//! opens (or closes) the IPv4 addresses its host resolves it to, looked up when the policy is
//! applied and again every minute.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// At most this many entries in each of `allow_out` and `deny_out`.
pub const MAX_EGRESS_RULES: usize = 64;

/// `network` in a create request, and `GET`/`PUT /v1/capsules/{id}/network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Whether destinations outside `allow_out` may be reached (default true).
    #[serde(default = "yes")]
    pub internet: bool,
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        Self {
            internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

/// One entry of a policy, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// An address block (a single address is a /32).
    Net(Ipv4Addr, u8),
    /// A host name, lower-case, without a trailing dot.
    Domain(&'a str),
}

impl NetworkPolicy {
    /// The same policy with every entry checked and normalised (lower-case names, CIDR blocks
    /// with their host bits cleared, sorted, without duplicates).
    pub fn validate(&self) -> Result<NetworkPolicy, String> {
        Ok(NetworkPolicy {
            internet: self.internet,
            allow_out: normalise("allow_out", &self.allow_out)?,
            deny_out: normalise("deny_out", &self.deny_out)?,
        })
    }

    /// Whether any entry is a domain name (which then needs resolving).
    pub fn names_domains(&self) -> bool {
        self.allow_out
            .iter()
            .chain(&self.deny_out)
            .any(|e| matches!(parse(e), Ok(Destination::Domain(_))))
    }
}

fn normalise(field: &str, entries: &[String]) -> Result<Vec<String>, String> {
    if entries.len() > MAX_EGRESS_RULES {
        return Err(format!(
            "{field}: at most {MAX_EGRESS_RULES} entries, got {}",
            entries.len()
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let lower = e.trim().trim_end_matches('.').to_ascii_lowercase();
        let canonical = match parse(&lower).map_err(|why| format!("{field}: {e:?} {why}"))? {
            Destination::Net(addr, len) => format!("{addr}/{len}"),
            Destination::Domain(d) => d.to_string(),
        };
        out.push(canonical);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Parses one normalised entry: `a.b.c.d`, `a.b.c.d/len` or a host name.
pub fn parse(entry: &str) -> Result<Destination<'_>, &'static str> {
    if entry.is_empty() {
        return Err("is empty");
    }
    if entry.contains(':') {
        return Err("is not an IPv4 address, CIDR block or domain (IPv6 never reaches capsules)");
    }
    if let Some((addr, len)) = entry.split_once('/') {
        let addr: Ipv4Addr = addr.parse().map_err(|_| "is not a CIDR block")?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or("has a prefix length outside 0-32")?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        return Ok(Destination::Net(
            Ipv4Addr::from(u32::from(addr) & mask),
            len,
        ));
    }
    if let Ok(addr) = entry.parse::<Ipv4Addr>() {
        return Ok(Destination::Net(addr, 32));
    }
    if entry.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err("is not an IPv4 address");
    }
    if entry.starts_with("*.") {
        return Err("is a wildcard: name each host (domains open the addresses they resolve to)");
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if entry.len() > 253 || !entry.split('.').all(valid_label) {
        return Err("is not an IPv4 address, CIDR block or domain name");
    }
    Ok(Destination::Domain(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            internet: true,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn normalises_entries() {
        let p = policy(
            &[
                "PyPI.org.",
                "10.1.2.3/8",
                "1.2.3.4",
                "1.2.3.4/32",
                " example.com ",
            ],
            &["0.0.0.0/0"],
        )
        .validate()
        .unwrap();
        assert_eq!(
            p.allow_out,
            ["1.2.3.4/32", "10.0.0.0/8", "example.com", "pypi.org"]
        );
        assert_eq!(p.deny_out, ["0.0.0.0/0"]);
        assert!(p.names_domains());
        assert!(!policy(&["1.2.3.4"], &[])
            .validate()
            .unwrap()
            .names_domains());
    }

    #[test]
    fn refuses_what_cannot_be_enforced() {
        for bad in [
            "::1",
            "2001:db8::/32",
            "1.2.3.4/33",
            "1.2.3/24",
            "300.1.1.1",
            "*.example.com",
            "exa mple.com",
            "-bad.com",
            "",
            "a..b",
        ] {
            let err = policy(&[bad], &[]).validate().unwrap_err();
            assert!(err.starts_with("allow_out: "), "{bad}: {err}");
        }
        let many: Vec<String> = (0..=MAX_EGRESS_RULES)
            .map(|i| format!("10.0.0.{i}"))
            .collect();
        let p = NetworkPolicy {
            deny_out: many,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("at most"));
    }

    #[test]
    fn defaults_to_open() {
        let p: NetworkPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, NetworkPolicy::default());
        assert!(p.internet);
        assert!(serde_json::from_str::<NetworkPolicy>(r#"{"allow":[]}"#).is_err());
    }
}
