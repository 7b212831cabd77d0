//! Watches target processes during a run (`--pid`): samples VmRSS from /proc/PID/status every
//! few milliseconds and keeps the maximum, reads VmHWM (the kernel's own peak) at the end, and
//! takes utime+stime from /proc/PID/stat before and after to get CPU seconds. With
//! `--reset-hwm` the kernel's peak is reset first (`echo 5 > /proc/PID/clear_refs`), so VmHWM
//! is the peak of this run alone rather than of the process's whole life.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ProcReport {
    pub pid: u32,
    pub comm: String,
    /// Maximum of the sampled VmRSS during the run, KiB.
    pub peak_rss_sampled_kib: u64,
    /// VmHWM at the end of the run, KiB (since the reset when `hwm_reset` is true, else since
    /// the process started).
    pub vm_hwm_kib: Option<u64>,
    pub hwm_reset: bool,
    pub rss_end_kib: Option<u64>,
    /// utime + stime consumed during the run, seconds.
    pub cpu_s: Option<f64>,
    pub samples: u64,
}

pub struct ProcWatch {
    pids: Vec<u32>,
    hwm_reset: Vec<bool>,
    cpu_start: Vec<Option<f64>>,
    peaks: Arc<Vec<AtomicU64>>,
    samples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn status_field_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all threads), seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces; fields after the closing parenthesis are fixed.
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ")": state(3) ppid(4) ... utime is field 14, stime 15 (1-based over the whole line)
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

impl ProcWatch {
    pub fn start(pids: &[u32], reset_hwm: bool, interval: Duration) -> ProcWatch {
        let hwm_reset = pids
            .iter()
            .map(|pid| reset_hwm && std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
            .collect();
        let cpu_start = pids
            .iter()
            .map(|pid| cpu_seconds(&pid.to_string()))
            .collect();
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let samples = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = if pids.is_empty() {
            None
        } else {
            let pids = pids.to_vec();
            let peaks = Arc::clone(&peaks);
            let samples = Arc::clone(&samples);
            let stop = Arc::clone(&stop);
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for (i, pid) in pids.iter().enumerate() {
                        if let Some(rss) = status_field_kib(*pid, "VmRSS") {
                            peaks[i].fetch_max(rss, Ordering::Relaxed);
                        }
                    }
                    samples.fetch_add(1, Ordering::Relaxed);
                }
            }))
        };
        ProcWatch {
            pids: pids.to_vec(),
            hwm_reset,
            cpu_start,
            peaks,
            samples,
            stop,
            task,
        }
    }

    pub async fn finish(mut self) -> Vec<ProcReport> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.pids
            .iter()
            .enumerate()
            .map(|(i, pid)| {
                let rss_end = status_field_kib(*pid, "VmRSS");
                let mut peak = self.peaks[i].load(Ordering::Relaxed);
                if let Some(r) = rss_end {
                    peak = peak.max(r);
                }
                let cpu_end = cpu_seconds(&pid.to_string());
                ProcReport {
                    pid: *pid,
                    comm: comm(*pid),
                    peak_rss_sampled_kib: peak,
                    vm_hwm_kib: status_field_kib(*pid, "VmHWM"),
                    hwm_reset: self.hwm_reset[i],
                    rss_end_kib: rss_end,
                    cpu_s: match (self.cpu_start[i], cpu_end) {
                        (Some(a), Some(b)) => Some(b - a),
                        _ => None,
                    },
                    samples: self.samples.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}
