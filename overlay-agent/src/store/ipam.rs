//! IP address management, the pure part: parsing and checking a network's subnet, gateway,
//! ip-range and auxiliary addresses, and choosing addresses from its pool.
//!
//! The store keeps one key per address in use; this module only decides, given the set in use,
//! which address to take. Taking it is the store's transaction (see `store::endpoint`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use crate::model::Network;

/// Where Docker takes the subnets of global-scope (overlay) networks created without --subnet,
/// and the size of each.
pub const DEFAULT_POOL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8) {
    Ok(net) => net,
    Err(_) => unreachable!(),
};
pub const DEFAULT_PREFIX_LEN: u8 = 24;

/// The longest prefix an overlay subnet may have: a /30 still holds a gateway and one endpoint.
pub const MAX_PREFIX_LEN: u8 = 30;

const fn block(a: u8, b: u8, prefix_len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, 0, 0), prefix_len) {
        Ok(net) => net,
        Err(_) => unreachable!(),
    }
}

/// Address blocks no overlay subnet may touch, each with why: the kernel (and every router)
/// gives their addresses a meaning of their own, so an endpoint holding one would be dropped,
/// answered by the host itself, or flooded, never delivered as a unicast to one container.
pub const UNUSABLE: [(Ipv4Net, &str); 5] = [
    (block(0, 0, 8), "\"this network\" (RFC 1122), valid only as a source while a host has no address"),
    (block(127, 0, 8), "loopback (RFC 1122), whose packets never leave a host"),
    (block(169, 254, 16), "link-local (RFC 3927), which hosts assign themselves and routers never forward"),
    (block(224, 0, 4), "multicast (RFC 5771), which no interface may hold as its own address"),
    (block(240, 0, 4), "reserved (RFC 1112), with the limited broadcast 255.255.255.255; hosts drop it"),
];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidCidr { what: &'static str, value: String, reason: String },
    #[error("invalid {what} {value}: it has host bits set (did you mean {expected}?)")]
    HostBitsSet { what: &'static str, value: Ipv4Net, expected: Ipv4Net },
    #[error("subnet {subnet} cannot be used: it overlaps {block}, {reason}")]
    SubnetUnusable { subnet: Ipv4Net, block: Ipv4Net, reason: &'static str },
    #[error("subnet {subnet} is too small: an overlay network needs at least a /{MAX_PREFIX_LEN}")]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidAddress { what: &'static str, value: String, reason: String },
    #[error("gateway {gateway} is outside subnet {subnet}")]
    GatewayOutsideSubnet { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("gateway {gateway} is the {reserved} of subnet {subnet}")]
    GatewayReserved { gateway: Ipv4Addr, subnet: Ipv4Net, reserved: Reserved },
    #[error("ip-range {range} is outside subnet {subnet}")]
    RangeOutsideSubnet { range: Ipv4Net, subnet: Ipv4Net },
    #[error(
        "ip-range {range} has no usable address: each of its addresses is the network or broadcast address of subnet {subnet}, its gateway or an auxiliary address"
    )]
    RangeEmpty { range: Ipv4Net, subnet: Ipv4Net },
    #[error("auxiliary address {name}={ip} is outside subnet {subnet}")]
    AuxOutsideSubnet { name: String, ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("auxiliary address {name}={ip} is the {reserved}")]
    AuxReserved { name: String, ip: Ipv4Addr, reserved: Reserved },
    #[error("address {ip} is outside subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {ip} is reserved: it is the {reserved}")]
    AddressReserved { ip: Ipv4Addr, reserved: Reserved },
    #[error("no free address left in {pool} (all {size} in use)")]
    PoolFull { pool: Ipv4Net, size: u64 },
}

/// Why an address of a subnet is never handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reserved {
    NetworkAddress,
    Broadcast,
    Gateway,
    Auxiliary(String),
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NetworkAddress => f.write_str("network address"),
            Self::Broadcast => f.write_str("broadcast address"),
            Self::Gateway => f.write_str("gateway"),
            Self::Auxiliary(name) => write!(f, "auxiliary address {name:?}"),
        }
    }
}

