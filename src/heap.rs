//! Live heap bytes of the operator process: a thin wrapper around jemalloc (glibc's malloc with
//! the `system-allocator` feature, for heaptrack) that counts what is allocated and not yet
//! freed, served as `scoped_secrets_heap_bytes`.
//!
//! RSS alone cannot say whether memory is the operator's data (caches, maps, metric series)
//! or the allocator's slack (size-class rounding, pages not yet returned): the two together
//! can. The cost is a relaxed atomic addition per allocation and per free, on one counter the
//! runtime's threads share: a few percent of the CPU of an allocation-heavy stretch (a first
//! sync), nothing measurable in a no-op refresh. `main.rs` installs it as the global
//! allocator; a library user that does not (the tests) gets no heap metric.

use std::alloc::{GlobalAlloc, Layout};

#[cfg(feature = "system-allocator")]
use std::alloc::System as Inner;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(not(feature = "system-allocator"))]
use tikv_jemallocator::Jemalloc as Inner;

/// The counting allocator (`#[global_allocator] static A: Counting = Counting;`).
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

// SAFETY: every call is passed to the inner allocator unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { Inner.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            installed();
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { Inner.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            installed();
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { Inner.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { Inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Marks the counter as in use. Read before written: a store on every allocation would keep
/// the flag's cache line bouncing between cores.
fn installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Bytes allocated and not freed, if [`Counting`] is the global allocator.
pub fn live_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed))
}
