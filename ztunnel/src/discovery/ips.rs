//! A workload's IP addresses as the model keeps them: one inline, more in one allocation.

use std::net::IpAddr;

use serde::Serialize;

/// A workload's IPs, in order: one (as nearly every pod has) held inline, more in one
/// allocation. Reads as a slice.
#[derive(Clone, PartialEq, Eq)]
pub struct Ips(IpsRepr);

#[derive(Clone, PartialEq, Eq)]
enum IpsRepr {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl std::ops::Deref for Ips {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        match &self.0 {
            IpsRepr::One(ip) => std::slice::from_ref(ip),
            IpsRepr::Many(ips) => ips,
        }
    }
}

impl From<Vec<IpAddr>> for Ips {
    fn from(v: Vec<IpAddr>) -> Self {
        match *v {
            [ip] => Ips(IpsRepr::One(ip)),
            _ => Ips(IpsRepr::Many(v.into_boxed_slice())),
        }
    }
}

impl From<&[IpAddr]> for Ips {
    fn from(v: &[IpAddr]) -> Self {
        match *v {
            [ip] => Ips(IpsRepr::One(ip)),
            _ => Ips(IpsRepr::Many(v.into())),
        }
    }
}

impl<'a> IntoIterator for &'a Ips {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::fmt::Debug for Ips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Ips {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}
