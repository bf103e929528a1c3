//! The daemon's global allocator: mimalloc for small blocks, the system's
//! (glibc's) for large ones.
//!
//! A catch-up of small ChangeSets allocates and frees several values per
//! row (decoded from the wire, captured from the WAL, queued, dropped):
//! glibc's `malloc`, `free` and `malloc_consolidate` took about a third of
//! the main daemon's CPU there (`perf`, README's Performance section);
//! mimalloc takes a fraction of that. Large blocks stay with glibc, which
//! grows a huge block by remapping it (`mremap`) where mimalloc copies it:
//! with mimalloc alone, a 200 MB value (R24) has two copies alive while its
//! buffer grows, and the daemon breaks R24's memory bound
//! (`tests/e2e/big_values.rs`).
//!
//! mimalloc is its 2.x series (the crate's `v2` feature), which returns
//! freed pages to the system after 10 ms; the 3.x series waits 1 s, and
//! held the main's daemon above the 150 MiB goal in a 1M-row catch-up.
//!
//! # Why it is sound
//!
//! Which allocator owns a block follows from its layout alone (size below
//! [`LARGE`]: mimalloc; at or above: the system), and Rust passes the layout
//! a block was allocated with to `dealloc` and `realloc`, so every block is
//! freed by the allocator that made it. A `realloc` that crosses the
//! threshold moves the block: allocated anew by the other allocator, the
//! smaller of the two sizes copied, the old block freed by its own.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks of this size and larger go to the system allocator.
const LARGE: usize = 256 * 1024;

/// mimalloc below [`LARGE`], the system allocator from there.
pub struct Split;

fn small(size: usize) -> bool {
    size < LARGE
}

// SAFETY: every method forwards to the allocator that owns the block by the
// rule above (both are GlobalAllocs themselves), with the caller's layout;
// `realloc` across the threshold allocates with a layout of the new size and
// the old alignment (what the caller will free it with), copies the bytes
// both blocks hold, and frees the old block with its own layout.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if small(layout.size()) {
            MiMalloc.alloc(layout)
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if small(layout.size()) {
            MiMalloc.alloc_zeroed(layout)
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if small(layout.size()) {
            MiMalloc.dealloc(ptr, layout)
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (small(layout.size()), small(new_size)) {
            (true, true) => MiMalloc.realloc(ptr, layout, new_size),
            (false, false) => System.realloc(ptr, layout, new_size),
            _ => {
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Blocks grown and shrunk across the threshold keep their bytes, and
    /// are freed by the allocator that holds them (a mismatch aborts the
    /// test process).
    #[test]
    fn blocks_keep_their_bytes_across_the_threshold() {
        let mut v: Vec<u8> = Vec::new();
        for i in 0..(super::LARGE * 3) {
            v.push((i % 251) as u8);
        }
        assert!(v.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        v.truncate(100);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        let s: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
        assert_eq!(s[9_999], "9999");
    }
}
