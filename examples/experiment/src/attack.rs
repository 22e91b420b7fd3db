//! Poisoned scores: clients that score adversarially, for measuring the coordinator's
//! defences (`[attack]` of an experiment config, with `aggregation` choosing the defence).
//!
//! An attacker takes the place of one of the experiment's clients: it enrolls and answers
//! every round over the same QUIC protocol, announcing that client's data size (its weight in
//! the mean), but it holds no model and learns nothing; its scores follow its `kind`. Its
//! SLM accuracy is not part of any table (it has none).

use std::net::SocketAddr;

use crosslm_sdk::protocol::{ClientInfo, SyntheticSample, TaskInfo};
use crosslm_sdk::rounds::{Scorer, participate};
use crosslm_sdk::transport::{EnrollToken, Session, enroll};
use serde::{Deserialize, Serialize};

/// Which clients attack, and how.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackConfig {
    /// How the attackers score.
    pub kind: AttackKind,
    /// How many of the experiment's clients are attackers (the first ones of the list).
    pub clients: usize,
}

/// An attacker's scoring rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// Every sample gets all its probability on a label other than its intended one: good
    /// samples are voted down (and the LLM told its best samples are its worst).
    Invert,
    /// Every sample gets all its probability on its intended label: wrong-label samples are
    /// voted up past the quality threshold.
    Inflate,
    /// Every sample gets the same uniform vector: no information, full weight.
    Constant,
}

impl AttackKind {
    /// The attacker's score of one sample of a task with `n` labels.
    pub fn score(self, sample: &SyntheticSample, n: usize) -> Vec<f32> {
        let intended = sample.label as usize % n.max(1);
        match self {
            AttackKind::Invert => one_hot((intended + 1) % n.max(1), n),
            AttackKind::Inflate => one_hot(intended, n),
            AttackKind::Constant => vec![1.0 / n as f32; n],
        }
    }
}

fn one_hot(i: usize, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    if let Some(x) = v.get_mut(i) {
        *x = 1.0;
    }
    v
}

/// A [`Scorer`] that attacks.
pub struct Adversary(pub AttackKind);

impl Scorer for Adversary {
    fn score(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
    ) -> crosslm_sdk::Result<Vec<Vec<f32>>> {
        let n = task.labels.len();
        Ok(samples.iter().map(|s| self.0.score(s, n)).collect())
    }
}

/// Enrolls an attacker with `token` and has it answer `rounds` rounds; returns the round
/// results it received.
pub async fn run_attacker(
    addr: SocketAddr,
    token: &EnrollToken,
    name: &str,
    n_private: u64,
    kind: AttackKind,
    rounds: u64,
) -> crosslm_sdk::Result<u64> {
    let info = ClientInfo {
        name: name.to_string(),
        slm_arch: "attacker".into(),
        n_private,
    };
    let identity = enroll(addr, token, info.clone()).await?;
    let mut session = Session::connect(addr, &identity, info).await?;
    let (_, results) = participate(&mut session, Adversary(kind), Some(rounds)).await?;
    session.close().await;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attackers_score_as_their_kind_says() {
        let s = SyntheticSample {
            id: 0,
            text: "x".into(),
            label: 1,
        };
        assert_eq!(AttackKind::Invert.score(&s, 2), vec![1.0, 0.0]);
        assert_eq!(AttackKind::Invert.score(&s, 3), vec![0.0, 0.0, 1.0]);
        assert_eq!(AttackKind::Inflate.score(&s, 2), vec![0.0, 1.0]);
        assert_eq!(AttackKind::Constant.score(&s, 4), vec![0.25; 4]);
    }

    /// What the defences do with these scores: two inverting attackers among eight clients
    /// pull a sample the six honest ones rate 0.9 down to 0.68 under the weighted mean; the
    /// median keeps 0.9 and a 25% trimmed mean stays above 0.85. When the honest votes differ,
    /// the median of eight is the mean of the 2nd and 3rd lowest honest votes: weak honest
    /// clients voting near 0.5 then put many good samples under the threshold (what the
    /// measured run showed in its first round).
    #[test]
    fn the_median_holds_against_two_inverters_of_eight() {
        use crosslm_coordinator::round::{Aggregation, score_sample};
        let s = SyntheticSample {
            id: 0,
            text: "x".into(),
            label: 0,
        };
        let honest = [0.9f32, 0.1];
        let attack = AttackKind::Invert.score(&s, 2);
        let votes: Vec<(f64, &[f32])> = (0..8)
            .map(|i| (64.0, if i < 2 { &attack[..] } else { &honest[..] }))
            .collect();
        let q = |m| score_sample(m, &s, &votes).quality;
        assert!((q(Aggregation::WeightedMean) - 0.675).abs() < 1e-6);
        assert!((q(Aggregation::Median) - 0.9).abs() < 1e-6);
        assert!(q(Aggregation::TrimmedMean { trim: 0.25 }) > 0.85);

        let spread = [
            [0.9f32, 0.1],
            [0.8, 0.2],
            [0.7, 0.3],
            [0.6, 0.4],
            [0.45, 0.55],
            [0.52, 0.48],
        ];
        let votes: Vec<(f64, &[f32])> = (0..8)
            .map(|i| {
                (
                    64.0,
                    if i < 2 {
                        &attack[..]
                    } else {
                        &spread[i - 2][..]
                    },
                )
            })
            .collect();
        let median = score_sample(Aggregation::Median, &s, &votes).quality;
        assert!((median - (0.52 + 0.6) / 2.0).abs() < 1e-6, "{median}");
    }
}