/// Parses an IPv4 CIDR, refusing one with host bits set: `10.0.9.1/24` is more likely a typo
/// for a gateway than a subnet, and silently truncating it would hide that.
pub fn parse_cidr(what: &'static str, value: &str) -> Result<Ipv4Net, IpamError> {
    let invalid =
        |reason: &str| IpamError::InvalidCidr { what, value: value.to_owned(), reason: reason.to_owned() };
    if !value.contains('/') {
        return Err(invalid("expected an IPv4 CIDR such as 10.0.9.0/24"));
    }
    let net: Ipv4Net =
        value.trim().parse().map_err(|_| invalid("expected an IPv4 CIDR such as 10.0.9.0/24"))?;
    if net.addr() != net.network() {
        return Err(IpamError::HostBitsSet { what, value: net, expected: net.trunc() });
    }
    Ok(net)
}

pub fn parse_addr(what: &'static str, value: &str) -> Result<Ipv4Addr, IpamError> {
    value.trim().parse().map_err(|_| IpamError::InvalidAddress {
        what,
        value: value.to_owned(),
        reason: "expected an IPv4 address such as 10.0.9.2".to_owned(),
    })
}

/// A network's addressing, checked: what `network create` stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressing {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ip_range: Option<Ipv4Net>,
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
}

impl Addressing {
    /// Checks the parts of a network's addressing against each other. The gateway defaults to
    /// the first usable address of the subnet, as Docker's does.
    pub fn new(
        subnet: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        ip_range: Option<Ipv4Net>,
        aux_addresses: BTreeMap<String, Ipv4Addr>,
    ) -> Result<Self, IpamError> {
        // First, so that a subnet both unusable and small (127.0.0.1/32) is refused for the
        // reason that no other size would fix.
        if let Some(&(block, reason)) = UNUSABLE.iter().find(|(block, _)| overlaps(*block, subnet)) {
            return Err(IpamError::SubnetUnusable { subnet, block, reason });
        }
        if subnet.prefix_len() > MAX_PREFIX_LEN {
            return Err(IpamError::SubnetTooSmall { subnet });
        }
        let gateway = gateway.unwrap_or_else(|| first_usable(subnet));
        if !subnet.contains(&gateway) {
            return Err(IpamError::GatewayOutsideSubnet { gateway, subnet });
        }
        if let Some(reserved) = edge(subnet, gateway) {
            return Err(IpamError::GatewayReserved { gateway, subnet, reserved });
        }
        if let Some(range) = ip_range
            && !subnet.contains(&range)
        {
            return Err(IpamError::RangeOutsideSubnet { range, subnet });
        }
        let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for (name, &ip) in &aux_addresses {
            if !subnet.contains(&ip) {
                return Err(IpamError::AuxOutsideSubnet { name: name.clone(), ip, subnet });
            }
            let reserved = edge(subnet, ip)
                .or_else(|| (ip == gateway).then_some(Reserved::Gateway))
                .or_else(|| seen.get(&ip).map(|other| Reserved::Auxiliary((*other).to_owned())));
            if let Some(reserved) = reserved {
                return Err(IpamError::AuxReserved { name: name.clone(), ip, reserved });
            }
            seen.insert(ip, name);
        }
        // A range of only reserved addresses would make a network every connect without --ip
        // fails on. At most 3 + aux addresses are reserved, so this looks at that many plus one.
        if let Some(range) = ip_range
            && !(u32::from(range.network())..=u32::from(range.broadcast()))
                .map(Ipv4Addr::from)
                .any(|ip| edge(subnet, ip).is_none() && ip != gateway && !seen.contains_key(&ip))
        {
            return Err(IpamError::RangeEmpty { range, subnet });
        }
        Ok(Self { subnet, gateway, ip_range, aux_addresses })
    }
}

/// The network or broadcast address of `subnet`, if `ip` is one.
fn edge(subnet: Ipv4Net, ip: Ipv4Addr) -> Option<Reserved> {
    if ip == subnet.network() {
        Some(Reserved::NetworkAddress)
    } else if ip == subnet.broadcast() {
        Some(Reserved::Broadcast)
    } else {
        None
    }
}

pub fn first_usable(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
}

pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first /24 of 10.0.0.0/8 that overlaps none of `taken`.
pub fn default_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    DEFAULT_POOL
        .subnets(DEFAULT_PREFIX_LEN)
        .ok()?
        .find(|candidate| !taken.iter().any(|t| overlaps(*candidate, *t)))
}

/// The addresses one network may hand out.
#[derive(Clone, Debug)]
pub struct Pool {
    subnet: Ipv4Net,
    range: Ipv4Net,
    gateway: Ipv4Addr,
    aux: BTreeMap<Ipv4Addr, String>,
}

