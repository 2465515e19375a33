//! Phase changes waiting to go upstream, coalesced per object: under load an object that
//! changes ten times while the stream is busy is sent once, with its latest phase, in the
//! order objects first changed. Memory is bounded by the number of objects, not of changes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::proto::object_key;
use crate::proto::v1::PhaseChange;

#[derive(Default)]
pub struct PhaseQueue {
    inner: Mutex<Inner>,
    ready: Notify,
}

#[derive(Default)]
struct Inner {
    latest: HashMap<String, PhaseChange>,
    order: VecDeque<String>,
}

impl PhaseQueue {
    /// Queues a change, replacing a queued one of the same object.
    pub fn push(&self, change: PhaseChange) {
        let key = change.object.as_ref().map(object_key).unwrap_or_default();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.latest.insert(key.clone(), change).is_none() {
            inner.order.push_back(key);
        }
        drop(inner);
        self.ready.notify_one();
    }

    /// The next change (waits for one).
    pub async fn next(&self) -> PhaseChange {
        loop {
            if let Some(change) = self.try_next() {
                return change;
            }
            self.ready.notified().await;
        }
    }

    pub fn try_next(&self) -> Option<PhaseChange> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(key) = inner.order.pop_front() {
            if let Some(change) = inner.latest.remove(&key) {
                return Some(change);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::ObjectRef;

    fn change(name: &str, phase: &str) -> PhaseChange {
        PhaseChange {
            object: Some(ObjectRef {
                kind: "Project".into(),
                namespace: String::new(),
                name: name.into(),
            }),
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[test]
    fn coalesces_per_object_in_first_change_order() {
        let q = PhaseQueue::default();
        q.push(change("a", "Pending"));
        q.push(change("b", "Pending"));
        q.push(change("a", "Ready"));
        assert_eq!(q.len(), 2);
        let first = q.try_next().unwrap();
        assert_eq!(
            (first.object.unwrap().name, first.phase),
            ("a".to_string(), "Ready".to_string())
        );
        assert_eq!(q.try_next().unwrap().object.unwrap().name, "b");
        assert!(q.try_next().is_none());
    }
}
