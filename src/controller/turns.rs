//! The reconcile workers, handed out in the order reconciles asked for one.
//!
//! kube-runtime's own limit is not the one that counts: when it is reached, kube-runtime takes
//! the next object from a hash set, and under a backlog longer than a refresh interval the same
//! objects took every freed worker while others were never synced. Nor does a reconcile wait
//! for a worker inside kube-runtime's runner: the runner polls every future it holds each time
//! it is woken, so 30,000 waiting reconciles made every watch event and every finished
//! reconcile cost 30,000 polls — minutes of CPU in a first sync, on the thread the workload
//! controller shares. A reconcile that finds no worker takes a place in line and ends; when a
//! worker frees, the first in line is called back through the controller's trigger channel.
//! kube-runtime's limit (eight times the workers) then only bounds its runner: the objects passing
//! through it, due in whatever order, are in line a moment later.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::v1alpha1::ScopedSecret;

type Obj = ObjectRef<ScopedSecret>;

/// The workers and the line.
pub struct Turns {
    line: Mutex<Line>,
    /// Reconciles an object (the controller's trigger channel).
    call: UnboundedSender<Obj>,
}

struct Line {
    free: usize,
    closed: bool,
    /// Oldest first; an object no longer in `queued` (forgotten) is skipped.
    waiting: VecDeque<Obj>,
    /// The objects in line.
    queued: HashSet<Obj>,
    /// Called back and on their way: a worker is free for each, and they take it first.
    called: HashSet<Obj>,
}

/// A worker, given back when dropped.
pub struct Worker<'a>(&'a Turns);

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        let mut line = self.0.line.lock().unwrap();
        line.free += 1;
        self.0.call_next(&mut line);
    }
}

impl Turns {
    pub fn new(workers: usize, call: UnboundedSender<Obj>) -> Self {
        Turns {
            line: Mutex::new(Line {
                free: workers.max(1),
                closed: false,
                waiting: VecDeque::new(),
                queued: HashSet::new(),
                called: HashSet::new(),
            }),
            call,
        }
    }

