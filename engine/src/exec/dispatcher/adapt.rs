//! What the model API and the run's budget do to agents: agent slots that follow the API's rate
//! limits (when a worker is told 429 or 529, the run's agent slots are halved and no new agent
//! starts until the wait the API asked for has passed; each agent attempt that ends without such
//! trouble grows them back by about one slot per round of attempts, up to `--agents`), and the run
//! budget held while agents run (their responses priced as they stream).

use std::time::{Duration, Instant};

use super::{Dispatcher, AGENT_SLOTS};
use crate::exec::events::Event;
use crate::exec::options::ApplyError;
use crate::exec::runner::Stop;
use crate::model::raw::FailureClass;
use crate::store::now_ms;

/// Two cuts within this long are one episode: the workers that were running all hear the same
/// refusal, and one refusal is one halving.
const ONE_EPISODE: Duration = Duration::from_secs(2);

/// The level of the agent slots, between 1 and the ceiling.
#[derive(Debug)]
pub(super) struct AgentLevel {
    ceiling: usize,
    level: f64,
    last_cut: Option<Instant>,
    /// No new agent starts before this.
    pub(super) hold_until: Option<tokio::time::Instant>,
}

/// A node's own agent budget (`max_budget_usd`), if it is an agent with one.
pub(super) fn task_budget(plan: &crate::plan::PlannedTask) -> Option<f64> {
    match &plan.action {
        crate::plan::PlannedAction::Agent { settings, .. } => settings.max_budget_usd,
        _ => None,
    }
}

/// What the API said in an `api_retry` progress detail (`#2 after 429 (rate_limit), again in
/// 3000 ms`): whether it was a rate limit or overload, and the wait it asked for.
pub(super) fn refusal(detail: &str) -> Option<Duration> {
    let (_, after) = detail.split_once(" after ")?;
    if !(after.starts_with("429") || after.starts_with("529")) {
        return None;
    }
    let wait = after
        .rsplit_once("again in ")
        .and_then(|(_, ms)| ms.trim_end_matches(" ms").parse::<u64>().ok())
        .unwrap_or(1000);
    Some(Duration::from_millis(wait))
}

impl AgentLevel {
    pub(super) fn new(ceiling: usize) -> AgentLevel {
        AgentLevel {
            ceiling: ceiling.max(1),
            level: ceiling.max(1) as f64,
            last_cut: None,
            hold_until: None,
        }
    }

    /// The slots now.
    pub(super) fn slots(&self) -> usize {
        (self.level.floor() as usize).clamp(1, self.ceiling)
    }

    /// A worker was refused and waits `wait`: halve (once per episode) and hold new starts.
    /// Returns the slots before and after when they changed.
    pub(super) fn refused(&mut self, wait: Duration) -> Option<(usize, usize)> {
        let now = Instant::now();
        let until = tokio::time::Instant::now() + wait;
        if self.hold_until.is_none_or(|h| h < until) {
            self.hold_until = Some(until);
        }
        if self
            .last_cut
            .is_some_and(|t| now.duration_since(t) < ONE_EPISODE)
        {
            return None;
        }
        self.last_cut = Some(now);
        let before = self.slots();
        self.level = (self.level / 2.0).max(1.0);
        let after = self.slots();
        (after != before).then_some((before, after))
    }

    /// An agent attempt ended without the API refusing it: grow by one slot per round.
    /// Returns whether the slots grew.
    pub(super) fn went_well(&mut self) -> bool {
        let before = self.slots();
        // A slot's worth spread over the attempts of one round at the current slots.
        self.level = (self.level + 1.0 / before as f64).min(self.ceiling as f64);
        self.slots() > before
    }

    /// Whether new agents must wait now.
    pub(super) fn holding(&mut self) -> bool {
        match self.hold_until {
            Some(h) if h > tokio::time::Instant::now() => true,
            Some(_) => {
                self.hold_until = None;
                false
            }
            None => false,
        }
    }
}

