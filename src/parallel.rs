//! `items.iter().map(f)` on several threads, results in item order, so that output never depends
//! on how many threads ran. Plain scoped threads: the engine sets its thread count per instance
//! (the tests compute one fleet on 1 and on 4 threads and compare), which a global pool would not
//! allow without a pool per engine.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Below this many cheap items, work stays on the calling thread: spawning costs more than it saves.
const CHEAP_MIN: usize = 64;

/// Cheap items a worker takes at a time: small enough that a few expensive ones (a `*` client's
/// Sidecars) do not leave a core idle, big enough that handing out work costs nothing.
const CHEAP_BLOCK: usize = 16;

/// For many cheap items (the engine's identities).
pub fn map<T: Sync, R: Send>(threads: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = if items.len() < CHEAP_MIN { 1 } else { threads };
    ordered(threads, CHEAP_BLOCK, items, f)
}

/// For a few expensive items (a file to parse, a member's objects to print): one at a time.
pub fn map_each<T: Sync, R: Send>(threads: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    ordered(threads, 1, items, f)
}

/// The number of threads to use when the caller has no say: one per core.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn ordered<T: Sync, R: Send>(threads: usize, block: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.min(items.len().div_ceil(block));
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done: Vec<(usize, Vec<R>)> = Vec::new();
        loop {
            let start = next.fetch_add(block, Ordering::Relaxed);
            if start >= items.len() {
                return done;
            }
            let end = (start + block).min(items.len());
            done.push((start, items[start..end].iter().map(&f).collect()));
        }
    };
    let mut blocks: Vec<(usize, Vec<R>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut blocks = work();
        for w in workers {
            // A panic in `f` is a bug in the caller; carry it over rather than lose results.
            blocks.extend(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        blocks
    });
    blocks.sort_unstable_by_key(|(start, _)| *start);
    blocks.into_iter().flat_map(|(_, results)| results).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_item_order_on_any_number_of_threads() {
        let items: Vec<u64> = (0..1000).collect();
        let want: Vec<u64> = items.iter().map(|i| i * i).collect();
        for threads in [1, 2, 3, 8] {
            assert_eq!(map(threads, &items, |i| i * i), want, "{threads} threads");
            assert_eq!(map_each(threads, &items[..7], |i| i * i), want[..7], "{threads} threads");
        }
    }
}
