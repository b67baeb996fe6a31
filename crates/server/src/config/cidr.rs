//! IP networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), for a
//! listener's `trusted_proxies`. A bare address is a network of one
//! (`/32` or `/128`). Host bits set below the prefix are refused
//! (`10.0.0.1/8` is almost always a typo for a host or for `10.0.0.0/8`).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`, what a dual-stack socket
//! reports for an IPv4 client) are matched as the IPv4 address they carry,
//! so `10.0.0.0/8` trusts them too.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The prefix length is not a number within the family's width.
    #[error("prefix length {0:?} is not 0..={1}")]
    Prefix(String, u8),
    /// Bits are set below the prefix.
    #[error("host bits set: did you mean {0}?")]
    HostBits(Cidr),
}

impl Cidr {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(ip).into(), self.prefix, 32) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(ip), self.prefix, 128) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `ip`, with an IPv4-mapped IPv6 address turned into its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `bits` (an address `width` bits wide) with everything below `prefix`
/// cleared.
fn mask(bits: u128, prefix: u8, width: u8) -> u128 {
    let host = u32::from(width - prefix.min(width));
    if host >= 128 {
        0
    } else {
        bits >> host << host
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(addr.to_owned()))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width && !p.starts_with('+') => n,
                _ => return Err(CidrError::Prefix(p.to_owned(), width)),
            },
        };
        let bits = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let masked = mask(bits, prefix, width);
        if masked != bits {
            let net = match addr {
                // Masked within 32 bits, so the conversion cannot fail.
                IpAddr::V4(_) => IpAddr::from(u32::try_from(masked).unwrap_or(0).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(masked.to_be_bytes()),
            };
            return Err(CidrError::HostBits(Cidr::unmapped(net, prefix)));
        }
        Ok(Cidr::unmapped(addr, prefix))
    }
}

impl Cidr {
    /// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4
    /// network it covers (`10.0.0.0/8`): `contains` matches mapped clients
    /// as IPv4, so the IPv6 form would match nothing (found by the `cidr`
    /// fuzz target).
    fn unmapped(addr: IpAddr, prefix: u8) -> Cidr {
        match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                None => Cidr { addr, prefix },
            },
            _ => Cidr { addr, prefix },
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_and_no_others() {
        for (net, inside, outside) in [
            ("10.0.0.0/8", "10.255.1.2", "11.0.0.0"),
            ("192.168.1.0/24", "192.168.1.255", "192.168.2.0"),
            ("127.0.0.1/32", "127.0.0.1", "127.0.0.2"),
            ("127.0.0.1", "127.0.0.1", "127.0.0.2"),
            ("0.0.0.0/0", "203.0.113.9", "::1"),
            ("2001:db8::/32", "2001:db8:ffff::1", "2001:db9::"),
            ("::1/128", "::1", "::2"),
            ("::1", "::1", "127.0.0.1"),
            ("::/0", "fe80::1", "10.0.0.1"),
        ] {
            let n = cidr(net);
            assert!(n.contains(ip(inside)), "{net} should contain {inside}");
            assert!(
                !n.contains(ip(outside)),
                "{net} should not contain {outside}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
    }

    #[test]
    fn bad_networks_are_refused_with_the_reason() {
        for (s, want) in [
            ("10.0.0.0/33", CidrError::Prefix("33".into(), 32)),
            ("::/129", CidrError::Prefix("129".into(), 128)),
            ("10.0.0.0/", CidrError::Prefix(String::new(), 32)),
            ("10.0.0.0/+8", CidrError::Prefix("+8".into(), 32)),
            ("10.0.0.0/x", CidrError::Prefix("x".into(), 32)),
            ("10.0.0/8", CidrError::Address("10.0.0".into())),
            ("example.com/8", CidrError::Address("example.com".into())),
            ("", CidrError::Address(String::new())),
            ("10.0.0.1/8", CidrError::HostBits(cidr("10.0.0.0/8"))),
            ("2001:db8::1/32", CidrError::HostBits(cidr("2001:db8::/32"))),
        ] {
            assert_eq!(s.parse::<Cidr>(), Err(want), "{s:?}");
        }
    }

    #[test]
    fn networks_print_as_written() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
    }

    #[test]
    fn fuzz_cidr_mapped_ipv6_network_matches_its_ipv4_clients() {
        let net = cidr("::ffff:10.0.0.0/104");
        assert_eq!(net, cidr("10.0.0.0/8"));
        assert!(net.contains(ip("10.1.2.3")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert_eq!(
            "::ffff:10.0.0.1/104".parse::<Cidr>(),
            Err(CidrError::HostBits(cidr("10.0.0.0/8")))
        );
        // Below /96 the network is wider than the mapped range: IPv6.
        assert!(!cidr("::/0").contains(ip("10.1.2.3")));
    }
}
