//! `items.iter().map(f)` on several threads, results in item order, so that output never depends
//! on how many threads ran. Plain scoped threads: the engine sets its thread count per instance
//! (the tests compute one fleet on 1 and on 4 threads and compare), which a global pool would not
//! allow without a pool per engine.

use std::collections::BTreeMap;
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

/// `map`, with every result handed to `sink` on the calling thread, in item order, as soon as it
/// and all before it are ready: what the sink does (the engine swapping outputs into its desired
/// state, which only one thread may do) overlaps the work still running on the other threads,
/// instead of leaving them idle after it. The calling thread works too, when nothing is ready.
pub fn map_into<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
    mut sink: impl FnMut(usize, R),
) {
    let threads = if items.len() < CHEAP_MIN { 1 } else { threads.min(items.len().div_ceil(CHEAP_BLOCK)) };
    if threads <= 1 {
        items.iter().enumerate().for_each(|(i, item)| sink(i, f(item)));
        return;
    }
    let next = AtomicUsize::new(0);
    let take = || {
        let start = next.fetch_add(CHEAP_BLOCK, Ordering::Relaxed);
        (start < items.len())
            .then(|| (start, items[start..(start + CHEAP_BLOCK).min(items.len())].iter().map(&f).collect()))
    };
    std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::channel::<(usize, Vec<R>)>();
        let workers: Vec<_> = (1..threads)
            .map(|_| {
                let (send, take) = (send.clone(), &take);
                scope.spawn(move || {
                    while let Some(block) = take() {
                        if send.send(block).is_err() {
                            return; // the caller stopped (it panicked)
                        }
                    }
                })
            })
            .collect();
        drop(send);
        // Blocks done out of order, by where they start; `emitted` items went to the sink.
        let mut ready: BTreeMap<usize, Vec<R>> = BTreeMap::new();
        let mut emitted = 0;
        while emitted < items.len() {
            ready.extend(receive.try_iter());
            if let Some(results) = ready.remove(&emitted) {
                for result in results {
                    sink(emitted, result);
                    emitted += 1;
                }
                continue;
            }
            // The next block is still being worked on: work on another, or wait for one.
            match take() {
                Some(block) => {
                    ready.insert(block.0, block.1);
                }
                None => match receive.recv() {
                    Ok(block) => {
                        ready.insert(block.0, block.1);
                    }
                    Err(_) => break, // every worker is gone: one panicked (joined below)
                },
            }
        }
        for w in workers {
            // A panic in `f` is a bug in the caller; carry it over.
            w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
    });
}

/// Drops `items` on several threads: a pass's scratch data is many small allocations, and freeing
/// them on one thread would leave the other cores idle.
pub fn drop_all<T: Send>(threads: usize, mut items: Vec<T>) {
    if threads <= 1 || items.len() < CHEAP_MIN {
        return;
    }
    let share = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        while items.len() > share {
            let tail = items.split_off(items.len() - share);
            scope.spawn(move || drop(tail));
        }
        drop(items);
    });
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
            let mut sunk = Vec::new();
            map_into(threads, &items, |i| i * i, |at, r| sunk.push((at, r)));
            let numbered: Vec<(usize, u64)> = want.iter().copied().enumerate().collect();
            assert_eq!(sunk, numbered, "{threads} threads, into a sink");
        }
    }
}
