//! Who sent a request, and over what: `--trusted-proxy` (G1, G3).
//!
//! A load balancer that ends TLS in front of the gateway connects from its own address, over
//! plain HTTP. It says who its client was in `X-Forwarded-For` and how the client reached it in
//! `X-Forwarded-Proto`. Anyone can write those headers, so the gateway reads them only from a
//! peer whose socket address is in one of the configured ranges ([`TrustedProxies`]); from any
//! other peer they are ignored, and the peer itself is the client, over this connection's own
//! transport.
//!
//! What a request is judged by ([`ClientInfo`], in its extensions):
//!
//! - the client's address (the login throttle's per-address bucket, A3): the peer's; or, from
//!   a trusted proxy, the right-most address of `X-Forwarded-For` that is not itself a trusted
//!   proxy (every hop right of it was written by a proxy we trust; everything left of it was
//!   written by the client, who may lie). When every address is a trusted proxy, the left-most
//!   one. An entry that is not an IP address (`unknown`, an obfuscated name, garbage) stops the
//!   walk at the last address read, which is a trusted one;
//! - whether the client came over https: this connection is TLS, or a trusted proxy says
//!   `https` in the right-most value of `X-Forwarded-Proto` (the value the proxy itself wrote:
//!   it must set the header, not pass on a client's). That decides the plain-HTTP login
//!   refusal and the session cookie's `Secure` flag.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, as a dual-stack listener sees IPv4 peers)
//! count as their IPv4 address. The `Forwarded` header (RFC 7239) is not read.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use http::header::HeaderName;
use http::HeaderMap;
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// One `--trusted-proxy` range: `10.0.0.0/8`, `fd00::/8`, or one address (`192.0.2.7`, the
/// same as `192.0.2.7/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyRange(IpNet);

/// Why a `--trusted-proxy` value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyRangeError {
    /// Neither an address nor `address/prefix`.
    Syntax,
    /// The address has bits set past the prefix (`10.1.2.3/8`): a typo for another prefix,
    /// or for the network (named here).
    HostBits {
        /// The network the prefix names.
        network: String,
    },
}

impl fmt::Display for ProxyRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax => f.write_str(
                "expected an IP address range (CIDR) such as 10.0.0.0/8 or fd00::/8, or one address",
            ),
            Self::HostBits { network } => write!(
                f,
                "the address has bits set past the prefix length; did you mean {network}?"
            ),
        }
    }
}

impl std::error::Error for ProxyRangeError {}

impl FromStr for ProxyRange {
    type Err = ProxyRangeError;

    fn from_str(value: &str) -> Result<Self, ProxyRangeError> {
        let value = value.trim();
        if let Ok(addr) = value.parse::<IpAddr>() {
            return Ok(Self(IpNet::from(addr.to_canonical())));
        }
        let net = value
            .parse::<IpNet>()
            .map_err(|_| ProxyRangeError::Syntax)?;
        if net.trunc() != net {
            return Err(ProxyRangeError::HostBits {
                network: net.trunc().to_string(),
            });
        }
        // Peers are compared in their canonical form (IPv4-mapped IPv6 as IPv4), so a range
        // of IPv4-mapped addresses becomes the IPv4 range it means.
        if let IpNet::V6(v6) = net {
            let mapped: ipnet::Ipv6Net = "::ffff:0:0/96"
                .parse()
                .map_err(|_| ProxyRangeError::Syntax)?;
            if v6.prefix_len() >= 96 && mapped.contains(&v6.network()) {
                if let IpAddr::V4(v4) = IpAddr::V6(v6.network()).to_canonical() {
                    let v4 = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                        .map_err(|_| ProxyRangeError::Syntax)?;
                    return Ok(Self(IpNet::V4(v4)));
                }
            }
        }
        Ok(Self(net))
    }
}

impl fmt::Display for ProxyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl ProxyRange {
    /// Whether `addr` (canonical: IPv4-mapped IPv6 as IPv4) is in this range.
    fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }

    /// Whether this range holds every address of its family (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.0.prefix_len() == 0
    }
}

