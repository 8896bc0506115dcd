//! The live view of `apply` on a terminal: finished tasks scroll by as lines, and below them one
//! spinner per running task (an agent's with its cost so far) and a summary line (done, failed,
//! running, pending, what agents have cost so far, elapsed).

use std::collections::HashMap;
use std::time::Duration;

use ccluster_engine::exec::{Event, EventSink};

use crate::runs::describe;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct LiveView {
    multi: MultiProgress,
    summary: ProgressBar,
    running: HashMap<String, ProgressBar>,
    total: usize,
    done: usize,
    failed: usize,
    skipped: usize,
    cancelled: usize,
    /// Running agents' cost so far, priced as their responses stream.
    live_cost: HashMap<String, f64>,
    /// What ended agent attempts had cost, the same way (the report has the CLI's own figures).
    ended_cost: f64,
}

impl LiveView {
    pub fn new() -> LiveView {
        let multi = MultiProgress::new();
        let summary = multi.add(ProgressBar::new_spinner());
        summary.set_style(
            ProgressStyle::with_template("{elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        summary.enable_steady_tick(Duration::from_millis(200));
        LiveView {
            multi,
            summary,
            running: HashMap::new(),
            total: 0,
            done: 0,
            failed: 0,
            skipped: 0,
            cancelled: 0,
            live_cost: HashMap::new(),
            ended_cost: 0.0,
        }
    }

    fn refresh(&self) {
        let running = self.running.len();
        let pending = self
            .total
            .saturating_sub(self.done + self.failed + self.skipped + running);
        let cost = self.ended_cost + self.live_cost.values().sum::<f64>();
        let cost = if cost > 0.0 {
            format!(", agents ${cost:.2} so far")
        } else {
            String::new()
        };
        self.summary.set_message(format!(
            "{} done, {} failed, {} skipped, {} cancelled, {running} running, {pending} pending{cost}",
            self.done, self.failed, self.skipped, self.cancelled
        ));
    }

    fn finish(&mut self, task: &str, line: String) {
        self.ended_cost += self.live_cost.remove(task).unwrap_or(0.0);
        if let Some(bar) = self.running.remove(task) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        let _ = self.multi.println(line);
    }
}

impl EventSink for LiveView {
    fn emit(&mut self, event: &Event) {
        let line = format!("  {}", describe(event));
        match event {
            Event::RunStarted { nodes, .. } => {
                self.total = *nodes;
                let _ = self.multi.println(describe(event));
            }
            Event::MapExpanded { items, .. } => {
                // `run_started` counted no node for a map expanded at run time: its instances come now.
                self.total += items;
                let _ = self.multi.println(line);
            }
            Event::TaskStarted { task, attempt, .. } => {
                let bar = self
                    .multi
                    .insert_before(&self.summary, ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {msg} {prefix}{elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_message(if *attempt > 1 {
                    format!("{task} (attempt {attempt})")
                } else {
                    task.clone()
                });
                bar.enable_steady_tick(Duration::from_millis(120));
                if let Some(old) = self.running.insert(task.clone(), bar) {
                    old.finish_and_clear();
                }
            }
            Event::TaskProgress {
                task, kind, detail, ..
            } => {
                // The spinner line shows what the agent does now, and what it has cost so far.
                if kind == "cost" {
                    if let Ok(usd) = detail.parse::<f64>() {
                        self.live_cost.insert(task.clone(), usd);
                        if let Some(bar) = self.running.get(task) {
                            bar.set_prefix(format!("${usd:.2} "));
                        }
                        self.refresh();
                    }
                    return;
                }
                if let Some(bar) = self.running.get(task) {
                    bar.set_message(format!("{task}: {kind} {detail}"));
                }
                return;
            }
            Event::Warning { .. } => {
                let _ = self.multi.println(line);
                return;
            }
            Event::TaskRetrying { task, .. } => self.finish(task, line),
            Event::TaskSucceeded { task, .. }
            | Event::TaskCached { task, .. }
            | Event::TaskDeduplicated { task, .. } => {
                self.done += 1;
                self.finish(task, line);
            }
            Event::TaskFailed { task, .. } => {
                self.failed += 1;
                self.finish(task, line);
            }
            Event::TaskSkipped { task, .. } => {
                self.skipped += 1;
                self.finish(task, line);
            }
            Event::TaskCancelled { task, .. } => {
                self.cancelled += 1;
                self.finish(task, line);
            }
            Event::RunFinished { .. } => {
                self.summary.finish_and_clear();
                let _ = self.multi.println(describe(event));
                return;
            }
        }
        self.refresh();
    }
}
