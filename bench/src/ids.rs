//! Sets of message ids as sorted, disjoint ranges. A subscriber that receives a topic's
//! ids in order holds one range however many it received, so every client of a storm can
//! remember everything it was delivered (to find duplicates) in a few words, and the
//! publisher can remember every id it had acknowledged.

use serde::{Deserialize, Serialize};

/// Half-open ranges `[start, end)`, sorted, disjoint and not touching.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdSet(Vec<(u64, u64)>);

impl IdSet {
    /// Add `id`; false when it was already there.
    pub fn insert(&mut self, id: u64) -> bool {
        let Some(end) = id.checked_add(1) else {
            return false; // u64::MAX is no message id anyone sends
        };
        // In order, the common case: extend the last range.
        if let Some(last) = self.0.last_mut() {
            if last.1 == id {
                last.1 = end;
                return true;
            }
            if last.1 < id {
                self.0.push((id, end));
                return true;
            }
        } else {
            self.0.push((id, end));
            return true;
        }
        // The first range starting after `id`; the one before it may hold or touch `id`.
        let after = self.0.partition_point(|&(s, _)| s <= id);
        if after > 0 && self.0[after - 1].1 > id {
            return false;
        }
        let joins_before = after > 0 && self.0[after - 1].1 == id;
        let joins_after = after < self.0.len() && self.0[after].0 == end;
        match (joins_before, joins_after) {
            (true, true) => {
                self.0[after - 1].1 = self.0[after].1;
                self.0.remove(after);
            }
            (true, false) => self.0[after - 1].1 = end,
            (false, true) => self.0[after].0 = id,
            (false, false) => self.0.insert(after, (id, end)),
        }
        true
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn max(&self) -> Option<u64> {
        self.0.last().map(|&(_, e)| e - 1)
    }

    #[cfg(test)]
    pub fn ranges(&self) -> usize {
        self.0.len()
    }

    /// How many ids of `self` above `floor` are not in `have`.
    pub fn missing_from(&self, have: &IdSet, floor: u64) -> u64 {
        let mut missing = 0;
        let mut j = 0;
        for &(s, e) in &self.0 {
            let s = s.max(floor.saturating_add(1));
            if s >= e {
                continue;
            }
            let mut covered = 0;
            // Ranges of `have` wholly before this one cannot matter for later ones either.
            while j < have.0.len() && have.0[j].1 <= s {
                j += 1;
            }
            let mut k = j;
            while k < have.0.len() && have.0[k].0 < e {
                let (hs, he) = have.0[k];
                covered += he.min(e) - hs.max(s);
                k += 1;
            }
            missing += (e - s) - covered;
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> IdSet {
        let mut s = IdSet::default();
        for &i in ids {
            s.insert(i);
        }
        s
    }

    #[test]
    fn in_order_ids_stay_one_range_and_repeats_are_refused() {
        let mut s = IdSet::default();
        for i in 1..=1000 {
            assert!(s.insert(i));
        }
        assert_eq!((s.ranges(), s.len(), s.max()), (1, 1000, Some(1000)));
        assert!(!s.insert(1));
        assert!(!s.insert(500));
        assert!(!s.insert(1000));
        assert_eq!(s.len(), 1000);
    }

    #[test]
    fn out_of_order_ids_merge_when_gaps_fill() {
        let mut s = set(&[10, 12, 5, 14]);
        assert_eq!(s.0, vec![(5, 6), (10, 11), (12, 13), (14, 15)]);
        assert!(s.insert(11));
        assert_eq!(s.0, vec![(5, 6), (10, 13), (14, 15)]);
        assert!(s.insert(13));
        assert!(s.insert(4));
        assert!(s.insert(6));
        assert_eq!(s.0, vec![(4, 7), (10, 15)]);
        assert!(!s.insert(12));
        assert!(!s.insert(4));
        assert!(s.insert(0));
        assert_eq!(s.0, vec![(0, 1), (4, 7), (10, 15)]);
    }

    #[test]
    fn missing_counts_what_is_not_had_above_the_floor() {
        let acked = set(&(1..=20).collect::<Vec<_>>());
        let have = set(&[1, 2, 3, 7, 8, 15, 16, 17, 18, 19, 20]);
        assert_eq!(acked.missing_from(&have, 0), 9);
        // Subscribed at id 5: 1..=5 were never promised.
        assert_eq!(acked.missing_from(&have, 5), 7);
        assert_eq!(acked.missing_from(&acked, 0), 0);
        assert_eq!(acked.missing_from(&IdSet::default(), 18), 2);
        let mut gappy = set(&[2, 4, 6]);
        gappy.insert(9);
        assert_eq!(gappy.missing_from(&set(&[1, 4, 5, 9]), 0), 2);
    }
}
