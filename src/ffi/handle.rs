//! Generation-checked handle tables: what a C caller holds is never a pointer to Rust memory.
//!
//! A handle (`mxp_config *`, `mxp_dispatcher *`, `mxp_body *`) is an opaque pointer-sized
//! value that encodes a slot index, a type tag and the slot's generation. Looking a handle up
//! checks all three under a read lock, so a handle used after `_free`, freed twice, of the wrong
//! type, or made up, gives `MXP_ERR_BAD_HANDLE` instead of touching freed memory. A freed slot
//! gets a new generation and is reused only after [`REUSE_AFTER`] other slots are free, first
//! freed first reused.
//!
//! What is not caught: a stale handle whose slot was reused exactly 2^32 generations later (2^12
//! on 32-bit targets), and a made-up value that happens to equal a live handle. A call that is
//! using a dispatcher while another thread frees it finishes normally (it holds a reference),
//! the free waits for it, and the next call gets `MXP_ERR_BAD_HANDLE`.

use super::result::{mxp_result, FfiError};
use std::collections::VecDeque;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

const WIDE: bool = usize::BITS >= 64;
/// Bits of the handle that hold the slot index plus one (so that no handle is NULL).
const INDEX_BITS: u32 = if WIDE { 28 } else { 16 };
const TAG_BITS: u32 = 4;
const GENERATION_BITS: u32 = if WIDE { 32 } else { 12 };
const INDEX_MASK: usize = (1 << INDEX_BITS) - 1;
const TAG_MASK: usize = (1 << TAG_BITS) - 1;
const GENERATION_MASK: usize = (1 << GENERATION_BITS) - 1;
/// Freed slots are reused only when this many are free, so a stale handle stays detectably
/// stale for a while even with the generation check aside.
const REUSE_AFTER: usize = 64;

struct Entry<T> {
    generation: usize,
    value: Option<Arc<T>>,
}

struct Slots<T> {
    entries: Vec<Entry<T>>,
    free: VecDeque<usize>,
}

/// One table per handle type.
pub(crate) struct HandleTable<T> {
    /// The object's name in messages ("dispatcher").
    kind: &'static str,
    tag: usize,
    slots: RwLock<Slots<T>>,
}

