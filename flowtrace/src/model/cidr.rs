//! Address ranges (`10.244.0.0/16`, a single address), as filters and pod CIDRs use them.

use std::{net::IpAddr, str::FromStr};

use crate::error::{Error, Result};

/// An address or a network (`10.244.1.0/24`, `fd00::/8`); matches source or destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpFilter {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpFilter {
    pub fn matches(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let shift = 32 - u32::from(self.prefix_len);
                let mask = if shift == 32 { 0 } else { u32::MAX << shift };
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let shift = 128 - u32::from(self.prefix_len);
                let mask = if shift == 128 { 0 } else { u128::MAX << shift };
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let err = |reason: &str| Error::Filter {
            flag: "--ip",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            err("expected an IPv4/IPv6 address or CIDR such as 10.244.1.7 or 10.244.0.0/16")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(err(&format!(
                        "prefix length must be a number from 0 to {max}"
                    )))
                }
            },
        };
        Ok(Self { addr, prefix_len })
    }
}
