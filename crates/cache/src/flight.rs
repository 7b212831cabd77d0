//! Single-flight for small upstream lookups (manifests, tag revalidations): concurrent requests
//! for one key share one upstream request. The work runs in its own task, so a client that
//! disconnects, or stops waiting at a deadline, does not cancel it for the others.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt as _, Shared};

use super::CacheError;

type Flight<V> = Shared<BoxFuture<'static, Result<V, Arc<CacheError>>>>;
/// A run in progress and whether a caller's deadline already passed on it.
type Running<V> = (Flight<V>, Arc<AtomicBool>);

/// The flights in progress, by key, each with its overdue flag.
#[derive(Debug)]
pub(crate) struct SingleFlight<K, V: Clone> {
    // A std mutex: held for map operations only, never across an await.
    running: Mutex<HashMap<K, Running<V>>>,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` for `key`, or joins the run already in progress. Returns the shared result
    /// and whether this caller started the work.
    pub(crate) async fn run<F>(
        self: &Arc<Self>,
        key: K,
        work: F,
    ) -> (Result<V, Arc<CacheError>>, bool)
    where
        F: Future<Output = Result<V, CacheError>> + Send + 'static,
    {
        let (flight, _, leader) = self.start_or_join(key, work);
        (flight.await, leader)
    }

    /// Like [`SingleFlight::run`], waiting at most `deadline`. `None` when the deadline passed,
    /// or when an earlier caller's deadline already passed on this run: a run known to be slow
    /// is not waited for again. The run goes on either way.
    pub(crate) async fn run_within<F>(
        self: &Arc<Self>,
        key: K,
        work: F,
        deadline: Duration,
    ) -> Option<(Result<V, Arc<CacheError>>, bool)>
    where
        F: Future<Output = Result<V, CacheError>> + Send + 'static,
    {
        let (flight, overdue, leader) = self.start_or_join(key, work);
        if overdue.load(Ordering::Relaxed) {
            return None;
        }
        match tokio::time::timeout(deadline, flight).await {
            Ok(result) => Some((result, leader)),
            Err(_) => {
                overdue.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    fn start_or_join<F>(self: &Arc<Self>, key: K, work: F) -> (Flight<V>, Arc<AtomicBool>, bool)
    where
        F: Future<Output = Result<V, CacheError>> + Send + 'static,
    {
        let mut running = self.running.lock();
        if let Some((flight, overdue)) = running.get(&key) {
            return (flight.clone(), Arc::clone(overdue), false);
        }
        let flights = Arc::clone(self);
        let task_key = key.clone();
        // In the span of the request that started it, so its upstream calls log that
        // request's id.
        // On behalf of the caller that started it (whose access was checked, as every
        // joiner's was).
        let handle = tokio::spawn(tracing::Instrument::in_current_span(
            regcache_upstream::caller::carry(async move {
                let result = work.await.map_err(Arc::new);
                // Removed by the task itself, so a cancelled caller cannot leave a stale
                // entry behind. Joined callers keep their clone of the shared future.
                flights.running.lock().remove(&task_key);
                result
            }),
        ));
        let flight = async move {
            handle
                .await
                .unwrap_or_else(|_| Err(Arc::new(CacheError::FillAborted)))
        }
        .boxed()
        .shared();
        let overdue = Arc::new(AtomicBool::new(false));
        running.insert(key, (flight.clone(), Arc::clone(&overdue)));
        (flight, overdue, true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_one_run() {
        let flights: Arc<SingleFlight<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut joins = Vec::new();
        for _ in 0..8 {
            let (flights, runs) = (Arc::clone(&flights), Arc::clone(&runs));
            joins.push(tokio::spawn(async move {
                flights
                    .run("k", async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(runs.fetch_add(1, Ordering::SeqCst))
                    })
                    .await
            }));
        }
        let mut leaders = 0;
        for join in joins {
            let (result, leader) = join.await.expect("task");
            assert_eq!(result.ok(), Some(0));
            leaders += usize::from(leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        // Once finished, the next call runs again.
        let (result, leader) = flights.run("k", async { Ok(7) }).await;
        assert_eq!((result.ok(), leader), (Some(7), true));
    }

    #[tokio::test]
    async fn a_run_past_one_callers_deadline_is_not_waited_for_again() {
        let flights: Arc<SingleFlight<&'static str, usize>> = Arc::default();
        let slow = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(1)
        };
        let first = flights
            .run_within("k", slow, Duration::from_millis(20))
            .await;
        assert!(first.is_none(), "the deadline passed");
        // With a generous deadline, a joiner would get the run's result; an overdue run
        // answers None at once instead.
        let joined = flights
            .run_within("k", async { Ok(2) }, Duration::from_secs(60))
            .await;
        assert!(joined.is_none(), "an overdue run is not waited for");
        // The run went on; its result lands, and the next run starts fresh.
        let (result, leader) = flights.run("k", async { Ok(3) }).await;
        assert_eq!((result.ok(), leader), (Some(1), false));
        let fresh = flights
            .run_within("k", async { Ok(4) }, Duration::from_secs(60))
            .await
            .map(|(result, leader)| (result.ok(), leader));
        assert_eq!(fresh, Some((Some(4), true)));
    }
}
