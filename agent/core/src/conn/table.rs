//! [`PathTable`]: a connection's paths, keyed by [`PathId`].

use super::path::PathId;

/// A small map from [`PathId`] to `V`, kept sorted by id in one vector.
///
/// A peer has a handful of paths (one direct, one per relay); a `BTreeMap` would reserve a
/// node for eleven of them (about 3 KiB per peer here), a sorted vector holds just what is
/// there, and iterates in the same order.
#[derive(Debug, Clone)]
pub struct PathTable<V> {
    entries: Vec<(PathId, V)>,
}

impl<V> Default for PathTable<V> {
    fn default() -> Self {
        PathTable {
            entries: Vec::new(),
        }
    }
}

impl<V> PathTable<V> {
    fn find(&self, id: &PathId) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.cmp(id))
    }

    pub fn contains_key(&self, id: &PathId) -> bool {
        self.find(id).is_ok()
    }

    pub fn get(&self, id: &PathId) -> Option<&V> {
        self.find(id).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, id: &PathId) -> Option<&mut V> {
        self.find(id).ok().map(|i| &mut self.entries[i].1)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, id: PathId, value: V) -> Option<V> {
        match self.find(&id) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (id, value));
                None
            }
        }
    }

    pub fn remove(&mut self, id: &PathId) -> Option<V> {
        let i = self.find(id).ok()?;
        let (_, value) = self.entries.remove(i);
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
        Some(value)
    }

    pub fn clear(&mut self) {
        self.entries = Vec::new();
    }

    /// In id order.
    pub fn iter(&self) -> impl Iterator<Item = (&PathId, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// In id order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&PathId, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str) -> PathId {
        PathId::Relay(name.into())
    }

    #[test]
    fn behaves_like_a_sorted_map() {
        let direct = PathId::Direct("203.0.113.2:51820".parse().unwrap());
        let mut t = PathTable::default();
        assert_eq!(t.insert(relay("b"), 2), None);
        assert_eq!(t.insert(relay("a"), 1), None);
        assert_eq!(t.insert(direct.clone(), 0), None);
        assert_eq!(t.insert(relay("a"), 10), Some(1));
        let order: Vec<(&PathId, &i32)> = t.iter().collect();
        assert_eq!(
            order,
            [(&direct, &0), (&relay("a"), &10), (&relay("b"), &2)]
        );
        assert!(t.contains_key(&relay("b")));
        *t.get_mut(&relay("b")).unwrap() += 1;
        assert_eq!(t.get(&relay("b")), Some(&3));
        assert_eq!(t.remove(&relay("a")), Some(10));
        assert_eq!(t.remove(&relay("a")), None);
        assert_eq!(t.get(&relay("zz")), None);
        assert_eq!(t.iter().count(), 2);
        for v in t.values_mut() {
            *v *= 2;
        }
        assert_eq!(t.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [0, 6]);
        t.clear();
        assert_eq!(t.iter().count(), 0);
    }
}
