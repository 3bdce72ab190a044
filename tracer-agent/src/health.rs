//! Whether the agent works: each stage of the pipeline reports that it is alive,
//! and `/healthz` (and `tracer-agent health`, which probes it) says unhealthy, and
//! why, when one has stopped or hangs.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The stages that report in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reads the kernel's ring buffer (every 10 ms at the least).
    Capture,
    /// Turns events into spans (every 50 ms at the least).
    Pipeline,
    /// Prints and sends spans (every second at the least, plus one export's time).
    Export,
}

const STAGES: [Stage; 3] = [Stage::Capture, Stage::Pipeline, Stage::Export];

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Capture => "capture",
            Stage::Pipeline => "pipeline",
            Stage::Export => "export",
        }
    }

    /// How long it may stay silent before it counts as stuck. Export waits for
    /// the collector: up to the OTLP timeout per request, several in a row.
    fn patience(self) -> Duration {
        match self {
            Stage::Capture | Stage::Pipeline => Duration::from_secs(15),
            Stage::Export => Duration::from_secs(90),
        }
    }
}

/// Heartbeats and failures of the agent's stages.
#[derive(Debug)]
pub struct Health {
    start: Instant,
    /// Per stage: milliseconds since `start` of its last report, `u64::MAX` before
    /// the first (a stage that has not started yet is not late).
    beats: [AtomicU64; 3],
    /// Stages that stopped, and why.
    failures: Mutex<Vec<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            beats: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            failures: Mutex::new(Vec::new()),
        }
    }

    /// `stage` is alive now.
    pub fn beat(&self, stage: Stage) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.beats[stage as usize].store(ms, Ordering::Relaxed);
    }

    /// `stage` stopped for good.
    pub fn failed(&self, stage: Stage, why: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.push(format!("{} stopped: {why}", stage.name()));
    }

    /// Why the agent is unhealthy at `now`; empty when it is healthy.
    pub fn problems_at(&self, now: Instant) -> Vec<String> {
        let mut out = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        for stage in STAGES {
            let beat = self.beats[stage as usize].load(Ordering::Relaxed);
            if beat == u64::MAX {
                continue;
            }
            let silent = Duration::from_millis(now_ms.saturating_sub(beat));
            if silent > stage.patience() {
                out.push(format!(
                    "{} has not reported for {:.0} s (stuck?)",
                    stage.name(),
                    silent.as_secs_f64()
                ));
            }
        }
        out
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_or_failed_stages_make_the_agent_unhealthy_and_say_why() {
        let h = Health::new();
        let t0 = Instant::now();
        assert!(h.problems_at(t0).is_empty(), "nothing started yet");
        for s in STAGES {
            h.beat(s);
        }
        assert!(h.problems_at(t0 + Duration::from_secs(5)).is_empty());
        let late = h.problems_at(t0 + Duration::from_secs(20));
        assert_eq!(late.len(), 2, "capture and pipeline are late: {late:?}");
        assert!(late[0].starts_with("capture has not reported"));
        h.beat(Stage::Capture);
        h.beat(Stage::Pipeline);
        h.failed(Stage::Export, "panicked");
        let p = h.problems();
        assert_eq!(p, ["export stopped: panicked"]);
    }
}
