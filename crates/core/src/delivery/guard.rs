//! The address guard (spec §11): which IP addresses a delivery may connect to.
//!
//! Webhook URLs come from producers, so a URL is untrusted input that could point the worker at
//! its own metadata service, the cluster network or loopback (SSRF). Every address the client is
//! about to dial — a literal IP in the URL or each address a hostname resolves to — passes
//! through [`AddressPolicy::check`]. The deny-list is explicit (IANA special-purpose registries)
//! because std's `is_global` family is still unstable; `HOOKFLEET_ALLOWED_CIDRS` punches holes in
//! it for development and tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const RFC_1918: &str = "private, RFC 1918";

/// IPv4 special-purpose ranges, most specific first where they overlap (the first match names
/// the range). Sub-blocks IANA marks globally reachable (192.0.0.9/32, 192.0.0.10/32) are
/// refused with their /24 anyway: nobody delivers webhooks to them.
const DENIED_V4: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "this network, 0.0.0.0/8"),
    (v4(10, 0, 0, 0, 8), RFC_1918),
    (v4(100, 64, 0, 0, 10), "shared address space, CGNAT 100.64.0.0/10"),
    (v4(127, 0, 0, 0, 8), "loopback, 127.0.0.0/8"),
    (v4(169, 254, 0, 0, 16), "link-local, 169.254.0.0/16 incl. cloud metadata"),
    (v4(172, 16, 0, 0, 12), RFC_1918),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments, 192.0.0.0/24"),
    (v4(192, 0, 2, 0, 24), "documentation, TEST-NET-1 192.0.2.0/24"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast, 192.88.99.0/24"),
    (v4(192, 168, 0, 0, 16), RFC_1918),
    (v4(198, 18, 0, 0, 15), "benchmarking, 198.18.0.0/15"),
    (v4(198, 51, 100, 0, 24), "documentation, TEST-NET-2 198.51.100.0/24"),
    (v4(203, 0, 113, 0, 24), "documentation, TEST-NET-3 203.0.113.0/24"),
    (v4(224, 0, 0, 0, 4), "multicast, 224.0.0.0/4"),
    (v4(255, 255, 255, 255, 32), "limited broadcast, 255.255.255.255"),
    (v4(240, 0, 0, 0, 4), "reserved, 240.0.0.0/4"),
];

/// The NAT64 well-known prefix: globally reachable when the IPv4 address it embeds is, so it is
/// judged by that address rather than refused outright.
const NAT64_WELL_KNOWN: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

/// IPv6 special-purpose ranges, most specific first. IPv4-mapped addresses (`::ffff:0:0/96`)
/// never reach this table: they are canonicalised to IPv4 first.
const DENIED_V6: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified, ::"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback, ::1"),
    // Deprecated IPv4-compatible addresses: no longer routed, but some stacks still translate them.
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "IPv4-compatible, deprecated ::/96"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "NAT64 local use, 64:ff9b:1::/48"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only, 100::/64"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments incl. Teredo, 2001::/23"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation, 2001:db8::/32"),
    // 6to4 embeds an IPv4 address that a relay would reach on our behalf; refuse the lot.
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4, 2002::/16"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation, 3fff::/20"),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), "segment routing SIDs, 5f00::/16"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local, ULA fc00::/7"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local, fe80::/10"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local, deprecated fec0::/10"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast, ff00::/8"),
];

/// IANA allocates IPv6 global unicast only from 2000::/3; anything else that is not named above
/// is unassigned, and unassigned space is not a place to deliver to.
const GLOBAL_UNICAST_V6: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(segments: [u16; 8], prefix: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), prefix)
}

/// Names the special-purpose range `ip` belongs to, or `None` for a public unicast address.
///
/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry, so `::ffff:127.0.0.1`
/// is loopback exactly like `127.0.0.1`.
pub fn denied_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => denied_v4(v4),
        IpAddr::V6(v6) => denied_v6(v6),
    }
}

