//! Single-flight for small upstream lookups (manifests, tag revalidations): concurrent requests
//! for one key share one upstream request. The work runs in its own task, so a client that
//! disconnects does not cancel it for the others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};

use super::CacheError;

type Flight<V> = Shared<BoxFuture<'static, Result<V, Arc<CacheError>>>>;

/// The flights in progress, by key.
#[derive(Debug)]
pub(crate) struct SingleFlight<K, V: Clone> {
    // A std mutex: held for map operations only, never across an await.
    running: Mutex<HashMap<K, Flight<V>>>,
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
        let (flight, leader) = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(flight) = running.get(&key) {
                (flight.clone(), false)
            } else {
                let flights = Arc::clone(self);
                let task_key = key.clone();
                // In the span of the request that started it, so its upstream calls log that
                // request's id.
                let handle = tokio::spawn(tracing::Instrument::in_current_span(async move {
                    let result = work.await.map_err(Arc::new);
                    // Removed by the task itself, so a cancelled caller cannot leave a stale
                    // entry behind. Joined callers keep their clone of the shared future.
                    flights
                        .running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&task_key);
                    result
                }));
                let flight = async move {
                    handle
                        .await
                        .unwrap_or_else(|_| Err(Arc::new(CacheError::FillAborted)))
                }
                .boxed()
                .shared();
                running.insert(key, flight.clone());
                (flight, true)
            }
        };
        (flight.await, leader)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

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
}
