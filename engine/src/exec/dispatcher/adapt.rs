//! Agent slots that follow the API's rate limits: when a worker is told 429 (rate limited) or 529
//! (overloaded), the run's agent slots are halved and no new agent starts until the wait the API
//! asked for has passed; each agent attempt that ends without such trouble grows them back by
//! about one slot per round of attempts (additive increase, multiplicative decrease), up to
//! `--agents`.

use std::time::{Duration, Instant};

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
