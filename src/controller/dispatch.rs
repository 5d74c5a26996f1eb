//! A writer's slot: at most one job in flight per member, and exponential backoff after a job
//! that failed. Pure: time comes in as an argument.

use std::time::Duration;

use tokio::time::Instant;

pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct WriterSlot {
    /// Which client of the member this writer uses: news from an older one is dropped.
    pub epoch: u64,
    in_flight: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

impl WriterSlot {
    pub fn new(epoch: u64) -> Self {
        WriterSlot { epoch, in_flight: false, retry_at: None, backoff: MIN_BACKOFF, last_error: None }
    }

    /// Whether a job may be handed over now.
    pub fn ready(&self, now: Instant) -> bool {
        !self.in_flight && self.retry_at.is_none_or(|t| t <= now)
    }

    pub fn sent(&mut self) {
        self.in_flight = true;
    }

    /// The job in flight ended with these errors (empty: success). Returns whether the last
    /// error changed, which the policies' statuses show.
    pub fn done(&mut self, error: Option<String>, now: Instant) -> bool {
        self.in_flight = false;
        let changed = self.last_error != error;
        match &error {
            None => {
                self.backoff = MIN_BACKOFF;
                self.retry_at = None;
            }
            Some(_) => {
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
        self.last_error = error;
        changed
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// When a failed job may be tried again.
    #[cfg(test)]
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_at_a_time_and_backoff_doubles_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut slot = WriterSlot::new(1);
        assert!(slot.ready(t0));
        slot.sent();
        assert!(!slot.ready(t0), "a job is in flight");
        assert!(slot.done(Some("refused".into()), t0), "the error is news");
        assert!(!slot.ready(t0 + MIN_BACKOFF - Duration::from_millis(1)));
        assert!(slot.ready(t0 + MIN_BACKOFF));
        let mut at = t0;
        for _ in 0..10 {
            slot.sent();
            slot.done(Some("refused".into()), at);
            at = slot.retry_at().unwrap();
        }
        slot.sent();
        assert!(!slot.done(Some("refused".into()), at), "the same error is no news");
        assert_eq!(slot.retry_at().unwrap() - at, MAX_BACKOFF);
        slot.sent();
        assert!(slot.done(None, at), "recovery is news");
        assert_eq!(slot.retry_at(), None);
        slot.sent();
        slot.done(Some("again".into()), at);
        assert_eq!(slot.retry_at().unwrap() - at, MIN_BACKOFF, "a success resets the backoff");
    }
}
