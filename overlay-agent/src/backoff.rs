//! Exponential backoff for the agent's retry loops (connecting to etcd, following its watch,
//! keeping the host's lease, publishing reports, retrying a failed reconcile): the first retry
//! comes soon, a failure that persists is retried ever less often, up to a ceiling, and a
//! success starts over from the first delay.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    /// The delay to wait before the next attempt; the one after it is twice as long (at most
    /// `max`).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// After a success: the next failure is retried after `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_starts_over_on_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), Duration::from_secs(5));
        let delays: Vec<_> = (0..7).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(5000), ms(5000)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(200));
        assert_eq!(b.next_delay(), ms(400));
    }
}
