//! Socket activation: listeners handed in by systemd (a `.socket` unit) or any parent that
//! speaks its protocol (`sd_listen_fds(3)`), instead of binding `server.listen` and
//! `server.metrics_listen`.
//!
//! The protocol: `LISTEN_PID` is the process the sockets are for, `LISTEN_FDS` how many there
//! are (from fd 3 on), and the optional `LISTEN_FDNAMES` their names, colon-separated (systemd's
//! `FileDescriptorName=`). regcache takes one or two: the one named `metrics` is the metrics
//! listener, the other the main one; without a `metrics` name, fd 3 is the main listener and
//! fd 4 (with `LISTEN_FDS=2`) the metrics one. A listener not handed in is bound from the config
//! as usual. The variables are removed once read, so nothing regcache starts inherits them;
//! when `LISTEN_PID` names another process (or is missing) the sockets are not ours and the
//! config's addresses are bound.

use std::ffi::OsString;
use std::net::TcpListener;

/// The variable naming the process the sockets are for.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// The variable counting the sockets.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// The variable naming the sockets (colon-separated).
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The first inherited descriptor.
pub const FIRST_FD: usize = 3;
/// The name (`FileDescriptorName=`) that marks the metrics listener.
pub const METRICS_NAME: &str = "metrics";

/// Why the inherited sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// A variable is not what the protocol says.
    #[error("socket activation: {variable}={value:?} is not {expected}")]
    Malformed {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// More sockets than regcache has listeners.
    #[error(
        "socket activation: LISTEN_FDS={0}: regcache takes at most 2 sockets (the main listener \
         and one named `metrics`)"
    )]
    TooMany(usize),
    /// `LISTEN_FDNAMES` does not name every socket once.
    #[error("socket activation: LISTEN_FDNAMES={names:?} has {count} names, LISTEN_FDS={fds}")]
    NameCount {
        /// The value.
        names: String,
        /// How many names it has.
        count: usize,
        /// `LISTEN_FDS`.
        fds: usize,
    },
    /// Both sockets are named `metrics`.
    #[error("socket activation: LISTEN_FDNAMES={0:?} names both sockets `metrics`")]
    TwoMetrics(String),
    /// A metrics socket came without `server.metrics_listen`, which says metrics are wanted
    /// on a listener of their own.
    #[error(
        "socket activation: a metrics socket was passed (fd {0}; LISTEN_FDS, LISTEN_FDNAMES) but \
         server.metrics_listen is not set: set it to the socket's address, or pass only the main \
         socket"
    )]
    MetricsNotConfigured(usize),
    /// An inherited descriptor is not a TCP listening socket.
    #[error("socket activation: fd {fd} ({role} listener, from LISTEN_FDS): {source}")]
    Fd {
        /// The descriptor.
        fd: usize,
        /// `main` or `metrics`.
        role: &'static str,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Which inherited socket is which listener: offsets from [`FIRST_FD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The main listener's.
    pub main: Option<usize>,
    /// The metrics listener's.
    pub metrics: Option<usize>,
}

/// The listeners handed in (none when regcache was not socket-activated).
#[derive(Debug, Default)]
pub struct Inherited {
    /// Serves instead of binding `server.listen`.
    pub main: Option<TcpListener>,
    /// Serves instead of binding `server.metrics_listen`.
    pub metrics: Option<TcpListener>,
}

