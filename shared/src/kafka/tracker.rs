//! The per-partition offset tracker: which offsets of one partition were handed to workers and
//! are not finished yet, and how far the stored offset may move.
//!
//! Kafka remembers one position per partition (the next offset to read), not per message. If
//! offset `i + n` finishes before `i` and the position moved past `i`, a crash would lose
//! `[i, i + n)`. So the position only moves to the first offset still outstanding (or one past
//! the highest offset handed out when none is): out-of-order completion never skips work, a
//! redelivered prefix is the price of a crash. Gaps in the offsets (compaction, transaction
//! markers) are skipped because only offsets actually handed out are tracked.

use std::collections::BTreeSet;

/// Offsets of one partition in flight, and the position last stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionTracker {
    /// Offsets handed out and not finished, in order.
    outstanding: BTreeSet<i64>,
    /// One past the highest offset handed out.
    high: Option<i64>,
    /// The position last returned for storing (the next offset a restart reads).
    stored: Option<i64>,
}

impl PartitionTracker {
    /// An empty tracker (a freshly assigned partition).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was handed out; `false` when it already is outstanding (a
    /// duplicate that must not be handed out twice).
    pub fn received(&mut self, offset: i64) -> bool {
        if !self.outstanding.insert(offset) {
            return false;
        }
        let next = offset.saturating_add(1);
        if self.high.is_none_or(|h| next > h) {
            self.high = Some(next);
        }
        true
    }

    /// Marks `offset` finished (acknowledged or dead-lettered). Returns the position to store
    /// when it moved forward: the first offset still outstanding, or one past the highest
    /// handed out. An offset never handed out, or finished already, changes nothing.
    pub fn done(&mut self, offset: i64) -> Option<i64> {
        if !self.outstanding.remove(&offset) {
            return None;
        }
        let position = self.position()?;
        if self.stored.is_some_and(|s| position <= s) {
            return None;
        }
        self.stored = Some(position);
        Some(position)
    }

    /// Whether `offset` was handed out and is not finished.
    pub fn is_outstanding(&self, offset: i64) -> bool {
        self.outstanding.contains(&offset)
    }

    /// The position the partition may be stored at now: the first outstanding offset, or one
    /// past the highest handed out; `None` before anything was handed out.
    pub fn position(&self) -> Option<i64> {
        self.outstanding.first().copied().or(self.high)
    }

    /// The position [`PartitionTracker::position`] would give once `offsets` are finished too,
    /// without finishing them.
    pub fn position_if_done(&self, offsets: &BTreeSet<i64>) -> Option<i64> {
        self.outstanding
            .iter()
            .copied()
            .find(|o| !offsets.contains(o))
            .or(self.high)
    }

    /// The position last returned by [`PartitionTracker::done`].
    pub fn stored(&self) -> Option<i64> {
        self.stored
    }

    /// How many offsets are handed out and not finished.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_slow_offset_holds_the_position_while_later_ones_finish() {
        let mut t = PartitionTracker::new();
        for o in 10..15 {
            assert!(t.received(o));
        }
        assert_eq!(t.done(10), Some(11));
        // 11 is slow; 12..15 finish first: nothing may be stored past 11.
        assert_eq!(t.done(12), None);
        assert_eq!(t.done(14), None);
        assert_eq!(t.done(13), None);
        assert_eq!(t.position(), Some(11));
        assert_eq!(t.done(11), Some(15));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_skipped() {
        let mut t = PartitionTracker::new();
        t.received(3);
        t.received(7);
        assert_eq!(t.done(3), Some(7));
        assert_eq!(t.done(7), Some(8));
    }

    #[test]
    fn a_duplicate_or_unknown_offset_changes_nothing() {
        let mut t = PartitionTracker::new();
        assert!(t.received(5));
        assert!(!t.received(5), "already outstanding");
        assert_eq!(t.done(6), None, "never handed out");
        assert_eq!(t.done(5), Some(6));
        assert_eq!(t.done(5), None, "finished twice");
        assert_eq!(t.stored(), Some(6));
    }

    #[test]
    fn the_position_if_done_changes_nothing_and_matches_finishing() {
        let mut t = PartitionTracker::new();
        for o in 10..15 {
            t.received(o);
        }
        let some: BTreeSet<i64> = [10, 11, 13].into_iter().collect();
        assert_eq!(t.position_if_done(&some), Some(12));
        assert_eq!(t.position(), Some(10), "nothing finished");
        let all: BTreeSet<i64> = (10..15).collect();
        assert_eq!(t.position_if_done(&all), Some(15));
        for o in some {
            t.done(o);
        }
        assert_eq!(t.position(), Some(12));
    }

    #[test]
    fn the_stored_position_never_moves_back() {
        let mut t = PartitionTracker::new();
        t.received(10);
        assert_eq!(t.done(10), Some(11));
        // An old offset handed out again (after a seek) must not rewind the commit.
        t.received(4);
        assert_eq!(t.position(), Some(4));
        assert_eq!(t.done(4), None);
        assert_eq!(t.stored(), Some(11));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Receive,
        Finish(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![Just(Op::Receive), any::<usize>().prop_map(Op::Finish)],
            0..200,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Offsets handed out in order with random gaps, finished in any order: the stored
        /// position never passes an unfinished offset, never moves back, and reaches one past
        /// the last offset once everything is finished.
        #[test]
        fn the_position_never_passes_unfinished_work(
            ops in ops(),
            gaps in proptest::collection::vec(1_i64..4, 200),
            start in 0_i64..1_000,
        ) {
            let mut t = PartitionTracker::new();
            let mut next = start;
            let mut unfinished: Vec<i64> = Vec::new();
            let mut handed = 0;
            let mut last_stored: Option<i64> = None;
            for op in ops {
                match op {
                    Op::Receive => {
                        prop_assert!(t.received(next));
                        unfinished.push(next);
                        next += gaps[handed % gaps.len()];
                        handed += 1;
                    }
                    Op::Finish(i) if !unfinished.is_empty() => {
                        let offset = unfinished.swap_remove(i % unfinished.len());
                        if let Some(p) = t.done(offset) {
                            prop_assert!(last_stored.is_none_or(|s| p > s), "moved back");
                            last_stored = Some(p);
                        }
                    }
                    Op::Finish(_) => {}
                }
                if let Some(s) = t.stored() {
                    for u in &unfinished {
                        prop_assert!(s <= *u, "stored {} past unfinished {}", s, u);
                    }
                }
                prop_assert_eq!(t.outstanding(), unfinished.len());
            }
            for offset in unfinished.drain(..) {
                t.done(offset);
            }
            if handed > 0 {
                let last = next - gaps[(handed - 1) % gaps.len()];
                prop_assert_eq!(t.stored(), Some(last + 1));
            } else {
                prop_assert_eq!(t.stored(), None);
            }
        }

        /// Finishing the same offsets in any two orders ends at the same position.
        #[test]
        fn the_final_position_does_not_depend_on_the_order(
            n in 1_usize..60,
            seed in any::<u64>(),
        ) {
            let mut order: Vec<i64> = (0..n as i64).collect();
            // A cheap deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut a = PartitionTracker::new();
            let mut b = PartitionTracker::new();
            for o in 0..n as i64 {
                a.received(o);
                b.received(o);
            }
            for o in 0..n as i64 {
                a.done(o);
            }
            for o in order {
                b.done(o);
            }
            prop_assert_eq!(a.stored(), Some(n as i64));
            prop_assert_eq!(b.stored(), Some(n as i64));
        }
    }
}