impl<T> HandleTable<T> {
    pub const fn new(kind: &'static str, tag: usize) -> Self {
        assert!(tag > 0 && tag <= TAG_MASK);
        HandleTable {
            kind,
            tag,
            slots: RwLock::new(Slots {
                entries: Vec::new(),
                free: VecDeque::new(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Slots<T>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Slots<T>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    fn encode(&self, index: usize, generation: usize) -> usize {
        (index + 1) | (self.tag << INDEX_BITS) | (generation << (INDEX_BITS + TAG_BITS))
    }

    /// The slot index and generation `handle` names, if it is one of this table's handles.
    fn decode(&self, handle: usize) -> Option<(usize, usize)> {
        let index_plus_one = handle & INDEX_MASK;
        let tag = (handle >> INDEX_BITS) & TAG_MASK;
        let generation = handle >> (INDEX_BITS + TAG_BITS);
        (index_plus_one != 0 && tag == self.tag && generation <= GENERATION_MASK)
            .then_some((index_plus_one - 1, generation))
    }

    /// Stores `value` and returns its new handle.
    pub fn insert(&self, value: T) -> Result<usize, FfiError> {
        let value = Arc::new(value);
        let mut slots = self.write();
        let index = if slots.free.len() >= REUSE_AFTER {
            slots.free.pop_front().expect("checked non-empty")
        } else if slots.entries.len() < INDEX_MASK {
            slots.entries.push(Entry {
                generation: 1,
                value: None,
            });
            slots.entries.len() - 1
        } else if let Some(index) = slots.free.pop_front() {
            index
        } else {
            return Err(FfiError::new(
                mxp_result::MXP_ERR_IO,
                format!("too many live {} handles", self.kind),
            ));
        };
        let entry = &mut slots.entries[index];
        entry.value = Some(value);
        Ok(self.encode(index, entry.generation))
    }

    fn live<'a>(&self, slots: &'a Slots<T>, handle: usize) -> Result<&'a Arc<T>, FfiError> {
        if handle == 0 {
            return Err(FfiError::null(self.kind));
        }
        self.decode(handle)
            .and_then(|(index, generation)| {
                let entry = slots.entries.get(index)?;
                (entry.generation == generation)
                    .then_some(entry.value.as_ref())
                    .flatten()
            })
            .ok_or_else(|| FfiError::bad_handle(self.kind, handle))
    }

    /// Runs `f` on the live object under the table's read lock. For calls that do not block:
    /// `insert` and `remove` wait while `f` runs.
    pub fn with<R>(&self, handle: usize, f: impl FnOnce(&T) -> R) -> Result<R, FfiError> {
        let slots = self.read();
        Ok(f(self.live(&slots, handle)?))
    }

    /// A reference to the live object, for calls that may block.
    pub fn get(&self, handle: usize) -> Result<Arc<T>, FfiError> {
        let slots = self.read();
        self.live(&slots, handle).cloned()
    }

    /// Takes the object out; the handle is dead from here on. The caller drops the returned
    /// reference outside the lock (dropping may join threads).
    pub fn remove(&self, handle: usize) -> Result<Arc<T>, FfiError> {
        let mut slots = self.write();
        self.live(&slots, handle)?;
        let (index, _) = self.decode(handle).expect("live handles decode");
        let entry = &mut slots.entries[index];
        let value = entry.value.take().expect("live entries hold a value");
        entry.generation = if entry.generation == GENERATION_MASK {
            1
        } else {
            entry.generation + 1
        };
        slots.free.push_back(index);
        Ok(value)
    }
}

/// The pointer C holds for a handle value.
pub(crate) fn to_ptr<H>(handle: usize) -> *mut H {
    std::ptr::without_provenance_mut(handle)
}

/// The handle value of a pointer C passed in.
pub(crate) fn from_ptr<H>(ptr: *const H) -> usize {
    ptr.addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_foreign_handles_are_refused() {
        let table: HandleTable<String> = HandleTable::new("thing", 5);
        let other: HandleTable<String> = HandleTable::new("other", 6);
        let a = table.insert("a".into()).unwrap();
        assert_eq!(table.with(a, |s| s.clone()).unwrap(), "a");
        assert_eq!(
            other.get(a).unwrap_err().code,
            mxp_result::MXP_ERR_BAD_HANDLE
        );
        assert_eq!(
            table.get(0).unwrap_err().code,
            mxp_result::MXP_ERR_NULL_POINTER
        );
        assert_eq!(
            table.get(a + 1).unwrap_err().code,
            mxp_result::MXP_ERR_BAD_HANDLE
        );
        assert_eq!(*table.remove(a).unwrap(), "a");
        let again = table.remove(a).unwrap_err();
        assert_eq!(again.code, mxp_result::MXP_ERR_BAD_HANDLE);
        assert!(
            again.message.starts_with("thing handle 0x"),
            "{}",
            again.message
        );
        assert_eq!(
            table.get(a).unwrap_err().code,
            mxp_result::MXP_ERR_BAD_HANDLE
        );
    }

    #[test]
    fn reused_slots_get_a_new_generation() {
        let table: HandleTable<usize> = HandleTable::new("thing", 1);
        let first: Vec<usize> = (0..=REUSE_AFTER)
            .map(|i| table.insert(i).unwrap())
            .collect();
        for &h in &first {
            table.remove(h).unwrap();
        }
        let reused = table.insert(99).unwrap();
        // The first slot freed comes back first, under another generation.
        assert_eq!(reused & INDEX_MASK, first[0] & INDEX_MASK);
        assert_ne!(reused, first[0]);
        assert_eq!(
            table.get(first[0]).unwrap_err().code,
            mxp_result::MXP_ERR_BAD_HANDLE
        );
        assert_eq!(*table.get(reused).unwrap(), 99);
    }
}