/// The proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` the gateway believes; empty by
/// default (nobody's). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    ranges: Arc<[ProxyRange]>,
}

impl TrustedProxies {
    /// The peers in `ranges`.
    pub fn new(ranges: impl IntoIterator<Item = ProxyRange>) -> Self {
        Self {
            ranges: ranges.into_iter().collect(),
        }
    }

    /// Whether no peer is trusted.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The configured ranges.
    pub fn ranges(&self) -> &[ProxyRange] {
        &self.ranges
    }

    /// Whether `addr` is a trusted proxy's address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.ranges.iter().any(|range| range.contains(addr))
    }

    /// Who sent a request that came from `peer` with `headers`, over TLS or not (see the
    /// module documentation).
    pub fn client_info(&self, peer: SocketAddr, tls: bool, headers: &HeaderMap) -> ClientInfo {
        let peer_ip = peer.ip().to_canonical();
        if !self.contains(peer_ip) {
            return ClientInfo {
                peer,
                client: peer_ip,
                tls,
                trusted_proxy: false,
                https: tls,
            };
        }
        ClientInfo {
            peer,
            client: self.forwarded_client(peer_ip, headers),
            tls,
            trusted_proxy: true,
            https: tls || forwarded_https(headers),
        }
    }

    /// The right-most address of `X-Forwarded-For` that is not a trusted proxy (see the
    /// module documentation).
    fn forwarded_client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer;
        // Several header lines are one list, in order (RFC 9110 5.3): walk them from the end.
        for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for entry in value.rsplit(',').map(str::trim) {
                if entry.is_empty() {
                    continue;
                }
                let Some(addr) = parse_forwarded_addr(entry) else {
                    return client;
                };
                client = addr;
                if !self.contains(addr) {
                    return addr;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`) or in brackets, as some proxies write it.
fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    let addr = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })?;
    Some(addr.to_canonical())
}

/// Whether the right-most value of `X-Forwarded-Proto` is `https`.
fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get_all(&X_FORWARDED_PROTO)
        .iter()
        .next_back()
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.rsplit(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// Who sent a request and how it reached the gateway; the gateway's server puts one in every
/// request's extensions (beside [`ClientAddr`](crate::http::ClientAddr), which holds
/// [`ClientInfo::client`], and the peer's `SocketAddr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    peer: SocketAddr,
    client: IpAddr,
    tls: bool,
    trusted_proxy: bool,
    https: bool,
}

impl ClientInfo {
    /// The socket address of the peer that connected: the client, or a proxy.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's address: the peer's, or the one a trusted proxy vouched for.
    pub fn client(&self) -> IpAddr {
        self.client
    }

    /// Whether this connection is the gateway's own TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether the peer is a trusted proxy (`--trusted-proxy`), whose `X-Forwarded-For` and
    /// `X-Forwarded-Proto` were read.
    pub fn via_trusted_proxy(&self) -> bool {
        self.trusted_proxy
    }

    /// Whether the client reached the deployment over https: this connection is TLS, or a
    /// trusted proxy says so.
    pub fn is_https(&self) -> bool {
        self.https
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn proxies(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies::new(ranges.iter().map(|r| r.parse().unwrap()))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn peer(addr: &str) -> SocketAddr {
        SocketAddr::new(addr.parse().unwrap(), 40000)
    }

    #[test]
    fn ranges_parse_cidrs_and_single_addresses_and_refuse_host_bits() {
        assert_eq!(
            "10.0.0.0/8".parse::<ProxyRange>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "192.0.2.7".parse::<ProxyRange>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            "fd00::/8".parse::<ProxyRange>().unwrap().to_string(),
            "fd00::/8"
        );
        assert_eq!(
            "::ffff:10.0.0.1".parse::<ProxyRange>().unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!(
            "10.1.2.3/8".parse::<ProxyRange>(),
            Err(ProxyRangeError::HostBits {
                network: "10.0.0.0/8".into()
            })
        );
        for bad in ["", "10.0.0.0/33", "lb.example", "10.0.0.0/8/8"] {
            assert_eq!(
                bad.parse::<ProxyRange>(),
                Err(ProxyRangeError::Syntax),
                "{bad}"
            );
        }
        assert!("0.0.0.0/0".parse::<ProxyRange>().unwrap().is_everything());
    }

    #[test]
    fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
        let info = proxies(&["10.0.0.0/8"]).client_info(
            peer("192.0.2.9"),
            false,
            &headers(&[
                ("x-forwarded-for", "198.51.100.1"),
                ("x-forwarded-proto", "https"),
            ]),
        );
        assert_eq!(info.client(), "192.0.2.9".parse::<IpAddr>().unwrap());
        assert!(!info.is_https());
        assert!(!info.via_trusted_proxy());
        // Nobody is trusted by default.
        let info = TrustedProxies::default().client_info(
            peer("10.0.0.1"),
            true,
            &headers(&[("x-forwarded-for", "198.51.100.1")]),
        );
        assert_eq!(info.client(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert!(info.is_https() && info.is_tls());
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_address() {
        let trusted = proxies(&["10.0.0.0/8", "fd00::/8"]);
        let cases: &[(&[&str], &str)] = &[
            // A client that forges an address on the left gains nothing.
            (&["203.0.113.66, 198.51.100.1"], "198.51.100.1"),
            // Two proxies of ours, then the real client.
            (&["203.0.113.66, 198.51.100.1, 10.0.0.2"], "198.51.100.1"),
            // Several header lines are one list.
            (&["203.0.113.66", "198.51.100.1, 10.0.0.2"], "198.51.100.1"),
            // Every hop trusted: the left-most.
            (&["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            // No header: the proxy itself.
            (&[], "10.0.0.1"),
            // Garbage stops the walk at the last trusted hop read.
            (&["198.51.100.1, unknown, 10.0.0.2"], "10.0.0.2"),
            (&["unknown"], "10.0.0.1"),
            // Ports, brackets, mapped addresses, empty elements.
            (&["198.51.100.1:4711"], "198.51.100.1"),
            (&["[2001:db8::1]:4711, [fd00::2]"], "2001:db8::1"),
            (&["::ffff:198.51.100.1"], "198.51.100.1"),
            (&["198.51.100.1,, "], "198.51.100.1"),
        ];
        for (values, expected) in cases {
            let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("x-forwarded-for", *v)).collect();
            let info = trusted.client_info(peer("10.0.0.1"), false, &headers(&pairs));
            assert!(info.via_trusted_proxy());
            assert_eq!(
                info.client(),
                expected.parse::<IpAddr>().unwrap(),
                "{values:?}"
            );
        }
    }

    #[test]
    fn a_trusted_proxy_vouches_for_https_in_its_own_right_most_value() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let https = |values: &[&str]| {
            let pairs: Vec<(&str, &str)> =
                values.iter().map(|v| ("x-forwarded-proto", *v)).collect();
            trusted
                .client_info(peer("10.0.0.1"), false, &headers(&pairs))
                .is_https()
        };
        assert!(https(&["https"]));
        assert!(https(&["HTTPS"]));
        assert!(https(&["http, https"]));
        assert!(!https(&["https, http"]), "the client wrote the https");
        assert!(!https(&["https", "http"]));
        assert!(!https(&["http"]));
        assert!(!https(&[]));
        // A dual-stack listener sees an IPv4 proxy as a mapped address.
        let info = trusted.client_info(
            peer("::ffff:10.0.0.1"),
            false,
            &headers(&[("x-forwarded-proto", "https")]),
        );
        assert!(info.is_https());
        assert_eq!(info.client(), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn an_ipv4_mapped_range_means_its_ipv4_range() {
        let range: ProxyRange = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(range.contains("10.1.2.3".parse().unwrap()));
        assert!(!range.contains("11.0.0.1".parse().unwrap()));
        assert_eq!(range.to_string(), "10.0.0.0/8");
    }
}
