//! A capsule's egress policy (`wrenn_api::network` states the rule), enforced in its slot.
//!
//! The slot's namespace gets a table `ip wrenn_egress` whose `forward` chain sees every packet
//! the guest sends out of `tap0`:
//! - answers on connections made *to* the guest (`ct direction reply`: envd, the port proxy)
//!   always pass, so the platform keeps its way in whatever the policy;
//! - then `allow_out` (accept), `deny_out` (refuse), and with `internet` false DNS to the
//!   guest's resolvers (only when a domain is named) and a refusal of everything else.
//!
//! Refusals answer (TCP reset, ICMP administratively prohibited) so a client fails at once
//! instead of waiting for its timeout. Packets are matched one by one, not per connection, so
//! a new policy also stops connections opened under the old one.
//!
//! Domains are resolved here, by the host's resolver, when the policy is applied and every
//! [`REFRESH`] after; their IPv4 addresses go into the sets. The platform's own limits (no
//! host, no other slot, no private or link-local ranges) are the host table's (`crate::net`)
//! and apply after this one, whatever it allows. The default policy installs no table at all.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use tracing::warn;
use wrenn_api::network::{parse, Destination};
use wrenn_api::NetworkPolicy;

use crate::cmd;
use crate::error::Result;
use crate::net::Slot;

/// How often the domains of running capsules' policies are resolved again.
pub const REFRESH: Duration = Duration::from_secs(60);
/// How long one name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses kept per name (a name with more opens only these).
const MAX_ADDRESSES_PER_NAME: usize = 32;
/// Where guests send their DNS queries (their `/etc/resolv.conf`, written by `crate::images`
/// and `crate::oci`).
pub const GUEST_RESOLVERS: [Ipv4Addr; 2] = [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)];

/// A policy with its domains resolved: what the firewall holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    pub internet: bool,
    pub allow: BTreeSet<(Ipv4Addr, u8)>,
    pub deny: BTreeSet<(Ipv4Addr, u8)>,
    /// DNS to the guest's resolvers passes even when the internet is closed.
    pub dns: bool,
}

/// Resolves the policy's domains (a name that does not resolve now opens or closes nothing
/// until it does; the failure is logged).
pub async fn resolve(policy: &NetworkPolicy, capsule_id: &str) -> Resolved {
    let mut r = Resolved {
        internet: policy.internet,
        dns: !policy.internet && policy.names_domains(),
        ..Default::default()
    };
    for (entries, set) in [
        (&policy.allow_out, &mut r.allow),
        (&policy.deny_out, &mut r.deny),
    ] {
        let mut names = Vec::new();
        for e in entries {
            match parse(e) {
                Ok(Destination::Net(addr, len)) => {
                    set.insert((addr, len));
                }
                Ok(Destination::Domain(d)) => names.push(d.to_string()),
                Err(why) => warn!(capsule_id, entry = %e, why, "ignoring an egress entry"),
            }
        }
        let lookups = names.iter().map(|name| async move {
            let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0))).await;
            match found {
                Ok(Ok(addrs)) => addrs
                    .filter_map(|a| match a.ip() {
                        std::net::IpAddr::V4(v4) => Some(v4),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .take(MAX_ADDRESSES_PER_NAME)
                    .collect::<Vec<_>>(),
                Ok(Err(e)) => {
                    warn!(capsule_id, name = %name, error = %e, "an egress domain does not resolve");
                    Vec::new()
                }
                Err(_) => {
                    warn!(capsule_id, name = %name, "an egress domain did not resolve in time");
                    Vec::new()
                }
            }
        });
        for addrs in futures_util::future::join_all(lookups).await {
            set.extend(addrs.into_iter().map(|a| (a, 32)));
        }
    }
    r
}

/// Whether this policy needs a table at all (the default one does not).
pub fn is_open(r: &Resolved) -> bool {
    r.internet && r.allow.is_empty() && r.deny.is_empty()
}

