//! Keeps the platform's way into the capsule open: the guest interface envd is reached through.
//!
//! User code runs as root and may take `eth0` down, flush its addresses or routes, or drop the
//! gateway's neighbour entry. Any of these cuts the host agent off from envd (exec, files, PTY
//! all ride TCP over that interface). The guard checks the interface once a second and puts back
//! exactly what the boot configured (link up, address, prefix and default routes, the gateway's
//! permanent neighbour entry); the host can also ask for a repair at once over the serial
//! lifeline (`lifeline.rs`). It never touches anything else (other interfaces, the user's
//! firewall rules, extra addresses or routes).
//!
//! The configuration comes from the kernel command line variables the initramfs used
//! (`WRENN_IP=a.b.c.d/len`, `WRENN_GW`, `WRENN_GWMAC`), which envd inherits as its environment.
//! Everything here is plain `ioctl`s on a datagram socket: no helper binary that user code could
//! remove, no netlink dependency in a static binary that must start fast.

use std::ffi::c_char;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use envd_proto::NetworkRepair;

const DEV: &str = "eth0";
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the boot configured on the guest's platform interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub gateway_mac: [u8; 6],
}

impl NetConfig {
    pub fn from_env() -> Option<Self> {
        Self::parse(
            &std::env::var("WRENN_IP").ok()?,
            &std::env::var("WRENN_GW").ok()?,
            &std::env::var("WRENN_GWMAC").ok()?,
        )
    }

    fn parse(ip: &str, gw: &str, mac: &str) -> Option<Self> {
        let (addr, prefix) = ip.split_once('/')?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let mut gateway_mac = [0u8; 6];
        let mut parts = mac.split(':');
        for b in gateway_mac.iter_mut() {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            ip: addr.parse().ok()?,
            prefix,
            gateway: gw.parse().ok()?,
            gateway_mac,
        })
    }

    fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.ip) & u32::from(self.netmask()))
    }
}

/// Serialises repairs: the watchdog and a lifeline request must not interleave their ioctls.
static REPAIR: Mutex<()> = Mutex::new(());

/// Starts the once-a-second check. Without a configuration (envd started by hand, a test) it
/// does nothing.
pub fn spawn_watchdog(cfg: Option<NetConfig>) {
    let Some(cfg) = cfg else { return };
    let spawned = std::thread::Builder::new()
        .name("netguard".into())
        .spawn(move || loop {
            std::thread::sleep(CHECK_INTERVAL);
            let report = repair(&cfg);
            if !report.repaired.is_empty() || !report.failed.is_empty() {
                eprintln!(
                    "envd: network guard: repaired {:?}, failed {:?}",
                    report.repaired, report.failed
                );
            }
        });
    if let Err(e) = spawned {
        eprintln!("envd: cannot start the network guard: {e}");
    }
}

/// Checks every piece of the platform interface's configuration and puts back what is missing.
pub fn repair(cfg: &NetConfig) -> NetworkRepair {
    let _serial = REPAIR.lock().unwrap_or_else(|p| p.into_inner());
    let mut report = NetworkRepair::default();
    let sock = match Socket::new() {
        Ok(s) => s,
        Err(e) => {
            report.failed.push(format!("socket: {e}"));
            return report;
        }
    };
    let mut step = |name: &str, result: std::io::Result<bool>| match result {
        Ok(true) => report.repaired.push(name.to_string()),
        Ok(false) => {}
        Err(e) => report.failed.push(format!("{name}: {e}")),
    };
    step("lo up", sock.ensure_up("lo"));
    step("address", sock.ensure_address(cfg));
    step("link up", sock.ensure_up(DEV));
    let routes = read_routes();
    step(
        "prefix route",
        sock.ensure_route(&routes, cfg.network(), cfg.netmask(), None),
    );
    step(
        "default route",
        sock.ensure_route(
            &routes,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Some(cfg.gateway),
        ),
    );
    step("gateway neighbour", sock.ensure_neighbour(cfg));
    report
}

/// An `AF_INET` datagram socket: the handle the interface ioctls need.
struct Socket(OwnedFd);