impl Pool {
    pub fn new(net: &Network) -> Self {
        Self {
            subnet: net.subnet,
            range: net.ip_range.unwrap_or(net.subnet),
            gateway: net.gateway,
            aux: net.aux_addresses.iter().map(|(name, ip)| (*ip, name.clone())).collect(),
        }
    }

    /// Where addresses come from: the ip-range, or the whole subnet.
    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    /// Why `ip` can never be handed out, if it cannot.
    pub fn reserved(&self, ip: Ipv4Addr) -> Option<Reserved> {
        edge(self.subnet, ip).or_else(|| {
            if ip == self.gateway {
                Some(Reserved::Gateway)
            } else {
                self.aux.get(&ip).map(|name| Reserved::Auxiliary(name.clone()))
            }
        })
    }

    /// Every address the pool may hand out, lowest first.
    pub fn candidates(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (u32::from(self.range.network())..=u32::from(self.range.broadcast()))
            .map(Ipv4Addr::from)
            .filter(|ip| self.reserved(*ip).is_none())
    }

    /// How many addresses the pool holds.
    pub fn size(&self) -> u64 {
        let all = 1u64 << (32 - self.range.prefix_len());
        let reserved = [self.subnet.network(), self.subnet.broadcast(), self.gateway]
            .into_iter()
            .chain(self.aux.keys().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|ip| self.range.contains(ip))
            .count() as u64;
        all - reserved
    }

    /// The lowest free address. Lowest-first means a freed address is the next one handed out,
    /// which keeps a network's addresses dense and predictable.
    pub fn first_free(&self, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        self.candidates()
            .find(|ip| !used.contains(ip))
            .ok_or(IpamError::PoolFull { pool: self.range, size: self.size() })
    }