fn denied_v4(ip: Ipv4Addr) -> Option<&'static str> {
    DENIED_V4.iter().find(|(net, _)| net.contains(&ip)).map(|(_, name)| *name)
}

fn denied_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if NAT64_WELL_KNOWN.contains(&ip) {
        let [.., a, b, c, d] = ip.octets();
        return denied_v4(Ipv4Addr::new(a, b, c, d));
    }
    if let Some((_, name)) = DENIED_V6.iter().find(|(net, _)| net.contains(&ip)) {
        return Some(name);
    }
    if GLOBAL_UNICAST_V6.contains(&ip) {
        None
    } else {
        Some("not IPv6 global unicast, outside 2000::/3")
    }
}

/// Which addresses deliveries may reach: every public address, plus the operator's exceptions.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    /// `allowed_cidrs` (`HOOKFLEET_ALLOWED_CIDRS`) are reachable even when they are special-purpose,
    /// e.g. `127.0.0.0/8` and `::1/128` for loopback receivers in development and tests.
    pub fn new(allowed_cidrs: Vec<IpNet>) -> Self {
        Self { allowed: allowed_cidrs }
    }

    /// Ok if ip is global, or inside an allowed CIDR; Err(BlockedAddress) naming the range otherwise.
    pub fn check(&self, ip: IpAddr) -> Result<(), BlockedAddress> {
        // Both spellings are tried so that `::ffff:127.0.0.1` is allowed by `127.0.0.0/8` and a
        // literal `::ffff:0:0/96` entry still means what the operator wrote.
        let canonical = ip.to_canonical();
        let allowed = self.allowed.iter().any(|net| net.contains(&ip) || net.contains(&canonical));
        if allowed {
            return Ok(());
        }
        match denied_range(ip) {
            None => Ok(()),
            Some(range) => Err(BlockedAddress { range }),
        }
    }
}

/// An address the policy refuses, known only by the range that refused it.
///
/// The address itself is deliberately not kept: refusals end up in error messages and
/// `delivery_attempts`, which the registrant reads, and naming what a hostname resolved to
/// (10.1.2.3, say) would let them map internal DNS one webhook at a time. A literal IP is
/// reported the same way so that there is one message, not two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address in a refused range ({range})")]
pub struct BlockedAddress {
    pub range: &'static str,
}

/// The refusals among one hostname's addresses: each range with how many addresses fell in it,
/// in the order first seen. What a registrant may learn is "2 addresses in RFC 1918", never
/// which ones (see [`BlockedAddress`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefusedRanges {
    counts: Vec<(&'static str, usize)>,
}

impl RefusedRanges {
    pub fn add(&mut self, blocked: BlockedAddress) {
        match self.counts.iter_mut().find(|(range, _)| *range == blocked.range) {
            Some((_, count)) => *count += 1,
            None => self.counts.push((blocked.range, 1)),
        }
    }