/// Reads the protocol's variables (for process `own_pid`) into a [`Plan`]; `None` when there
/// are no sockets for this process.
///
/// # Errors
/// [`ActivationError`] when a variable is malformed or the sockets cannot be told apart.
pub fn plan(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Option<Plan>, ActivationError> {
    let Some(fds) = fds else {
        return Ok(None);
    };
    let count: usize = fds.trim().parse().map_err(|_| ActivationError::Malformed {
        variable: LISTEN_FDS,
        value: fds.to_owned(),
        expected: "a number of sockets",
    })?;
    let Some(pid) = pid else {
        tracing::warn!(
            LISTEN_FDS = count,
            "LISTEN_FDS without LISTEN_PID: the sockets are not for this process; binding the \
             configured addresses"
        );
        return Ok(None);
    };
    let pid: u32 = pid.trim().parse().map_err(|_| ActivationError::Malformed {
        variable: LISTEN_PID,
        value: pid.to_owned(),
        expected: "a process id",
    })?;
    if pid != own_pid {
        tracing::warn!(
            LISTEN_PID = pid,
            own_pid,
            "LISTEN_PID is another process: its sockets are not taken; binding the configured \
             addresses"
        );
        return Ok(None);
    }
    if count == 0 {
        return Ok(None);
    }
    if count > 2 {
        return Err(ActivationError::TooMany(count));
    }
    let metrics_at = match names {
        None => None,
        Some(value) => {
            let names: Vec<&str> = value.split(':').collect();
            if names.len() != count {
                return Err(ActivationError::NameCount {
                    names: value.to_owned(),
                    count: names.len(),
                    fds: count,
                });
            }
            let mut named = names
                .iter()
                .enumerate()
                .filter(|(_, name)| **name == METRICS_NAME)
                .map(|(at, _)| at);
            match (named.next(), named.next()) {
                (_, Some(_)) => return Err(ActivationError::TwoMetrics(value.to_owned())),
                (at, None) => at,
            }
        }
    };
    Ok(Some(match (count, metrics_at) {
        (1, Some(_)) => Plan {
            main: None,
            metrics: Some(0),
        },
        (1, None) => Plan {
            main: Some(0),
            metrics: None,
        },
        (_, Some(at)) => Plan {
            main: Some(1 - at),
            metrics: Some(at),
        },
        (_, None) => Plan {
            main: Some(0),
            metrics: Some(1),
        },
    }))
}

/// Takes the sockets handed to this process, if any, and removes the protocol's variables from
/// the environment. Call it once, before any other thread starts (it changes the environment).
///
/// # Errors
/// [`ActivationError`] when a variable is malformed, the sockets cannot be told apart, or one is
/// not a TCP listening socket.
pub fn take_from_env() -> Result<Inherited, ActivationError> {
    let pid = var(LISTEN_PID)?;
    let fds = var(LISTEN_FDS)?;
    let names = var(LISTEN_FDNAMES)?;
    let planned = plan(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    );
    // `listenfd` reads LISTEN_PID and LISTEN_FDS again (they were checked above) and removes
    // them; the names go below. Removed on every path, as `sd_listen_fds(1)` does.
    let mut sockets = listenfd::ListenFd::from_env();
    unset_protocol_variables();
    let Some(plan) = planned? else {
        return Ok(Inherited::default());
    };
    let mut take = |at: Option<usize>, role: &'static str| -> Result<_, ActivationError> {
        let Some(at) = at else {
            return Ok(None);
        };
        let fd = FIRST_FD + at;
        let listener = sockets
            .take_tcp_listener(at)
            .and_then(|listener| {
                listener.ok_or_else(|| std::io::Error::other("not handed in (LISTEN_FDS)"))
            })
            .map_err(|source| ActivationError::Fd { fd, role, source })?;
        tracing::info!(
            fd,
            role,
            address = ?listener.local_addr().ok(),
            "serving on an inherited socket (socket activation)"
        );
        Ok(Some(listener))
    };
    Ok(Inherited {
        main: take(plan.main, "main")?,
        metrics: take(plan.metrics, "metrics")?,
    })
}

/// Removes the protocol's variables, so that nothing regcache starts inherits them. The one
/// environment change regcache makes: [`take_from_env`] runs before any other thread exists.
#[allow(clippy::disallowed_methods)]
fn unset_protocol_variables() {
    for name in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
        std::env::remove_var(name);
    }
}

/// A variable's value; `None` when unset (or set to nothing, as systemd never does).
fn var(name: &'static str) -> Result<Option<String>, ActivationError> {
    match std::env::var_os(name) {
        None => Ok(None),
        Some(value) if value.is_empty() => Ok(None),
        Some(value) => {
            value
                .into_string()
                .map(Some)
                .map_err(|value: OsString| ActivationError::Malformed {
                    variable: name,
                    value: value.to_string_lossy().into_owned(),
                    expected: "UTF-8",
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(fds: &str, names: Option<&str>) -> Result<Option<Plan>, ActivationError> {
        plan(Some("42"), Some(fds), names, 42)
    }

    fn planned(main: Option<usize>, metrics: Option<usize>) -> Option<Plan> {
        Some(Plan { main, metrics })
    }

    #[test]
    fn not_activated_without_fds_or_for_another_process() {
        assert_eq!(plan(None, None, None, 42).ok(), Some(None));
        assert_eq!(plan(Some("42"), None, None, 42).ok(), Some(None));
        assert_eq!(plan(Some("41"), Some("1"), None, 42).ok(), Some(None));
        assert_eq!(plan(None, Some("1"), None, 42).ok(), Some(None));
        assert_eq!(plan_of("0", None).ok(), Some(None));
    }

    #[test]
    fn positions_without_names() {
        assert_eq!(plan_of("1", None).ok(), Some(planned(Some(0), None)));
        assert_eq!(plan_of("2", None).ok(), Some(planned(Some(0), Some(1))));
    }

    #[test]
    fn the_socket_named_metrics_is_the_metrics_listener() {
        let cases = [
            ("2", "metrics:http", planned(Some(1), Some(0))),
            ("2", "http:metrics", planned(Some(0), Some(1))),
            (
                "2",
                "regcache.socket:regcache.socket",
                planned(Some(0), Some(1)),
            ),
            ("1", "http", planned(Some(0), None)),
            ("1", "metrics", planned(None, Some(0))),
        ];
        for (fds, names, expected) in cases {
            assert_eq!(plan_of(fds, Some(names)).ok(), Some(expected), "{names}");
        }
    }

    #[test]
    fn malformed_values_are_refused_naming_the_variable() {
        let refused = [
            (plan_of("two", None), "LISTEN_FDS=\"two\""),
            (plan(Some("me"), Some("1"), None, 42), "LISTEN_PID=\"me\""),
            (plan_of("3", None), "LISTEN_FDS=3"),
            (plan_of("2", Some("http")), "LISTEN_FDNAMES=\"http\""),
            (
                plan_of("2", Some("metrics:metrics")),
                "LISTEN_FDNAMES=\"metrics:metrics\"",
            ),
        ];
        for (result, variable) in refused {
            let message = result.map(|_| ()).err().map(|e| e.to_string());
            assert!(
                message.as_deref().is_some_and(|m| m.contains(variable)),
                "{variable}: {message:?}"
            );
        }
    }
}
