//! Where a git host points, decided the way resolvers decide it.
//!
//! A string comparison with `127.0.0.1` misses `2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`,
//! `127.0.0.1.` and `[::ffff:127.0.0.1]`: the C library's `inet_aton` (glibc and musl alike,
//! and curl's URL parser after them) reads an IPv4 address in one to four parts, each decimal,
//! octal (a leading `0`) or hexadecimal (`0x`), the last part filling the bytes that are left.
//! [`parse`] reads a host the same way, so [`check`] refuses every spelling of an address the
//! clone must not reach. Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) stay
//! allowed: a git server inside the cluster or the company network is a legitimate source.
//! What a *name* resolves to is checked where the clone runs (see `appbuild::jobs`), since
//! only that pod's resolver knows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A git host as the resolver reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lower-cased, without trailing dots.
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// The form credentials are bound to and the clone resolves: a lower-case name, or the
    /// address in its canonical spelling.
    pub fn canonical(&self) -> String {
        match self {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

/// Names that reach the node itself or a cloud's instance metadata whatever DNS says.
const FORBIDDEN_NAMES: &[&str] = &[
    "localhost",
    "localhost.localdomain",
    "ip6-localhost",
    "ip6-loopback",
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Single addresses of cloud metadata and platform services outside the link-local range.
const FORBIDDEN_V4: &[(Ipv4Addr, &str)] = &[
    (
        Ipv4Addr::new(100, 100, 100, 200),
        "Alibaba Cloud's instance metadata",
    ),
    (
        Ipv4Addr::new(168, 63, 129, 16),
        "Azure's platform (WireServer) address",
    ),
    (Ipv4Addr::BROADCAST, "the broadcast address"),
];
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Reads a URL's host (brackets around IPv6 allowed, no port) as a resolver would.
pub fn parse(host: &str) -> Result<Host, String> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("host {host:?} has an unclosed '['"))?;
        // A zone id (`%25eth0` in a URL) names an interface, not another address.
        let address = inner.split('%').next().unwrap_or_default();
        return address
            .parse::<Ipv6Addr>()
            .map(|v6| Host::Ip(IpAddr::V6(v6)))
            .map_err(|_| format!("host {host:?} is not an IPv6 address"));
    }
    if host.contains(':') {
        let address = host.split('%').next().unwrap_or_default();
        return address
            .parse::<Ipv6Addr>()
            .map(|v6| Host::Ip(IpAddr::V6(v6)))
            .map_err(|_| format!("host {host:?} is not a host name"));
    }
    // Resolvers treat `name.` and `name` alike (the dot only says "fully qualified").
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err("it has no host".into());
    }
    if let Some(v4) = inet_aton(&name) {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    // No percent-encoding (curl decodes it in host names), no other punctuation.
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !plain || name.starts_with(['-', '.']) || name.contains("..") {
        return Err(format!("host {host:?} is not a host name"));
    }
    Ok(Host::Name(name))
}

/// Why the clone must not connect to `host`, if it must not.
pub fn refusal(host: &Host) -> Option<String> {
    match host {
        Host::Name(name) => {
            let forbidden = FORBIDDEN_NAMES.contains(&name.as_str()) || name.ends_with(".localhost");
            forbidden.then(|| format!("{name} names this node or a cloud's instance metadata service"))
        }
        Host::Ip(IpAddr::V4(v4)) => v4_refusal(*v4),
        Host::Ip(IpAddr::V6(v6)) => v6_refusal(*v6),
    }
}

/// Parses and checks a URL's host: the host, or why it is refused.
pub fn check(host: &str) -> Result<Host, String> {
    let parsed = parse(host)?;
    match refusal(&parsed) {
        Some(why) => Err(why),
        None => Ok(parsed),
    }
}

fn v4_refusal(v4: Ipv4Addr) -> Option<String> {
    let why = if v4.is_loopback() {
        "a loopback address (this node)"
    } else if v4.octets()[0] == 0 {
        // 0.0.0.0 and the rest of 0/8 reach this node on Linux.
        "an unspecified address (this node)"
    } else if v4.is_link_local() {
        "a link-local address (cloud instance metadata lives at 169.254.169.254)"
    } else if let Some((_, what)) = FORBIDDEN_V4.iter().find(|(a, _)| *a == v4) {
        what
    } else {
        return None;
    };
    Some(format!("{v4} is {why}"))
}

fn v6_refusal(v6: Ipv6Addr) -> Option<String> {
    let segments = v6.segments();
    // IPv4 carried in IPv6: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d) and the NAT64
    // well-known prefix (64:ff9b::a.b.c.d) all end up at the IPv4 address.
    let embedded = v6.to_ipv4_mapped().or_else(|| {
        let [a, b, c, d, e, f, _, _] = segments;
        let compatible = [a, b, c, d, e, f] == [0; 6];
        let nat64 = [a, b, c, d, e, f] == [0x64, 0xff9b, 0, 0, 0, 0];
        (compatible || nat64).then(|| {
            let [.., g, h] = segments;
            Ipv4Addr::new((g >> 8) as u8, g as u8, (h >> 8) as u8, h as u8)
        })
    });
    let why = if v6.is_loopback() {
        "a loopback address (this node)"
    } else if v6.is_unspecified() {
        "an unspecified address (this node)"
    } else if segments[0] & 0xffc0 == 0xfe80 {
        "a link-local address"
    } else if v6 == AWS_METADATA_V6 {
        "AWS's IPv6 instance metadata address"
    } else if let Some(why) = embedded.and_then(v4_refusal) {
        return Some(format!("{v6} carries an IPv4 address: {why}"));
    } else {
        return None;
    };
    Some(format!("{v6} is {why}"))
}

