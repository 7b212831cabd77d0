//! Progress display for the air-gap commands: bars on a terminal (one per image in flight and
//! a running total of bytes), plain lines otherwise; and the closing summary.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use bytesize::ByteSize;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use super::prefetch::Event;

/// The progress display.
/// Not `Debug`: indicatif's styles are not.
#[allow(missing_debug_implementations)]
pub(super) struct Display {
    terminal: bool,
    bars: MultiProgress,
    total: ProgressBar,
    /// Per image in flight: its bar, bytes and blobs so far.
    images: HashMap<String, (ProgressBar, u64, usize)>,
    total_bytes: u64,
}

impl Display {
    pub(super) fn new() -> Self {
        let bars = MultiProgress::new();
        let total = bars.add(ProgressBar::new_spinner());
        total.set_style(
            ProgressStyle::with_template("{spinner} total {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Self {
            terminal: std::io::stderr().is_terminal(),
            bars,
            total,
            images: HashMap::new(),
            total_bytes: 0,
        }
    }

    /// Shows one event.
    pub(super) fn show(&mut self, event: Event) {
        match event {
            Event::Started { image } => {
                if self.terminal {
                    let bar = self.bars.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("  {spinner} {prefix} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(image.clone());
                    bar.enable_steady_tick(std::time::Duration::from_millis(200));
                    self.images.insert(image, (bar, 0, 0));
                } else {
                    eprintln!("{image}: started");
                }
            }
            Event::Blob {
                image,
                bytes,
                fetched,
            } => {
                if fetched {
                    self.total_bytes += bytes;
                }
                if let Some((bar, image_bytes, blobs)) = self.images.get_mut(&image) {
                    *image_bytes += bytes;
                    *blobs += 1;
                    bar.set_message(format!("{blobs} blobs, {}", ByteSize(*image_bytes)));
                }
                self.total
                    .set_message(format!("{} fetched", ByteSize(self.total_bytes)));
            }
            Event::Finished {
                image,
                manifests,
                blobs,
                fetched_bytes,
                error,
            } => {
                let line = match &error {
                    None => format!(
                        "{image}: done ({manifests} manifests, {blobs} blobs, {} fetched)",
                        ByteSize(fetched_bytes)
                    ),
                    Some(error) => format!("{image}: FAILED: {error}"),
                };
                match self.images.remove(&image) {
                    Some((bar, _, _)) => {
                        bar.finish_and_clear();
                        self.bars.remove(&bar);
                        let _ = self.bars.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
        }
    }

    /// Clears the bars.
    pub(super) fn finish(self) {
        self.total.finish_and_clear();
    }
}

/// Shows `events` until the sender is dropped.
pub(super) async fn show(mut events: mpsc::Receiver<Event>) {
    let mut display = Display::new();
    while let Some(event) = events.recv().await {
        display.show(event);
    }
    display.finish();
}

/// Prints the summary of a run over `count` images and turns it into the exit code (1 when
/// anything failed, or the run could not start).
pub(super) fn summary(
    command: &str,
    count: usize,
    failures: Result<Vec<(String, String)>, String>,
) -> ExitCode {
    match failures {
        Err(err) => {
            eprintln!("regcache {command}: {err}");
            ExitCode::FAILURE
        }
        Ok(failures) if failures.is_empty() => {
            eprintln!("regcache {command}: {count} images complete");
            ExitCode::SUCCESS
        }
        Ok(failures) => {
            eprintln!(
                "regcache {command}: {} of {count} images failed:",
                failures.len()
            );
            for (image, reason) in failures {
                eprintln!("  {image}: {reason}");
            }
            ExitCode::FAILURE
        }
    }
}
