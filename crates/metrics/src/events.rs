//! Typed events: the few things the server does that an operator's automation (or a test)
//! waits for — it listens, the start-up walk counted the store, an eviction pass ended, a
//! SIGHUP reloaded a part, an import on the admin socket ended — as values on a channel, not
//! as log lines to match. `[log] events` writes them to a file, one JSON object per line
//! (`{"event":"reloaded","part":"tls","error":"..."}`); the log keeps its human lines.

use serde::Serialize;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it misses some (it is told how many).
const CAPACITY: usize = 256;

/// Something the server did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The main listener accepts connections.
    Listening {
        /// Its address.
        address: String,
    },
    /// The start-up walk of the store ended (every file counted and recorded in the index).
    StoreCounted {
        /// Files in the store.
        files: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// An eviction pass ended (usage was over the high watermark).
    Evicted {
        /// Files removed.
        files: u64,
        /// Bytes freed.
        bytes: u64,
    },
    /// A SIGHUP reloaded (or failed to reload) one part of the configuration.
    Reloaded {
        /// Which part.
        part: Reload,
        /// Why it failed (what was in force stays in force); none when it was reloaded.
        error: Option<String>,
    },
    /// An import asked for on the admin socket ended.
    Imported {
        /// The archive.
        archive: String,
        /// Why it failed; none when the archive was imported.
        error: Option<String>,
    },
}

/// What a SIGHUP reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reload {
    /// The server's TLS certificate and key (`[server.tls]`).
    Tls,
    /// The `[auth]` htpasswd file.
    Htpasswd,
    /// The `[[policy]]` keys.
    PolicyKeys,
}

/// The event channel of one server: cheap to emit on when nobody listens.
#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    /// Sends `event` to every subscriber (none: dropped).
    pub fn emit(&self, event: Event) {
        let _ = self.sender.send(event);
    }

    /// The events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

impl Event {
    /// The event as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        // A derived Serialize of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_events_emitted_after_they_subscribed_as_tagged_json() {
        let events = Events::default();
        events.emit(Event::Listening {
            address: "before".to_owned(),
        });
        let mut receiver = events.subscribe();
        events.emit(Event::Reloaded {
            part: Reload::PolicyKeys,
            error: Some("no such file".to_owned()),
        });
        let event = receiver.recv().await.expect("event");
        assert_eq!(
            event.to_json(),
            r#"{"event":"reloaded","part":"policy_keys","error":"no such file"}"#
        );
        assert!(receiver.try_recv().is_err(), "only what came after");
        let counted = Event::StoreCounted { files: 3, bytes: 7 }.to_json();
        assert_eq!(counted, r#"{"event":"store_counted","files":3,"bytes":7}"#);
    }
}
