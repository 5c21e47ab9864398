//! Stats slots: every peer in the maps owns one index into the per-peer counters array.
//! Allocation and release are O(1): a free list of released slots, then a high-water mark.

/// The slots of a counters array with `capacity` entries.
#[derive(Clone, Debug)]
pub struct Slots {
    capacity: u32,
    /// Never handed out yet: `next..capacity`.
    next: u32,
    /// Released below `next`, lowest last so it is reused first.
    free: Vec<u32>,
}

impl Slots {
    /// The allocator for slots already in use (as read back from the maps). Slots at or
    /// above `capacity` and duplicates are ignored: the caller reassigns their peers.
    pub fn with_used(capacity: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let mut taken: Vec<u32> = used.into_iter().filter(|s| *s < capacity).collect();
        taken.sort_unstable();
        taken.dedup();
        let next = taken.last().map_or(0, |s| s + 1);
        let mut free = Vec::with_capacity(next as usize - taken.len());
        let mut it = taken.iter().peekable();
        for s in 0..next {
            if it.peek() == Some(&&s) {
                it.next();
            } else {
                free.push(s);
            }
        }
        free.reverse();
        Self {
            capacity,
            next,
            free,
        }
    }

    /// A free slot, or `None` when all are taken.
    pub fn take(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        (self.next < self.capacity).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Give `slot` back.
    pub fn release(&mut self, slot: u32) {
        if slot < self.next {
            self.free.push(slot);
        }
    }

    /// How many slots are free.
    pub fn available(&self) -> u32 {
        self.capacity - self.next + self.free.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_slot_once_then_none() {
        let mut s = Slots::with_used(3, []);
        let got: Vec<_> = std::iter::from_fn(|| s.take()).collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(s.available(), 0);
        s.release(1);
        assert_eq!(s.available(), 1);
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), None);
    }

    #[test]
    fn rebuilt_from_used_slots_fills_holes_lowest_first() {
        let mut s = Slots::with_used(8, [5, 0, 2, 2, 9]);
        // 9 is beyond capacity and 2 is listed twice: both ignored.
        assert_eq!(s.available(), 5);
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), Some(3));
        assert_eq!(s.take(), Some(4));
        assert_eq!(s.take(), Some(6));
        assert_eq!(s.take(), Some(7));
        assert_eq!(s.take(), None);
    }

    #[test]
    fn large_capacity_allocates_in_constant_time() {
        // 65,536 allocations and releases: quadratic work would take seconds here.
        let mut s = Slots::with_used(65_536, []);
        for i in 0..65_536 {
            assert_eq!(s.take(), Some(i));
        }
        for i in (0..65_536).step_by(2) {
            s.release(i);
        }
        assert_eq!(s.available(), 32_768);
        assert_eq!(
            Slots::with_used(65_536, (0..65_536).step_by(2)).available(),
            32_768
        );
    }
}
