//! Who the replicas are: `cluster.self`, the peers written as URLs, and the addresses the peers'
//! DNS names resolve to (a Kubernetes headless Service has one per ready pod), resolved again
//! every `cluster.resolve_interval`. Members are named `scheme://host:port`, the form
//! `cluster.self` is written in, so every replica computes the same owners.

use parking_lot::RwLock;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use regcache_config::{ClusterConfig, PeerSpec};

/// The current member list, sorted and without duplicates; always holds this replica.
#[derive(Debug)]
pub(crate) struct Membership {
    self_id: String,
    scheme: String,
    fixed: Vec<String>,
    names: Vec<(String, u16)>,
    // A std lock: held only to swap or clone the `Arc`, never across an await.
    current: RwLock<Arc<Vec<String>>>,
}

impl Membership {
    pub(crate) fn new(config: &ClusterConfig) -> Self {
        let mut fixed = vec![config.self_id.clone()];
        let mut names = Vec::new();
        for peer in &config.peers {
            match peer {
                PeerSpec::Member(id) => fixed.push(id.clone()),
                PeerSpec::Dns { host, port } => names.push((host.clone(), *port)),
            }
        }
        fixed.sort();
        fixed.dedup();
        Self {
            self_id: config.self_id.clone(),
            scheme: config.scheme.clone(),
            current: RwLock::new(Arc::new(fixed.clone())),
            fixed,
            names,
        }
    }

    pub(crate) fn self_id(&self) -> &str {
        &self.self_id
    }

    /// The members now.
    pub(crate) fn members(&self) -> Arc<Vec<String>> {
        Arc::clone(&self.current.read())
    }

    /// Whether some peers are DNS names (then [`Membership::refresh`] has work to do).
    pub(crate) fn has_names(&self) -> bool {
        !self.names.is_empty()
    }

    /// Resolves the DNS names again. A name that does not resolve keeps the member list as it
    /// was (a DNS hiccup must not make every replica its own owner), and the error is returned.
    ///
    /// # Errors
    /// The name and the resolver's error.
    pub(crate) async fn refresh(&self) -> Result<usize, String> {
        let mut members = self.fixed.clone();
        for (host, port) in &self.names {
            let addresses = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|err| format!("{host}: {err}"))?;
            members.extend(addresses.map(|address| format!("{}://{address}", self.scheme)));
        }
        members.sort();
        members.dedup();
        let count = members.len();
        let mut current = self.current.write();
        if **current != members {
            tracing::info!(members = ?members, "cluster members changed");
            *current = Arc::new(members);
        }
        Ok(count)
    }

    /// Resolves the DNS names now and then every `interval` until `shutdown`, reporting the
    /// member count to `gauge`.
    pub(crate) async fn maintain(
        self: Arc<Self>,
        interval: std::time::Duration,
        gauge: prometheus::IntGauge,
        shutdown: CancellationToken,
    ) {
        loop {
            match self.refresh().await {
                Ok(count) => gauge.set(i64::try_from(count).unwrap_or(i64::MAX)),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot resolve cluster peers; keeping the members known")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(peers: Vec<PeerSpec>) -> ClusterConfig {
        ClusterConfig {
            self_id: "http://127.0.0.1:5000".into(),
            scheme: "http".into(),
            peers,
            secret: None,
            resolve_interval: std::time::Duration::from_secs(10),
            connect_timeout: std::time::Duration::from_secs(2),
            idle_timeout: std::time::Duration::from_secs(30),
            ca_file: None,
        }
    }

    #[tokio::test]
    async fn names_resolve_to_members_with_the_port_and_self_is_always_in() {
        let membership = Membership::new(&config(vec![
            PeerSpec::Member("http://127.0.0.9:5000".into()),
            PeerSpec::Dns {
                host: "localhost".into(),
                port: 5001,
            },
        ]));
        assert_eq!(
            *membership.members(),
            ["http://127.0.0.1:5000", "http://127.0.0.9:5000"]
        );
        membership.refresh().await.expect("localhost resolves");
        let members = membership.members();
        assert!(
            members.contains(&"http://127.0.0.1:5001".to_owned()),
            "{members:?}"
        );
        assert!(members.contains(&"http://127.0.0.1:5000".to_owned()));
        assert!(
            members.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );

        let broken = Membership::new(&config(vec![PeerSpec::Dns {
            host: "no-such-name.invalid".into(),
            port: 5000,
        }]));
        assert!(broken.refresh().await.is_err());
        assert_eq!(*broken.members(), ["http://127.0.0.1:5000"]);
    }
}