/// The nft script that replaces the slot's egress table with `r` (or removes it).
pub fn rules(r: &Resolved) -> String {
    let mut s = String::from("table ip wrenn_egress\ndelete table ip wrenn_egress\n");
    if is_open(r) {
        return s;
    }
    let set = |name: &str, nets: &BTreeSet<(Ipv4Addr, u8)>| {
        let mut out = format!("  set {name} {{\n    type ipv4_addr; flags interval; auto-merge;\n");
        if !nets.is_empty() {
            let list: Vec<String> = nets.iter().map(|(a, l)| format!("{a}/{l}")).collect();
            out.push_str(&format!("    elements = {{ {} }}\n", list.join(", ")));
        }
        out.push_str("  }\n");
        out
    };
    s.push_str("table ip wrenn_egress {\n");
    s.push_str(&set("allow", &r.allow));
    s.push_str(&set("deny", &r.deny));
    s.push_str(
        "  chain refuse {\n    meta l4proto tcp reject with tcp reset\n    reject with icmp type admin-prohibited\n  }\n",
    );
    s.push_str("  chain forward {\n    type filter hook forward priority 0; policy accept;\n");
    s.push_str("    iifname != \"tap0\" accept\n    ct direction reply accept\n");
    s.push_str("    ip daddr @allow accept\n    ip daddr @deny jump refuse\n");
    if !r.internet {
        if r.dns {
            let resolvers: Vec<String> = GUEST_RESOLVERS.iter().map(|a| a.to_string()).collect();
            s.push_str(&format!(
                "    ip daddr {{ {} }} meta l4proto {{ tcp, udp }} th dport 53 accept\n",
                resolvers.join(", ")
            ));
        }
        s.push_str("    jump refuse\n");
    }
    s.push_str("  }\n}\n");
    s
}

/// Installs `r` in the slot's namespace (one nft transaction: the old table goes and the new
/// one comes at once).
pub async fn apply(slot: &Slot, r: &Resolved) -> Result<()> {
    cmd::run_with_input(
        "ip",
        &["netns", "exec", &slot.netns, "nft", "-f", "-"],
        Some(&rules(r)),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(internet: bool, allow: &[(u8, u8)], deny: &[(u8, u8)], dns: bool) -> Resolved {
        let nets = |v: &[(u8, u8)]| {
            v.iter()
                .map(|(a, l)| (Ipv4Addr::new(*a, 0, 0, 0), *l))
                .collect()
        };
        Resolved {
            internet,
            allow: nets(allow),
            deny: nets(deny),
            dns,
        }
    }

    #[test]
    fn open_policy_removes_the_table() {
        let s = rules(&resolved(true, &[], &[], false));
        assert_eq!(s, "table ip wrenn_egress\ndelete table ip wrenn_egress\n");
    }

    #[test]
    fn closed_internet_refuses_the_rest_after_the_allowed() {
        let s = rules(&resolved(false, &[(1, 8)], &[], true));
        let allow = s.find("ip daddr @allow accept").unwrap();
        let dns = s.find("th dport 53 accept").unwrap();
        let last = s.rfind("jump refuse").unwrap();
        assert!(s.find("ct direction reply accept").unwrap() < allow);
        assert!(allow < dns && dns < last);
        assert!(s.contains("elements = { 1.0.0.0/8 }"));
        assert!(s.contains("1.1.1.1, 8.8.8.8"));
        // Without a domain there is nothing to resolve: no DNS either.
        assert!(!rules(&resolved(false, &[(1, 8)], &[], false)).contains("dport 53"));
    }

    #[test]
    fn deny_list_alone_keeps_the_internet() {
        let s = rules(&resolved(true, &[], &[(9, 8)], false));
        assert!(s.contains("ip daddr @deny jump refuse"));
        assert_eq!(s.matches("jump refuse").count(), 1);
        assert!(s.contains("set allow {\n    type ipv4_addr; flags interval; auto-merge;\n  }"));
    }

    #[tokio::test]
    async fn resolves_names_and_keeps_blocks() {
        let policy = NetworkPolicy {
            internet: false,
            allow_out: vec!["localhost".into(), "203.0.113.0/24".into()],
            deny_out: vec!["no-such-name.invalid".into()],
        };
        let r = resolve(&policy, "test").await;
        assert!(r.allow.contains(&(Ipv4Addr::LOCALHOST, 32)));
        assert!(r.allow.contains(&(Ipv4Addr::new(203, 0, 113, 0), 24)));
        assert!(r.deny.is_empty());
        assert!(r.dns);
    }
}