    /// Addresses refused, over all ranges.
    pub fn total(&self) -> usize {
        self.counts.iter().map(|(_, count)| count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

impl std::fmt::Display for RefusedRanges {
    /// `private, RFC 1918 (2 addresses); loopback, 127.0.0.0/8 (1 address)`: range names hold
    /// commas, so ranges are separated by semicolons.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, (range, count)) in self.counts.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            let noun = if *count == 1 { "address" } else { "addresses" };
            write!(f, "{range} ({count} {noun})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Pure classification only: nothing here opens a socket.

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address parses")
    }

    fn assert_denied(text: &str) {
        assert!(denied_range(ip(text)).is_some(), "{text} should be in a special-purpose range");
    }

    fn assert_global(text: &str) {
        assert_eq!(denied_range(ip(text)), None, "{text} should be global");
    }

    #[test]
    fn ipv4_special_purpose_ranges_are_denied_and_their_neighbours_are_not() {
        // (inside, inside, just outside...) for each range.
        let cases: &[(&[&str], &[&str])] = &[
            (&["0.0.0.0", "0.255.255.255"], &["1.0.0.0"]),
            (&["10.0.0.0", "10.0.0.1", "10.255.255.255"], &["9.255.255.255", "11.0.0.0"]),
            (&["100.64.0.0", "100.127.255.255"], &["100.63.255.255", "100.128.0.0"]),
            (&["127.0.0.1", "127.255.255.255"], &["126.255.255.255", "128.0.0.0"]),
            (&["169.254.0.1", "169.254.169.254"], &["169.253.255.255", "169.255.0.0"]),
            (&["172.16.0.0", "172.31.255.255"], &["172.15.255.255", "172.32.0.0"]),
            (&["192.0.0.0", "192.0.0.255"], &["191.255.255.255", "192.0.1.0"]),
            (&["192.0.2.0", "192.0.2.255"], &["192.0.3.0"]),
            (&["192.88.99.1"], &["192.88.98.255", "192.88.100.0"]),
            (&["192.168.0.1", "192.168.255.255"], &["192.167.255.255", "192.169.0.0"]),
            (&["198.18.0.0", "198.19.255.255"], &["198.17.255.255", "198.20.0.0"]),
            (&["198.51.100.7"], &["198.51.99.255", "198.51.101.0"]),
            (&["203.0.113.9"], &["203.0.112.255", "203.0.114.0"]),
            (&["224.0.0.1", "239.255.255.255"], &["223.255.255.255"]),
            (&["240.0.0.1", "255.255.255.254", "255.255.255.255"], &[]),
        ];
        for (inside, outside) in cases {
            inside.iter().for_each(|a| assert_denied(a));
            outside.iter().for_each(|a| assert_global(a));
        }
    }

    #[test]
    fn ipv4_ranges_are_named() {
        assert_eq!(denied_range(ip("10.0.0.1")), Some(RFC_1918));
        assert_eq!(denied_range(ip("172.20.1.1")), Some(RFC_1918));
        assert_eq!(denied_range(ip("192.168.1.1")), Some(RFC_1918));
        let name = |a: &str| denied_range(ip(a)).unwrap_or_default();
        assert!(name("127.0.0.1").contains("loopback"));
        assert!(name("169.254.169.254").contains("metadata"));
        assert!(name("100.100.100.100").contains("CGNAT"));
        assert!(name("198.18.0.1").contains("benchmarking"));
        assert!(name("255.255.255.255").contains("broadcast"));
        assert!(name("250.0.0.1").contains("reserved"));
        assert!(name("230.1.2.3").contains("multicast"));
    }

    #[test]
    fn ipv6_special_purpose_ranges_are_denied_and_their_neighbours_are_not() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["::"], &[]),
            (&["::1"], &[]),
            (&["::7f00:1", "::a00:1"], &[]),
            (&["64:ff9b:1::1", "64:ff9b:1:ffff::1"], &[]),
            (&["100::1", "100::ffff:ffff:ffff:ffff"], &[]),
            (&["2001::1", "2001:1ff:ffff::1"], &["2001:200::1"]),
            (&["2001:db8::1", "2001:db8:ffff::1"], &["2001:db9::1", "2001:db7::1"]),
            (&["2002::1", "2002:a00:1::1"], &["2003::1"]),
            (&["3fff::1", "3fff:fff:ffff::1"], &["3fff:1000::1", "3ffe:ffff::1"]),
            (&["5f00::1", "5f00:ffff::1"], &[]),
            (&["fc00::1", "fd12:3456::1"], &[]),
            (&["fe80::1", "febf:ffff::1"], &[]),
            (&["fec0::1", "feff:ffff::1"], &[]),
            (&["ff02::1", "ff0e::1"], &[]),
        ];
        for (inside, outside) in cases {
            inside.iter().for_each(|a| assert_denied(a));
            outside.iter().for_each(|a| assert_global(a));
        }
        // Neighbours of the ranges outside 2000::/3 are unassigned space, refused by name.
        let name = |a: &str| denied_range(ip(a)).unwrap_or_default();
        assert!(name("fbff::1").contains("global unicast"));
        assert!(name("5eff::1").contains("global unicast"));
        assert!(name("5f00::1").contains("segment routing"));
        assert!(name("4000::1").contains("global unicast"));
        assert!(name("fc00::1").contains("unique local"));
        assert!(name("fe80::1").contains("link-local"));
        assert!(name("ff02::1").contains("multicast"));
        assert!(name("::1").contains("loopback"));
        assert!(name("::").contains("unspecified"));
        assert!(name("100::1").contains("discard"));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
        assert!(denied_range(ip("::ffff:127.0.0.1")).unwrap_or_default().contains("loopback"));
        assert_eq!(denied_range(ip("::ffff:10.0.0.1")), Some(RFC_1918));
        assert!(denied_range(ip("::ffff:169.254.169.254")).unwrap_or_default().contains("metadata"));
        assert_global("::ffff:8.8.8.8");
    }