/// `inet_aton`: one to four parts separated by dots, each decimal, octal (leading `0`) or
/// hexadecimal (`0x`); all but the last are one byte, the last fills the remaining bytes.
pub fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts = text.split('.').map(number).collect::<Option<Vec<u64>>>()?;
    let (last, leading) = parts.split_last()?;
    if leading.len() > 3 || leading.iter().any(|p| *p > 0xff) {
        return None;
    }
    let last_bits = 8 * (4 - leading.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let value = leading
        .iter()
        .fold(0u64, |acc, byte| (acc << 8) | byte)
        .checked_shl(last_bits)?
        | last;
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// One part of an `inet_aton` address, as `strtoul(.., 0)` reads it after a leading digit.
fn number(part: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Long runs of leading zeros are still small numbers; anything past 32 bits is no address.
    let significant = digits.trim_start_matches('0');
    if significant.len() > 11 {
        return None;
    }
    u64::from_str_radix(if significant.is_empty() { "0" } else { significant }, radix)
        .ok()
        .filter(|n| *n <= u64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_aton_reads_every_spelling() {
        let loopback = Some(Ipv4Addr::LOCALHOST);
        for spelling in [
            "127.0.0.1",
            "2130706433",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0X7F.0.0.01",
            "0x7f.1",
            "127.1",
            "127.0.1",
            "0x7f000001",
            "017700000001",
            "0000000177.0.0.1",
        ] {
            assert_eq!(inet_aton(spelling), loopback, "{spelling}");
        }
        assert_eq!(inet_aton("0"), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            inet_aton("169.254.43518"),
            Some(Ipv4Addr::new(169, 254, 169, 254))
        );
        assert_eq!(
            inet_aton("0127.0.0.1"),
            Some(Ipv4Addr::new(87, 0, 0, 1)),
            "octal 127 is 87"
        );
        for not_an_address in [
            "",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.2.65536",
            "08.1.1.1",
            "0x",
            "0x.1",
            "1..2",
            "1.2.3.",
            "4294967296",
            "github.com",
            "1e3",
            "-1",
            "+1",
        ] {
            assert_eq!(inet_aton(not_an_address), None, "{not_an_address}");
        }
        assert_eq!(inet_aton("4294967295"), Some(Ipv4Addr::BROADCAST));
    }

    #[test]
    fn forbidden_hosts_in_every_spelling_are_refused() {
        for host in [
            "127.0.0.1",
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "127.1",
            "127.0.0.1.",
            "127.0.0.1..",
            "0",
            "0.0.0.0",
            "0x0",
            "169.254.169.254",
            "0xa9.0xfe.0xa9.0xfe",
            "2852039166",
            "100.100.100.200",
            "localhost",
            "LOCALHOST",
            "localhost.",
            "app.localhost",
            "ip6-localhost",
            "metadata",
            "metadata.google.internal",
            "Metadata.Google.Internal.",
            "metadata.goog",
            "instance-data",
            "instance-data.ec2.internal",
            "[::1]",
            "[0:0:0:0:0:0:0:1]",
            "[::]",
            "[::ffff:127.0.0.1]",
            "[::FFFF:7F00:1]",
            "[::ffff:169.254.169.254]",
            "[::127.0.0.1]",
            "[64:ff9b::a9fe:a9fe]",
            "[fe80::1]",
            "[fe80::1%25eth0]",
            "[febf::1]",
            "[fd00:ec2::254]",
            "::1",
        ] {
            assert!(check(host).is_err(), "{host} passed");
        }
    }

    #[test]
    fn ordinary_and_private_hosts_pass() {
        for (host, canonical) in [
            ("github.com", "github.com"),
            ("GitLab.Example.COM.", "gitlab.example.com"),
            ("git_server.internal", "git_server.internal"),
            ("metadata.example.com", "metadata.example.com"),
            ("localhost.example.com", "localhost.example.com"),
            ("10.0.0.5", "10.0.0.5"),
            ("012.0.0.5", "10.0.0.5"),
            ("192.168.1.10", "192.168.1.10"),
            ("172.16.0.1", "172.16.0.1"),
            ("100.64.0.1", "100.64.0.1"),
            ("140.82.112.3", "140.82.112.3"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[fd12:3456::1]", "fd12:3456::1"),
            ("[fec0::1]", "fec0::1"),
            ("999.1", "999.1"),
        ] {
            assert_eq!(
                check(host).map(|h| h.canonical()),
                Ok(canonical.to_string()),
                "{host}"
            );
        }
        for garbage in [
            "git%68ub.com",
            "-oProxy",
            ".github.com",
            "a..b",
            "[::1",
            "[nope]",
            "a:b",
        ] {
            assert!(check(garbage).is_err(), "{garbage}");
        }
    }
}
