//! When to try the coordinator again after a lost link: exponential backoff with jitter, so a
//! thousand devices cut off by one coordinator crash come back spread over seconds, not in
//! the same millisecond. Sans-IO: the caller sleeps, the randomness is an input.

use std::time::Duration;

use rand::Rng;

/// How a client reconnects after its link to the coordinator fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reconnect {
    /// Tries after a failure before giving up (0: never reconnect).
    pub attempts: u32,
    /// The first wait's upper bound; each further try doubles it.
    pub first_delay: Duration,
    /// No wait is longer than this.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    /// Eight tries over about two minutes at most.
    fn default() -> Self {
        Self {
            attempts: 8,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// The state of one series of reconnection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Reconnect,
    tried: u32,
}

impl Backoff {
    /// A fresh series under `policy`.
    pub fn new(policy: Reconnect) -> Self {
        Self { policy, tried: 0 }
    }

    /// The wait before the next try, or `None` when the tries are used up. "Equal jitter":
    /// half the exponential step plus a uniform draw over the other half, so waits grow
    /// while two clients almost never pick the same moment.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Option<Duration> {
        if self.tried >= self.policy.attempts {
            return None;
        }
        let step = self
            .policy
            .first_delay
            .saturating_mul(1u32 << self.tried.min(20))
            .min(self.policy.max_delay);
        self.tried += 1;
        let half = step / 2;
        let jitter = rng.random_range(0..=half.as_micros() as u64);
        Some(half + Duration::from_micros(jitter))
    }

    /// Tries made in this series.
    pub fn tried(&self) -> u32 {
        self.tried
    }

    /// A working link again: the next failure starts a new series.
    pub fn reset(&mut self) {
        self.tried = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn waits_grow_to_the_cap_and_the_tries_run_out() {
        let mut b = Backoff::new(Reconnect {
            attempts: 8,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(4),
        });
        let mut rng = StdRng::seed_from_u64(1);
        let mut waits = Vec::new();
        while let Some(d) = b.next_delay(&mut rng) {
            waits.push(d);
        }
        assert_eq!(waits.len(), 8);
        // Step k: [step/2, step] with step = min(500 ms * 2^k, 4 s).
        for (k, d) in waits.iter().enumerate() {
            let step = (500u64 << k).min(4000);
            let ms = d.as_secs_f64() * 1e3;
            assert!(
                ms >= step as f64 / 2.0 && ms <= step as f64,
                "try {k}: {ms} ms"
            );
        }
        b.reset();
        assert_eq!(b.tried(), 0);
        assert!(b.next_delay(&mut rng).unwrap() <= Duration::from_millis(500));
    }

    #[test]
    fn no_reconnect_when_attempts_is_zero() {
        let mut b = Backoff::new(Reconnect {
            attempts: 0,
            ..Reconnect::default()
        });
        assert_eq!(b.next_delay(&mut StdRng::seed_from_u64(0)), None);
    }

    #[test]
    fn a_thousand_clients_spread_their_first_retry() {
        // Each device draws from its own entropy: distinct seeds here.
        let mut ms: Vec<u128> = (0..1000)
            .map(|i| {
                let mut b = Backoff::new(Reconnect::default());
                b.next_delay(&mut StdRng::seed_from_u64(i))
                    .unwrap()
                    .as_millis()
            })
            .collect();
        ms.sort_unstable();
        ms.dedup();
        // 250 possible milliseconds for 1000 clients: at most a handful in any one of them.
        assert!(ms.len() > 200, "only {} distinct ms", ms.len());
        assert!(ms[0] >= 250 && *ms.last().unwrap() <= 500);
    }
}