    /// Whether `ip` may be asked for by name (`--ip`): anywhere in the subnet, even outside the
    /// ip-range, as long as it is not reserved. Whether it is free is the caller's question.
    pub fn check_request(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !self.subnet.contains(&ip) {
            return Err(IpamError::OutsideSubnet { ip, subnet: self.subnet });
        }
        match self.reserved(ip) {
            Some(reserved) => Err(IpamError::AddressReserved { ip, reserved }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn network(subnet: &str, range: Option<&str>, aux: &[(&str, &str)]) -> Network {
        let aux: BTreeMap<String, Ipv4Addr> = aux.iter().map(|(n, a)| ((*n).to_owned(), ip(a))).collect();
        let a = Addressing::new(net(subnet), None, range.map(net), aux).unwrap();
        Network {
            id: "0".repeat(64),
            name: "n".into(),
            driver: "overlay".into(),
            vni: 4096,
            subnet: a.subnet,
            gateway: a.gateway,
            ip_range: a.ip_range,
            aux_addresses: a.aux_addresses,
            mtu: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
            created: String::new(),
            internal: false,
            encrypted: false,
        }
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(parse_cidr("subnet", "10.0.9.0/24").unwrap(), net("10.0.9.0/24"));
        assert_eq!(
            parse_cidr("subnet", "10.0.9.1/24").unwrap_err(),
            IpamError::HostBitsSet {
                what: "subnet",
                value: net("10.0.9.1/24"),
                expected: net("10.0.9.0/24")
            }
        );
        for bad in ["10.0.9.0", "10.0.9.0/33", "10.0.256.0/24", "fd00::/64", "", "ten/8"] {
            let e = parse_cidr("subnet", bad).unwrap_err();
            assert!(matches!(e, IpamError::InvalidCidr { .. }), "{bad}: {e}");
        }
        assert!(
            parse_cidr("subnet", "nope").unwrap_err().to_string().starts_with("invalid subnet \"nope\""),
            "the error names what and which value"
        );
    }

    #[test]
    fn addressing_defaults_and_refusals() {
        let a = Addressing::new(net("10.0.9.0/24"), None, None, BTreeMap::new()).unwrap();
        assert_eq!(a.gateway, ip("10.0.9.1"));
        let e = Addressing::new(net("10.0.9.0/24"), Some(ip("10.0.8.1")), None, BTreeMap::new()).unwrap_err();
        assert_eq!(e.to_string(), "gateway 10.0.8.1 is outside subnet 10.0.9.0/24");
        let e =
            Addressing::new(net("10.0.9.0/24"), Some(ip("10.0.9.255")), None, BTreeMap::new()).unwrap_err();
        assert_eq!(e.to_string(), "gateway 10.0.9.255 is the broadcast address of subnet 10.0.9.0/24");
        let e =
            Addressing::new(net("10.0.9.0/24"), None, Some(net("10.0.8.0/25")), BTreeMap::new()).unwrap_err();
        assert_eq!(e.to_string(), "ip-range 10.0.8.0/25 is outside subnet 10.0.9.0/24");
        let e = Addressing::new(net("10.0.9.0/24"), None, Some(net("10.0.8.0/16")), BTreeMap::new());
        assert!(e.is_err(), "a range wider than the subnet is outside it");
        let aux = BTreeMap::from([("router".to_owned(), ip("10.0.9.1"))]);
        let e = Addressing::new(net("10.0.9.0/24"), None, None, aux).unwrap_err();
        assert_eq!(e.to_string(), "auxiliary address router=10.0.9.1 is the gateway");
        let aux = BTreeMap::from([("a".to_owned(), ip("10.0.9.5")), ("b".to_owned(), ip("10.0.9.5"))]);
        let e = Addressing::new(net("10.0.9.0/24"), None, None, aux).unwrap_err();
        assert_eq!(e.to_string(), "auxiliary address b=10.0.9.5 is the auxiliary address \"a\"");
        let aux = BTreeMap::from([("far".to_owned(), ip("10.1.0.5"))]);
        assert!(matches!(
            Addressing::new(net("10.0.9.0/24"), None, None, aux),
            Err(IpamError::AuxOutsideSubnet { .. })
        ));
        assert!(matches!(
            Addressing::new(net("10.0.9.0/31"), None, None, BTreeMap::new()),
            Err(IpamError::SubnetTooSmall { .. })
        ));
    }

    #[test]
    fn subnets_that_cannot_work_are_refused() {
        let refused = |subnet: &str| {
            Addressing::new(net(subnet), None, None, BTreeMap::new()).map(|_| ()).unwrap_err().to_string()
        };
        for (subnet, block) in [
            ("0.0.0.0/8", "0.0.0.0/8"),
            ("0.1.0.0/16", "0.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/8"),
            ("127.0.0.0/8", "127.0.0.0/8"),
            ("127.10.0.0/24", "127.0.0.0/8"),
            ("126.0.0.0/7", "127.0.0.0/8"),
            ("169.254.0.0/16", "169.254.0.0/16"),
            ("169.254.7.0/24", "169.254.0.0/16"),
            ("169.0.0.0/8", "169.254.0.0/16"),
            ("224.0.0.0/4", "224.0.0.0/4"),
            ("239.1.2.0/24", "224.0.0.0/4"),
            ("192.0.0.0/2", "224.0.0.0/4"),
            ("240.0.0.0/4", "240.0.0.0/4"),
            ("250.0.0.0/24", "240.0.0.0/4"),
            ("255.255.255.255/32", "240.0.0.0/4"),
        ] {
            let e = refused(subnet);
            assert!(e.starts_with(&format!("subnet {subnet} cannot be used: it overlaps {block}, ")), "{e}");
        }
        assert_eq!(
            refused("127.0.0.0/8"),
            "subnet 127.0.0.0/8 cannot be used: it overlaps 127.0.0.0/8, loopback (RFC 1122), whose packets never leave a host"
        );
        // The neighbours of each block are fine.
        for subnet in ["1.0.0.0/24", "126.255.255.0/24", "128.0.0.0/24", "169.253.0.0/24", "169.255.0.0/24"] {
            assert!(Addressing::new(net(subnet), None, None, BTreeMap::new()).is_ok(), "{subnet}");
        }
        assert!(Addressing::new(net("223.255.255.0/24"), None, None, BTreeMap::new()).is_ok());
    }

    #[test]
    fn a_range_with_no_usable_address_is_refused() {
        let empty = |range: &str, gateway: Option<&str>, aux: &[(&str, &str)]| {
            let aux = aux.iter().map(|(n, a)| ((*n).to_owned(), ip(a))).collect();
            Addressing::new(net("10.0.9.0/24"), gateway.map(ip), Some(net(range)), aux)
        };
        assert_eq!(
            empty("10.0.9.0/31", None, &[]).unwrap_err(),
            IpamError::RangeEmpty { range: net("10.0.9.0/31"), subnet: net("10.0.9.0/24") }
        );
        assert!(matches!(empty("10.0.9.255/32", None, &[]), Err(IpamError::RangeEmpty { .. })));
        assert!(matches!(empty("10.0.9.8/32", Some("10.0.9.8"), &[]), Err(IpamError::RangeEmpty { .. })));
        assert!(matches!(
            empty("10.0.9.8/31", None, &[("a", "10.0.9.8"), ("b", "10.0.9.9")]),
            Err(IpamError::RangeEmpty { .. })
        ));
        assert!(empty("10.0.9.8/31", None, &[("a", "10.0.9.8")]).is_ok(), "10.0.9.9 is left");
        assert!(empty("10.0.9.0/30", None, &[]).is_ok(), "10.0.9.2 is left");
        assert!(empty("10.0.9.7/32", None, &[]).is_ok());
    }

    #[test]
    fn candidates_skip_reserved_addresses() {
        let n = network("10.0.9.0/29", None, &[("printer", "10.0.9.3")]);
        let pool = Pool::new(&n);
        let all: Vec<_> = pool.candidates().collect();
        assert_eq!(all, ["10.0.9.2", "10.0.9.4", "10.0.9.5", "10.0.9.6"].map(ip));
        assert_eq!(pool.size(), 4);
        assert_eq!(pool.reserved(ip("10.0.9.0")), Some(Reserved::NetworkAddress));
        assert_eq!(pool.reserved(ip("10.0.9.7")), Some(Reserved::Broadcast));
        assert_eq!(pool.reserved(ip("10.0.9.1")), Some(Reserved::Gateway));
        assert_eq!(pool.reserved(ip("10.0.9.3")), Some(Reserved::Auxiliary("printer".into())));
    }

    #[test]
    fn the_range_bounds_allocation_but_not_requests() {
        let n = network("10.0.9.0/24", Some("10.0.9.128/30"), &[]);
        let pool = Pool::new(&n);
        let all: Vec<_> = pool.candidates().collect();
        assert_eq!(all, ["10.0.9.128", "10.0.9.129", "10.0.9.130", "10.0.9.131"].map(ip));
        assert_eq!(pool.size(), 4);
        assert_eq!(pool.check_request(ip("10.0.9.7")), Ok(()));
        assert_eq!(
            pool.check_request(ip("10.0.10.7")),
            Err(IpamError::OutsideSubnet { ip: ip("10.0.10.7"), subnet: net("10.0.9.0/24") })
        );
        assert_eq!(
            pool.check_request(ip("10.0.9.1")),
            Err(IpamError::AddressReserved { ip: ip("10.0.9.1"), reserved: Reserved::Gateway })
        );
        // A range at the edge of the subnet loses the subnet's network and broadcast address.
        let n = network("10.0.9.0/24", Some("10.0.9.252/30"), &[]);
        assert_eq!(
            Pool::new(&n).candidates().collect::<Vec<_>>(),
            ["10.0.9.252", "10.0.9.253", "10.0.9.254"].map(ip)
        );
        assert_eq!(Pool::new(&n).size(), 3);
    }

    #[test]
    fn lowest_free_first_and_full_pool() {
        let n = network("10.0.9.0/30", None, &[]);
        let pool = Pool::new(&n);
        let mut used = BTreeSet::new();
        assert_eq!(pool.first_free(&used), Ok(ip("10.0.9.2")));
        used.insert(ip("10.0.9.2"));
        assert_eq!(pool.first_free(&used), Err(IpamError::PoolFull { pool: net("10.0.9.0/30"), size: 1 }));
        let n = network("10.0.9.0/24", None, &[]);
        let pool = Pool::new(&n);
        let used: BTreeSet<_> = ["10.0.9.2", "10.0.9.3", "10.0.9.5"].map(ip).into();
        assert_eq!(pool.first_free(&used), Ok(ip("10.0.9.4")), "a freed address is reused first");
    }

    #[test]
    fn default_subnets_avoid_overlaps() {
        assert_eq!(default_subnet(&[]), Some(net("10.0.0.0/24")));
        assert_eq!(default_subnet(&[net("10.0.0.0/23")]), Some(net("10.0.2.0/24")));
        assert_eq!(default_subnet(&[net("10.0.0.0/8")]), None);
        assert!(overlaps(net("10.0.0.0/16"), net("10.0.9.0/24")));
        assert!(overlaps(net("10.0.9.0/24"), net("10.0.0.0/16")));
        assert!(!overlaps(net("10.0.9.0/24"), net("10.0.10.0/24")));
    }
}