impl Dispatcher<'_> {
    /// An agent's worker said something (it is up, past its CPU-bound start): the next agent
    /// may start.
    pub(super) fn agent_booted(&mut self, task: &str) {
        if self.booting.is_empty() {
            return;
        }
        if let Some(node) = self.node_named(task) {
            if self.booting.remove(&node) {
                self.release_agents();
            }
        }
    }

    /// Tells every running agent, and every agent started from now on, to stop.
    pub(super) fn stop_agents(&mut self, level: Stop) {
        self.agents_stopped = level;
        for stop in self.agent_stops.values() {
            let _ = stop.send(level);
        }
    }

    /// A running agent's cost so far. When it crosses its task's `max_budget_usd`, that agent is
    /// stopped (its attempt fails with class `budget`); when the run's spending with it crosses
    /// `max_run_usd`, the run stops starting tasks and all its agents are stopped (SIGTERM, then
    /// the grace period). Either overshoots by at most the responses in flight.
    pub(super) fn agent_cost(&mut self, task: &str, usd: f64) -> Result<(), ApplyError> {
        let Some(node) = self.node_named(task) else {
            return Ok(());
        };
        self.live_usd.insert(node, usd);
        // `status` and `serve` show it with the next snapshot.
        self.live_costs_changed = true;
        self.snapshot_due = true;
        if let Some(max) = task_budget(&self.nodes[node].plan) {
            if usd >= max && !self.over_task_budget.contains_key(&node) {
                let message = format!(
                    "stopped: the task's budget is spent (${usd:.2} of `max_budget_usd = {max}`, priced as the responses streamed)"
                );
                self.events.push(Event::Warning {
                    run: self.run.id.clone(),
                    task: task.to_string(),
                    message: format!(
                        "the task's agent budget is spent (${usd:.2} of `max_budget_usd = {max}`): its agent is stopped"
                    ),
                    time_ms: now_ms(),
                });
                if let Some(stop) = self.agent_stops.get(&node) {
                    let _ = stop.send(Stop::Graceful);
                }
                self.over_task_budget.insert(node, message);
            }
        }
        let Some(max) = self.max_run_usd else {
            return Ok(());
        };
        let spent = self.spent_usd + self.live_usd.values().sum::<f64>();
        if spent < max || self.agents_stopped != Stop::No {
            return Ok(());
        }
        let reason = format!(
            "stopped: {} (${spent:.2} of `max_run_usd = {max}`)",
            super::RUN_BUDGET_SPENT
        );
        self.events.push(Event::Warning {
            run: self.run.id.clone(),
            task: task.to_string(),
            message: format!("the run's agent budget is spent (${spent:.2} of `max_run_usd = {max}`, priced as the responses streamed): its agents are stopped"),
            time_ms: now_ms(),
        });
        self.stop_agents(Stop::Graceful);
        self.stop(reason)
    }

    /// A worker of `task` was refused by the API (429 or 529) and waits `wait`: fewer agent
    /// slots, said as a warning when they change.
    pub(super) fn agent_refused(&mut self, task: &str, wait: Duration) {
        if let Some(node) = self.nodes.iter().position(|n| n.plan.id == task) {
            self.asked_to_wait.insert(node, wait);
        }
        let Some(level) = &mut self.agent_level else {
            return;
        };
        if let Some((before, after)) = level.refused(wait) {
            if let Some(slots) = &mut self.kind_slots {
                slots[AGENT_SLOTS].max = after;
            }
            self.events.push(Event::Warning {
                run: self.run.id.clone(),
                task: task.to_string(),
                message: format!(
                    "the model API refused a request (rate limit or overload): agent slots {before} → {after}, new agents wait {} ms",
                    wait.as_millis()
                ),
                time_ms: now_ms(),
            });
        }
    }

    /// An agent attempt ended: unless the API refused it, the slots grow back.
    pub(super) fn agent_ended(&mut self, node: usize, class: Option<FailureClass>) {
        if self.kind_of(node) != AGENT_SLOTS {
            return;
        }
        if matches!(
            class,
            Some(FailureClass::RateLimit | FailureClass::Overloaded)
        ) {
            let task = self.nodes[node].plan.id.clone();
            let wait = self
                .asked_to_wait
                .get(&node)
                .copied()
                .unwrap_or(Duration::from_secs(1));
            self.agent_refused(&task, wait);
            return;
        }
        let Some(level) = &mut self.agent_level else {
            return;
        };
        if level.went_well() {
            let slots = level.slots();
            if let Some(kinds) = &mut self.kind_slots {
                kinds[AGENT_SLOTS].max = slots;
            }
            self.release_agents();
        }
    }

    /// Agents held back go back in the queue (a slot grew, or a wait the API asked for is over).
    pub(super) fn release_agents(&mut self) {
        let parked = match &mut self.kind_slots {
            Some(slots) => std::mem::take(&mut slots[AGENT_SLOTS].parked),
            None => return,
        };
        for node in parked {
            self.enqueue(node);
        }
    }

    /// When held agents may start, if any are held.
    pub(super) fn agents_held_until(&self) -> Option<tokio::time::Instant> {
        let parked = self
            .kind_slots
            .as_ref()
            .is_some_and(|s| !s[AGENT_SLOTS].parked.is_empty());
        self.agent_level
            .as_ref()
            .and_then(|l| l.hold_until)
            .filter(|_| parked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_read_from_the_progress_detail() {
        assert_eq!(
            refusal("#1 after 429 (rate_limit), again in 3000 ms"),
            Some(Duration::from_millis(3000))
        );
        assert_eq!(
            refusal("#2 after 529 (overloaded)"),
            Some(Duration::from_millis(1000))
        );
        assert_eq!(
            refusal("#1 after 500 (server_error), again in 535 ms"),
            None
        );
        assert_eq!(refusal("#1 after no answer (unknown)"), None);
    }

    #[test]
    fn slots_halve_once_per_episode_and_grow_back_one_per_round() {
        let mut level = AgentLevel::new(8);
        assert_eq!(level.refused(Duration::ZERO), Some((8, 4)));
        // The other workers' refusals of the same moment cut nothing more.
        assert_eq!(level.refused(Duration::ZERO), None);
        assert_eq!(level.slots(), 4);
        // Four attempts that went well (a round at 4 slots) give one slot back.
        let grew: Vec<bool> = (0..4).map(|_| level.went_well()).collect();
        assert_eq!(grew, [false, false, false, true]);
        assert_eq!(level.slots(), 5);
        for _ in 0..100 {
            level.went_well();
        }
        assert_eq!(level.slots(), 8);
    }
}
