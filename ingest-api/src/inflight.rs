//! A budget for the memory requests hold while they wait: a body being read from a slow
//! client, envelopes waiting for the broker's acknowledgement. Without it a spike of large
//! requests (4,096 connections may each upload a 1 MiB body, then wait on a slow broker
//! with its events packed) grows the process past its container's memory limit, and the
//! kill takes every request in flight with it. Past the budget a request is refused at once
//! with `503 overloaded` and a `Retry-After`, before anything of it is accepted.
//!
//! The work between those waits (decompressing, validating, packing) runs without yielding,
//! so at most one request per runtime thread is in it at a time; its memory is bounded by
//! the request limits and is not counted here.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes the requests in flight may hold; 0 means no limit.
#[derive(Debug, Default)]
pub struct InflightBudget {
    max: usize,
    used: AtomicUsize,
}

impl InflightBudget {
    /// A budget of `max` bytes (0: unlimited).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// Reserves `bytes`, or `None` when they do not fit beside what is already reserved. A
    /// reservation larger than the whole budget is granted when nothing else is held, so a
    /// budget set below the request limits slows large requests down but never refuses them
    /// for good.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation<'_>> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.saturating_add(bytes);
            if self.max != 0 && after > self.max && used != 0 {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Reservation {
                        budget: self,
                        bytes,
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes held of an [`InflightBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a InflightBudget,
    bytes: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_within_the_budget_and_are_given_back_when_dropped() {
        let budget = InflightBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(41).is_none());
        let b = budget.try_reserve(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(budget.try_reserve(60).is_some());
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_reservation_larger_than_the_budget_passes_alone_only() {
        let budget = InflightBudget::new(100);
        let big = budget.try_reserve(500).unwrap();
        assert!(budget.try_reserve(1).is_none());
        drop(big);
        let small = budget.try_reserve(1).unwrap();
        assert!(budget.try_reserve(500).is_none());
        drop(small);
    }

    #[test]
    fn zero_is_no_limit() {
        let budget = InflightBudget::new(0);
        let _a = budget.try_reserve(usize::MAX / 2).unwrap();
        let _b = budget.try_reserve(usize::MAX / 2).unwrap();
    }
}
