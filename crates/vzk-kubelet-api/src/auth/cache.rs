//! A small TTL cache for review results (separate lifetimes for yes and no answers).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries beyond this trigger a sweep of expired ones (and a full clear if needed).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug)]
pub(crate) struct TtlCache<K, V> {
    map: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get(&self, k: &K) -> Option<V> {
        let map = self.map.lock().ok()?;
        let (v, until) = map.get(k)?;
        (Instant::now() < *until).then(|| v.clone())
    }

    pub(crate) fn put(&self, k: K, v: V, ttl: Duration) {
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= MAX_ENTRIES {
            let now = Instant::now();
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(k, (v, Instant::now() + ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire() {
        let c = TtlCache::new();
        c.put("a", 1, Duration::from_secs(60));
        c.put("b", 2, Duration::ZERO);
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.get(&"b"), None);
        assert_eq!(c.get(&"c"), None);
    }
}
