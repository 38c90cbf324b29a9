//! Name resolution for deliveries: a host name on the allowlist must resolve to public
//! addresses only. Otherwise a name the operator allowed (or any name under an allowed
//! `*.domain`, whose DNS a user may control) could point the server at loopback, a private
//! network or a cloud metadata service (169.254.169.254). Checked at each connection, on the
//! very addresses the connection uses, so a name that changes its answer between two lookups
//! (DNS rebinding) gains nothing.
//!
//! Addresses written in the allowlist itself (`10.0.0.5`, `[::1]`) are the operator's explicit
//! choice and are never resolved; `[webhooks] allow_private_addresses = true` lifts the rule for
//! names too (a receiver on the same private network).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A name that resolved to no public address: the delivery is refused, not retried.
#[derive(Debug)]
pub struct NotPublic {
    pub host: String,
    pub addresses: Vec<IpAddr>,
}

impl std::fmt::Display for NotPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
        write!(
            f,
            "callback host {:?} resolves only to non-public addresses ({}); list the address \
             itself in [webhooks] allowed_hosts, or set allow_private_addresses = true",
            self.host,
            list.join(", ")
        )
    }
}

impl std::error::Error for NotPublic {}

/// The deliveries' resolver: the system's, keeping public addresses only unless allowed.
pub struct PublicOnly {
    pub allow_private: bool,
}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = keep_allowed(found.clone(), allow_private);
            if kept.is_empty() && !found.is_empty() {
                return Err(Box::new(NotPublic {
                    host,
                    addresses: found.iter().map(SocketAddr::ip).collect(),
                }) as _);
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

fn keep_allowed(found: Vec<SocketAddr>, allow_private: bool) -> Vec<SocketAddr> {
    found
        .into_iter()
        .filter(|a| allow_private || is_public(a.ip()))
        .collect()
}

/// `error` or one of its sources is a [`NotPublic`] refusal.
pub fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a NotPublic> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<NotPublic>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// An address reachable on the public internet: not loopback, private, link-local, shared
/// (carrier-grade NAT), unspecified, broadcast, multicast, documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || first == 0x2001 && ip.segments()[1] == 0x0db8
        || first == 0x0064 && ip.segments()[1] == 0xff9b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(text: &str) -> bool {
        is_public(text.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "2001:db8::1",
            "64:ff9b::a00:1",
        ] {
            assert!(!public(internal), "{internal} counted as public");
        }
    }

    #[test]
    fn internet_addresses_are_public() {
        for outside in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(public(outside), "{outside} counted as internal");
        }
    }

    #[test]
    fn private_answers_are_dropped_unless_allowed() {
        let found: Vec<SocketAddr> =
            vec!["127.0.0.1:0".parse().unwrap(), "8.8.8.8:0".parse().unwrap()];
        assert_eq!(
            keep_allowed(found.clone(), false),
            vec!["8.8.8.8:0".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(keep_allowed(found.clone(), true), found);
    }

    #[tokio::test]
    async fn a_name_of_loopback_is_refused_with_its_addresses() {
        let refused = PublicOnly {
            allow_private: false,
        }
        .resolve("localhost".parse().unwrap())
        .await
        .err()
        .expect("localhost refused");
        let why = refusal(refused.as_ref()).expect("a NotPublic refusal");
        assert_eq!(why.host, "localhost");
        assert!(why.to_string().contains("allow_private_addresses"), "{why}");
        let allowed = PublicOnly {
            allow_private: true,
        }
        .resolve("localhost".parse().unwrap())
        .await
        .expect("allowed when private addresses are");
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }
}
