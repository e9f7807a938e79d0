//! Labels as the model keeps them: interned key and value pairs, sorted by key, in one
//! allocation, behind one pointer (none when there are none, as for remote workloads).

use std::sync::Arc;

use serde::Serialize;

/// A label: key and value.
pub type Label = (Arc<str>, Arc<str>);

/// Labels, compact: pairs sorted by key in one allocation, behind a thin pointer. (A
/// `BTreeMap` node costs about 370 bytes even for two labels, and every one of 100 000
/// workloads has labels; a workload with none pays one pointer.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Option<Box<Box<[Label]>>>);

impl Labels {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Arc<str>> {
        let pairs = self.as_slice();
        pairs
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &pairs[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.as_slice().iter().map(|(k, v)| (k, v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The pairs, sorted by key.
    pub fn as_slice(&self) -> &[Label] {
        self.0.as_deref().map_or(&[], |b| b)
    }

    /// Labels from literal pairs, for tests.
    #[cfg(test)]
    pub(crate) fn of(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }
}

impl FromIterator<Label> for Labels {
    /// Sorted by key; of repeated keys, the last wins.
    fn from_iter<I: IntoIterator<Item = Label>>(it: I) -> Self {
        let mut v: Vec<Label> = it.into_iter().collect();
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        match v.is_empty() {
            true => Labels(None),
            false => Labels(Some(Box::new(v.into_boxed_slice()))),
        }
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(&**k, &**v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_by_key_the_last_of_a_repeated_key_wins_and_none_is_empty() {
        let l = Labels::of(&[("b", "1"), ("a", "2"), ("b", "3")]);
        let pairs: Vec<(&str, &str)> = l.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(pairs, [("a", "2"), ("b", "3")]);
        assert_eq!(l.get("b").map(|v| &**v), Some("3"));
        assert_eq!(l.get("c"), None);
        assert_eq!(l.len(), 2);
        let none = Labels::of(&[]);
        assert!(none.is_empty() && none.as_slice().is_empty() && none == Labels::default());
        assert_eq!(std::mem::size_of::<Labels>(), std::mem::size_of::<usize>());
    }
}