    #[test]
    fn nat64_well_known_prefix_is_judged_by_the_embedded_ipv4() {
        assert!(denied_range(ip("64:ff9b::127.0.0.1")).unwrap_or_default().contains("loopback"));
        assert_eq!(denied_range(ip("64:ff9b::10.0.0.1")), Some(RFC_1918));
        assert!(denied_range(ip("64:ff9b::169.254.169.254")).is_some());
        assert_global("64:ff9b::8.8.8.8");
    }

    #[test]
    fn global_addresses_are_not_denied() {
        for address in [
            "8.8.8.8",
            "1.1.1.1",
            "9.9.9.9",
            "93.184.216.34",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
        ] {
            assert_global(address);
        }
    }

    #[test]
    fn policy_refuses_special_ranges_by_default() {
        let policy = AddressPolicy::new(Vec::new());
        let err = policy.check(ip("10.0.0.1")).expect_err("private address refused");
        assert_eq!(err.to_string(), "address in a refused range (private, RFC 1918)");
        assert!(policy.check(ip("127.0.0.1")).is_err());
        assert!(policy.check(ip("::1")).is_err());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_err());
        assert!(policy.check(ip("169.254.169.254")).is_err());
        assert!(policy.check(ip("8.8.8.8")).is_ok());
        assert!(policy.check(ip("2606:4700::1111")).is_ok());
    }

    #[test]
    fn refused_ranges_count_per_range_and_never_name_an_address() {
        let policy = AddressPolicy::new(Vec::new());
        let mut refused = RefusedRanges::default();
        assert!(refused.is_empty());
        for address in ["10.1.2.3", "127.0.0.1", "192.168.7.7", "fd00::1", "10.9.9.9"] {
            refused.add(policy.check(ip(address)).expect_err("special-purpose address"));
        }
        assert_eq!(refused.total(), 5);
        let text = refused.to_string();
        assert_eq!(
            text,
            "private, RFC 1918 (3 addresses); loopback, 127.0.0.0/8 (1 address); unique local, ULA fc00::/7 (1 address)"
        );
        for address in ["10.1.2.3", "127.0.0.1", "192.168.7.7", "fd00::1", "10.9.9.9"] {
            assert!(!text.contains(address), "{text} names {address}");
        }
    }

    #[test]
    fn allowed_cidrs_override_the_deny_list_and_nothing_else() {
        let allowed = vec![
            "127.0.0.0/8".parse().expect("cidr"),
            "::1/128".parse().expect("cidr"),
            "10.1.0.0/16".parse().expect("cidr"),
        ];
        let policy = AddressPolicy::new(allowed);
        assert!(policy.check(ip("127.0.0.1")).is_ok());
        assert!(policy.check(ip("127.3.4.5")).is_ok());
        assert!(policy.check(ip("::1")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(policy.check(ip("10.1.2.3")).is_ok());
        assert!(policy.check(ip("10.2.0.1")).is_err());
        assert!(policy.check(ip("192.168.0.1")).is_err());
        assert!(policy.check(ip("169.254.169.254")).is_err());
        assert!(policy.check(ip("1.1.1.1")).is_ok());
    }
}