impl Socket {
    fn new() -> std::io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns and hands to `OwnedFd` once.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// One interface ioctl on a request this function owns; `request` is a `SIOC*IF*` number
    /// whose argument is a `struct ifreq`.
    fn ifreq(&self, request: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
        // SAFETY: every request passed here takes a pointer to a `struct ifreq`, which `req`
        // is, valid and exclusively borrowed for the duration of the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, req as *mut libc::ifreq) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn ensure_up(&self, dev: &str) -> std::io::Result<bool> {
        let mut req = ifreq(dev);
        self.ifreq(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(false);
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ifreq(libc::SIOCSIFFLAGS, &mut req)?;
        Ok(true)
    }

    fn ensure_address(&self, cfg: &NetConfig) -> std::io::Result<bool> {
        let mut req = ifreq(DEV);
        match self.ifreq(libc::SIOCGIFADDR, &mut req) {
            // SAFETY: SIOCGIFADDR filled `ifru_addr` with an AF_INET address.
            Ok(()) if ipv4_of(unsafe { &req.ifr_ifru.ifru_addr }) == Some(cfg.ip) => {
                return Ok(false)
            }
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            Err(e) => return Err(e),
        }
        let mut req = ifreq(DEV);
        req.ifr_ifru.ifru_addr = sockaddr(cfg.ip);
        self.ifreq(libc::SIOCSIFADDR, &mut req)?;
        let mut req = ifreq(DEV);
        req.ifr_ifru.ifru_netmask = sockaddr(cfg.netmask());
        self.ifreq(libc::SIOCSIFNETMASK, &mut req)?;
        Ok(true)
    }

    fn ensure_route(
        &self,
        routes: &[Route],
        dst: Ipv4Addr,
        mask: Ipv4Addr,
        gateway: Option<Ipv4Addr>,
    ) -> std::io::Result<bool> {
        let present = routes.iter().any(|r| {
            r.dev == DEV && r.dst == dst && r.mask == mask && gateway.is_none_or(|g| r.gateway == g)
        });
        if present {
            return Ok(false);
        }
        let mut dev: Vec<c_char> = DEV.bytes().map(|b| b as c_char).collect();
        dev.push(0);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(dst),
            rt_gateway: sockaddr(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            rt_genmask: sockaddr(mask),
            rt_flags: RTF_UP | if gateway.is_some() { RTF_GATEWAY } else { 0 },
            rt_pad2: 0,
            rt_pad3: 0,
            rt_tos: 0,
            rt_class: 0,
            rt_pad4: [0; 3],
            rt_metric: 0,
            rt_dev: dev.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT takes a pointer to a `struct rtentry`, which `RtEntry` mirrors
        // field for field; `rt_dev` points at a NUL-terminated buffer alive across the call.
        let rc =
            unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT, &mut rt as *mut RtEntry) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // Present after all (a route /proc listed in another form): nothing to repair.
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(true)
    }

    fn ensure_neighbour(&self, cfg: &NetConfig) -> std::io::Result<bool> {
        let mut req = arpreq(cfg);
        // SAFETY: SIOCGARP takes a pointer to a `struct arpreq`, valid for the call.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::SIOCGARP,
                &mut req as *mut libc::arpreq,
            )
        };
        if rc == 0 && req.arp_flags & libc::ATF_PERM != 0 {
            return Ok(false);
        }
        let mut req = arpreq(cfg);
        req.arp_flags = libc::ATF_PERM | libc::ATF_COM;
        // SAFETY: as above, for SIOCSARP.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::SIOCSARP,
                &mut req as *mut libc::arpreq,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }
}

const RTF_UP: u16 = 0x0001;
const RTF_GATEWAY: u16 = 0x0002;

/// glibc's `struct rtentry` for 64-bit Linux (the `libc` crate only has it for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn ifreq(dev: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (arrays and a union of integers/sockaddrs); all zeroes
    // is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, b) in req
        .ifr_name
        .iter_mut()
        .zip(dev.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = b as c_char;
    }
    req
}

fn arpreq(cfg: &NetConfig) -> libc::arpreq {
    // SAFETY: `arpreq` is plain old data; all zeroes is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    req.arp_pa = sockaddr(cfg.gateway);
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (dst, b) in req.arp_ha.sa_data.iter_mut().zip(cfg.gateway_mac) {
        *dst = b as c_char;
    }
    for (dst, b) in req.arp_dev.iter_mut().zip(DEV.bytes()) {
        *dst = b as c_char;
    }
    req
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16 bytes of plain old data; the kernel
    // reads the former through the latter by design.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ipv4_of(sa: &libc::sockaddr) -> Option<Ipv4Addr> {
    if i32::from(sa.sa_family) != libc::AF_INET {
        return None;
    }
    // SAFETY: an AF_INET `sockaddr` holds a `sockaddr_in`; both are 16 bytes of plain data.
    let sin = unsafe { std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(*sa) };
    Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

#[derive(Debug, PartialEq, Eq)]
struct Route {
    dev: String,
    dst: Ipv4Addr,
    gateway: Ipv4Addr,
    mask: Ipv4Addr,
}

fn read_routes() -> Vec<Route> {
    std::fs::read_to_string("/proc/net/route")
        .map(|s| parse_routes(&s))
        .unwrap_or_default()
}

/// Parses `/proc/net/route` (addresses are hex in host byte order).
fn parse_routes(text: &str) -> Vec<Route> {
    // The kernel prints the address's in-memory (network-order) word as a host-order number.
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Route {
                dev: f.first()?.to_string(),
                dst: hex(f.get(1)?)?,
                gateway: hex(f.get(2)?)?,
                mask: hex(f.get(7)?)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_boot_configuration() {
        let c = NetConfig::parse("10.200.0.2/24", "10.200.0.1", "02:fc:00:00:00:01").unwrap();
        assert_eq!(c.ip, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.network(), Ipv4Addr::new(10, 200, 0, 0));
        assert_eq!(c.gateway_mac, [2, 0xfc, 0, 0, 0, 1]);
        assert!(NetConfig::parse("10.200.0.2", "10.200.0.1", "02:fc:00:00:00:01").is_none());
        assert!(NetConfig::parse("10.200.0.2/33", "10.200.0.1", "02:fc:00:00:00:01").is_none());
        assert!(NetConfig::parse("10.200.0.2/24", "10.200.0.1", "02:fc:00:00:00").is_none());
    }

    #[test]
    fn parses_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0100C80A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0000C80A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let routes = parse_routes(text);
        assert_eq!(
            routes,
            vec![
                Route {
                    dev: "eth0".into(),
                    dst: Ipv4Addr::UNSPECIFIED,
                    gateway: Ipv4Addr::new(10, 200, 0, 1),
                    mask: Ipv4Addr::UNSPECIFIED,
                },
                Route {
                    dev: "eth0".into(),
                    dst: Ipv4Addr::new(10, 200, 0, 0),
                    gateway: Ipv4Addr::UNSPECIFIED,
                    mask: Ipv4Addr::new(255, 255, 255, 0),
                },
            ]
        );
    }
}
