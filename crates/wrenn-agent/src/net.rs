//! Network slots: one per capsule, each a network namespace holding the TAP device QEMU opens.
//!
//! ```text
//!   host ── wrv<T> (10.201.x.1/30) ══veth══ veth0 (10.201.x.2/30) ─┐ netns wrenn-s<T>
//!                                                   tap0 10.200.0.1/24 ── guest eth0 10.200.0.2
//! ```
//! Invariants:
//! - Inside every namespace the guest has the same address and MAC and sees the same gateway, so
//!   any snapshot can be restored into any slot.
//! - The slot's host-side address (`10.201.x.2`, the capsule's `host_ip`) DNATs every TCP/UDP port
//!   to the guest; envd is reached there.
//! - Guests reach the outside through two masquerades (namespace, then host) but never the host
//!   itself nor another slot (the host's `ip wrenn_<range>` table drops that traffic).
//! - Nothing enters a slot from another machine: the host forwards into `wrv*` only traffic of
//!   connections a guest opened (a neighbour routing the slot range via this host reaches no
//!   envd); the host itself (agent, port proxy) dials the slot locally.
//! - A guest speaks only as itself: the namespace's `netdev wrenn_guard` table drops, on the
//!   TAP's ingress, every frame not from the guest's MAC and every packet not IPv4 or ARP from
//!   the guest's address (no spoofed sources, no IPv6, no other protocols).
//! - `<T>` is derived from the slot's address, so every name is unique on the host; so is the
//!   uid the slot's VM runs as ([`Slot::vm_uid`]), which owns the TAP (QEMU attaches it without
//!   any capability).
//! - Deleting the namespace deletes the TAP and both veth ends: teardown is one command, and a
//!   namespace named `wrenn-s*` that no capsule owns is garbage to be collected.

use std::net::Ipv4Addr;

use crate::cmd;
use crate::error::Result;

pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const GUEST_MAC: &str = "02:77:72:00:00:02";
pub const GATEWAY_MAC: &str = "02:77:72:00:00:01";
const NETNS_PREFIX: &str = "wrenn-s";

/// A network slot's names and addresses (pure data; see [`create`] and [`destroy`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    pub index: u32,
    pub netns: String,
    pub host_veth: String,
    /// Address of the host end of the veth pair.
    pub host_side_ip: Ipv4Addr,
    /// Address of the namespace end: what the host dials to reach the guest.
    pub reach_ip: Ipv4Addr,
}

/// VM uids and gids are this plus the slot's tag: one per slot on the host, never a real
/// user's or group's.
pub const VM_ID_BASE: u32 = 0x4000_0000;

impl Slot {
    /// The uid (and gid) the VM in this slot runs as; its `tap0` belongs to it.
    pub fn vm_uid(&self) -> u32 {
        VM_ID_BASE + name_tag(u32::from(self.host_side_ip) - 1)
    }

    pub fn new(base: Ipv4Addr, index: u32) -> Self {
        let net = u32::from(base) + index * 4;
        // Names come from the slot's address, not its index, so agents with disjoint ranges on
        // one machine (a developer's `wrenn up` and a test run) never share a name.
        let tag = name_tag(net);
        Self {
            index,
            netns: format!("{NETNS_PREFIX}{tag}"),
            host_veth: format!("wrv{tag}"),
            host_side_ip: Ipv4Addr::from(net + 1),
            reach_ip: Ipv4Addr::from(net + 2),
        }
    }
}

/// Installs the host-wide rules once per agent start (idempotent).
pub async fn prepare_host(base: Ipv4Addr, max_slots: u32) -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    let prefix = 32 - (max_slots * 4).next_power_of_two().trailing_zeros();
    let range = format!("{base}/{prefix}");
    let table = format!("wrenn_{}", base.to_string().replace('.', "_"));
    let rules = format!(
        r#"table ip {table}
delete table ip {table}
table ip {table} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "wrv*" ct state established,related accept
    iifname "wrv*" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "wrv*" oifname "wrv*" drop
    iifname "wrv*" ip daddr {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10, 127.0.0.0/8 }} drop
    oifname "wrv*" ct state established,related accept
    oifname "wrv*" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {range} oifname != "wrv*" masquerade
  }}
}}
"#
    );
    cmd::run_with_input("nft", &["-f", "-"], Some(&rules)).await?;
    Ok(())
}

/// Creates the slot's namespace, veth pair, TAP device and NAT rules. On failure everything
/// created so far is removed again.
pub async fn create(slot: &Slot) -> Result<()> {
    let r = build(slot).await;
    if r.is_err() {
        destroy(slot).await;
    }
    r
}