    /// A worker for `obj` now, or `None`: it is in line (and keeps its place if it already
    /// was), or the workers are closed. An object called back takes a free worker first; any
    /// other only a worker that nobody in line was called for.
    pub fn take(&self, obj: &Obj) -> Option<Worker<'_>> {
        let mut line = self.line.lock().unwrap();
        if line.closed {
            return None;
        }
        let called = line.called.remove(obj);
        let spare = line.free > line.called.len() && line.queued.is_empty();
        if line.free > 0 && (called || spare) {
            line.free -= 1;
            return Some(Worker(self));
        }
        // Asking again keeps the place. The line carries only the name and namespace.
        if !line.queued.contains(obj) {
            let ns = obj.namespace.as_deref().unwrap_or_default();
            let key = ObjectRef::new(&obj.name).within(ns);
            line.queued.insert(key.clone());
            if called {
                line.waiting.push_front(key);
            } else {
                line.waiting.push_back(key);
            }
        }
        // A worker may be free that nobody was called for (the one called for it gone).
        self.call_next(&mut line);
        None
    }

    /// `obj` was called back but gives its turn up (a refresh yielding to first syncs): the
    /// next in line is called instead.
    pub fn pass(&self, obj: &Obj) {
        let mut line = self.line.lock().unwrap();
        if line.called.remove(obj) {
            self.call_next(&mut line);
        }
    }

    /// Drops `obj` from the line (it is gone).
    pub fn forget(&self, obj: &Obj) {
        let mut line = self.line.lock().unwrap();
        line.queued.remove(obj);
        if line.called.remove(obj) {
            self.call_next(&mut line);
        }
    }

    /// At shutdown: no worker is handed out any more, and nobody in line is called.
    pub fn close(&self) {
        let mut line = self.line.lock().unwrap();
        line.closed = true;
        line.waiting = VecDeque::new();
        line.queued = HashSet::new();
        line.called = HashSet::new();
    }

    /// Calls the first in line for each free worker nobody was called for.
    fn call_next(&self, line: &mut Line) {
        while !line.closed && line.free > line.called.len() {
            let Some(next) = line.waiting.pop_front() else {
                break;
            };
            if line.queued.remove(&next) {
                line.called.insert(next.clone());
                let _ = self.call.send(next);
            }
        }
        // A first sync puts every ScopedSecret in line for a moment.
        if crate::outgrown(line.waiting.len(), line.waiting.capacity()) {
            line.waiting.shrink_to_fit();
        }
        if crate::outgrown(line.queued.len(), line.queued.capacity()) {
            line.queued.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    impl Turns {
        fn waiting(&self) -> usize {
            self.line.lock().unwrap().queued.len()
        }
    }

    fn obj(name: &str) -> Obj {
        ObjectRef::new(name).within("ns")
    }

    fn called(rx: &mut mpsc::UnboundedReceiver<Obj>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|o| o.name)).collect()
    }

    #[test]
    fn workers_go_to_the_line_in_order_and_a_freed_one_calls_the_next_back() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let turns = Turns::new(2, tx);
        let a = turns.take(&obj("a")).expect("a worker is free");
        let b = turns.take(&obj("b")).expect("a worker is free");
        for name in ["c", "d", "e", "c"] {
            assert!(turns.take(&obj(name)).is_none(), "{name} waits");
        }
        assert_eq!(turns.waiting(), 3, "c asked twice and keeps one place");
        drop(a);
        assert_eq!(called(&mut rx), ["c"]);
        // A newcomer does not take the worker c was called for.
        assert!(turns.take(&obj("f")).is_none());
        let c = turns
            .take(&obj("c"))
            .expect("c takes the worker it was called for");
        drop(b);
        drop(c);
        assert_eq!(called(&mut rx), ["d", "e"]);
        let d = turns.take(&obj("d")).unwrap();
        let e = turns.take(&obj("e")).unwrap();
        drop((d, e));
        assert_eq!(called(&mut rx), ["f"]);
        assert!(turns.take(&obj("f")).is_some());
        assert_eq!(turns.waiting(), 0);
    }

    #[test]
    fn an_object_called_back_that_is_gone_or_passes_leaves_its_worker_to_the_next() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let turns = Turns::new(1, tx);
        let a = turns.take(&obj("a")).unwrap();
        for name in ["b", "c", "d", "e"] {
            assert!(turns.take(&obj(name)).is_none());
        }
        turns.forget(&obj("c"));
        drop(a);
        assert_eq!(called(&mut rx), ["b"]);
        turns.forget(&obj("b"));
        assert_eq!(called(&mut rx), ["d"], "c is gone: skipped");
        turns.pass(&obj("d"));
        assert_eq!(called(&mut rx), ["e"]);
        assert!(turns.take(&obj("e")).is_some());
    }

    #[test]
    fn a_called_object_finding_no_worker_keeps_the_head_of_the_line_and_closing_ends_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let turns = Turns::new(1, tx);
        let a = turns.take(&obj("a")).unwrap();
        assert!(turns.take(&obj("b")).is_none());
        assert!(turns.take(&obj("c")).is_none());
        drop(a);
        assert_eq!(called(&mut rx), ["b"]);
        // The worker is free and b was called for it; a newcomer waits behind c.
        let late = turns.take(&obj("z"));
        assert!(late.is_none());
        let b = turns.take(&obj("b")).unwrap();
        drop(b);
        assert_eq!(called(&mut rx), ["c"]);
        turns.close();
        assert!(
            turns.take(&obj("c")).is_none(),
            "closed: nobody takes a worker"
        );
        assert_eq!(turns.waiting(), 0);
        assert!(called(&mut rx).is_empty());
    }

    #[test]
    fn the_room_a_burst_took_goes_back_once_the_line_is_through() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let turns = Turns::new(1, tx);
        let first = turns.take(&obj("first")).unwrap();
        for i in 0..2000 {
            assert!(turns.take(&obj(&format!("s{i}"))).is_none());
        }
        drop(first);
        for _ in 0..2000 {
            let next = called(&mut rx);
            assert_eq!(next.len(), 1);
            drop(turns.take(&obj(&next[0])).unwrap());
        }
        let line = turns.line.lock().unwrap();
        assert!(line.waiting.capacity() <= 64 && line.queued.capacity() <= 64);
    }
}
