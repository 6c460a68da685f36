//! The output queues of the sans-IO machines (probes to send, events, commands).
//!
//! An agent holds several per peer; most of the time they are empty, and a `VecDeque` keeps its
//! largest capacity forever. [`pop`] gives the memory back once a queue is drained.

use std::collections::VecDeque;

/// The front of `queue`; when there is none, the queue's buffer is released.
pub fn pop<T>(queue: &mut VecDeque<T>) -> Option<T> {
    let item = queue.pop_front();
    if item.is_none() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_queue_gives_its_buffer_back() {
        let mut q: VecDeque<u32> = (0..100).collect();
        let drained: Vec<u32> = std::iter::from_fn(|| pop(&mut q)).collect();
        assert_eq!(drained, (0..100).collect::<Vec<u32>>());
        assert_eq!(q.capacity(), 0);
    }
}