async fn build(slot: &Slot) -> Result<()> {
    let ns = slot.netns.as_str();
    // A leftover from a crash would make `netns add` fail; the slot is ours to reuse.
    destroy(slot).await;
    cmd::run("ip", &["netns", "add", ns]).await?;
    let peer = format!("wrp{}", name_tag(u32::from(slot.host_side_ip) - 1));
    cmd::run(
        "ip",
        &[
            "link",
            "add",
            &slot.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            ns,
        ],
    )
    .await?;
    let host_cidr = format!("{}/30", slot.host_side_ip);
    cmd::run("ip", &["addr", "add", &host_cidr, "dev", &slot.host_veth]).await?;
    cmd::run("ip", &["link", "set", &slot.host_veth, "up"]).await?;
    let batch = format!(
        "link set lo up\n\
         link set {peer} name veth0\n\
         addr add {reach}/30 dev veth0\n\
         link set veth0 up\n\
         route add default via {host}\n\
         tuntap add tap0 mode tap user {uid} group {uid}\n\
         link set tap0 address {gwmac}\n\
         addr add {gw}/24 dev tap0\n\
         link set tap0 up\n",
        reach = slot.reach_ip,
        host = slot.host_side_ip,
        gwmac = GATEWAY_MAC,
        gw = GATEWAY_IP,
        uid = slot.vm_uid(),
    );
    cmd::run_with_input("ip", &["-n", ns, "-batch", "-"], Some(&batch)).await?;
    let rules = format!(
        r#"table ip wrenn {{
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname "veth0" ip daddr {reach} meta l4proto {{ tcp, udp }} dnat to {guest}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr {reach} meta l4proto {{ tcp, udp }} dnat to {guest}
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "veth0" ip saddr 10.200.0.0/24 masquerade
  }}
}}
table netdev wrenn_guard {{
  chain guest {{
    type filter hook ingress device "tap0" priority -500; policy drop;
    ether saddr != {mac} drop
    ether type arp arp saddr ip {guest} accept
    ether type ip ip saddr {guest} accept
  }}
}}
"#,
        reach = slot.reach_ip,
        guest = GUEST_IP,
        mac = GUEST_MAC,
    );
    let script = "echo 1 > /proc/sys/net/ipv4/ip_forward && nft -f -";
    cmd::run_with_input(
        "ip",
        &["netns", "exec", ns, "sh", "-c", script],
        Some(&rules),
    )
    .await?;
    Ok(())
}

/// Removes the slot (namespace, TAP, veth pair, rules). Never fails: a missing piece is fine.
pub async fn destroy(slot: &Slot) {
    let _ = cmd::run("ip", &["netns", "del", &slot.netns]).await;
    // The host end disappears with its peer; delete it explicitly in case the peer never moved.
    if std::path::Path::new("/sys/class/net")
        .join(&slot.host_veth)
        .exists()
    {
        let _ = cmd::run("ip", &["link", "del", &slot.host_veth]).await;
    }
}

/// The /30's number within a /10: unique for every slot address, short enough for a link name.
fn name_tag(net: u32) -> u32 {
    (net >> 2) & 0xF_FFFF
}

/// Indices (in this agent's range) of every slot namespace present on the host.
pub fn existing_slots(base: Ipv4Addr, max_slots: u32) -> Vec<u32> {
    let first = name_tag(u32::from(base));
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix(NETNS_PREFIX)?
                        .parse::<u32>()
                        .ok()
                })
                .filter_map(|tag| tag.checked_sub(first).filter(|i| *i < max_slots))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_addresses_do_not_overlap() {
        let base = Ipv4Addr::new(10, 201, 0, 0);
        let a = Slot::new(base, 0);
        let b = Slot::new(base, 1);
        assert_eq!(a.host_side_ip, Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(a.reach_ip, Ipv4Addr::new(10, 201, 0, 2));
        assert_eq!(b.host_side_ip, Ipv4Addr::new(10, 201, 0, 5));
        assert_eq!(Slot::new(base, 64).reach_ip, Ipv4Addr::new(10, 201, 1, 2));
        let other = Slot::new(Ipv4Addr::new(10, 201, 200, 0), 0);
        assert_ne!(a.netns, other.netns);
        assert_ne!(a.host_veth, other.host_veth);
        assert!(a.host_veth.len() <= 15 && Slot::new(base, 99999).host_veth.len() <= 15);
        assert_ne!(a.vm_uid(), b.vm_uid());
        assert_ne!(a.vm_uid(), other.vm_uid());
        assert!(a.vm_uid() >= VM_ID_BASE && Slot::new(base, 99999).vm_uid() < u32::MAX - 1);
    }
}
