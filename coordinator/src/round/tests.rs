//! Deterministic tests of the round machine under simulated time.

use super::*;

fn task() -> TaskInfo {
    TaskInfo {
        name: "mr".into(),
        description: "polarity".into(),
        labels: vec!["neg".into(), "pos".into()],
    }
}

fn samples() -> Vec<SyntheticSample> {
    (0..4)
        .map(|i| SyntheticSample {
            id: 100 + i,
            text: format!("s{i}"),
            label: (i % 2) as u32,
        })
        .collect()
}

fn good_scores(p_pos: f32) -> Vec<SampleScore> {
    samples()
        .iter()
        .map(|s| SampleScore {
            id: s.id,
            probs: vec![1.0 - p_pos, p_pos],
        })
        .collect()
}

fn cfg(quorum: usize) -> RoundConfig {
    RoundConfig {
        quorum,
        deadline_ms: 1_000,
        aggregation: Aggregation::WeightedMean,
        // These clients answer the same for every sample: the correction would flatten them.
        prior_correction: false,
    }
}

fn drain(m: &mut RoundMachine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

fn clients(n: usize) -> Vec<(ClientId, f64)> {
    (0..n).map(|i| (format!("c{i}"), 10.0)).collect()
}

#[test]
fn start_sends_batch_to_every_client_then_completes_when_all_reply() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(2), 0);
    assert_eq!(m.phase(), &Phase::Open);
    m.start(clients(3), 0);
    let sends = drain(&mut m);
    assert_eq!(sends.len(), 3);
    assert!(sends.iter().all(|a| matches!(a, Action::SendBatch { .. })));
    assert_eq!(
        m.on_scores("c0", good_scores(0.9), 10),
        ReplyVerdict::Accepted
    );
    assert_eq!(
        m.on_scores("c1", good_scores(0.7), 20),
        ReplyVerdict::Accepted
    );
    // Quorum reached, but c2 is still connected and pending: keep waiting.
    assert!(drain(&mut m).is_empty());
    assert_eq!(
        m.on_scores("c2", good_scores(0.5), 30),
        ReplyVerdict::Accepted
    );
    let done = drain(&mut m);
    let [Action::Completed(out)] = done.as_slice() else {
        panic!("{done:?}")
    };
    assert_eq!(out.contributors.len(), 3);
    assert_eq!(out.scores.len(), 4);
    // Sample 101 is labeled pos: quality = mean of 0.9, 0.7, 0.5.
    assert!((out.scores[1].quality - 0.7).abs() < 1e-5);
    // Sample 100 is labeled neg: quality = 0.3.
    assert!((out.scores[0].quality - 0.3).abs() < 1e-5);
    assert_eq!(m.phase(), &Phase::Done);
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn dropout_completes_on_quorum_without_waiting_for_the_deadline() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(2), 0);
    m.start(clients(3), 0);
    drain(&mut m);
    m.on_scores("c0", good_scores(0.9), 10);
    m.on_scores("c1", good_scores(0.9), 10);
    m.leave("c2", 50);
    assert!(
        matches!(drain(&mut m).as_slice(), [Action::Completed(o)] if o.contributors.len() == 2)
    );
}

#[test]
fn deadline_with_quorum_completes_and_without_quorum_fails() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(2), 0);
    m.start(clients(3), 0);
    drain(&mut m);
    m.on_scores("c0", good_scores(0.9), 10);
    m.on_scores("c1", good_scores(0.9), 10);
    assert_eq!(m.poll_timeout(), Some(1_000));
    m.handle_timeout(999);
    assert!(drain(&mut m).is_empty(), "not yet the deadline");
    m.handle_timeout(1_000);
    assert!(
        matches!(drain(&mut m).as_slice(), [Action::Completed(o)] if o.contributors.len() == 2)
    );

    let mut m = RoundMachine::new(2, task(), samples(), cfg(2), 0);
    m.start(clients(3), 0);
    drain(&mut m);
    m.on_scores("c0", good_scores(0.9), 10);
    m.handle_timeout(1_000);
    assert!(matches!(drain(&mut m).as_slice(), [Action::Failed { .. }]));
    assert!(matches!(m.phase(), Phase::Failed { .. }));
}

#[test]
fn quorum_not_met_by_dropouts_waits_for_deadline_then_fails() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(3), 0);
    m.start(clients(3), 0);
    drain(&mut m);
    m.on_scores("c0", good_scores(0.9), 10);
    m.leave("c1", 20);
    m.leave("c2", 20);
    assert!(drain(&mut m).is_empty());
    // A client that comes back before the deadline gets the batch again.
    m.join("c1".into(), 10.0, 500);
    assert_eq!(
        drain(&mut m),
        vec![Action::SendBatch {
            client: "c1".into()
        }]
    );
    m.handle_timeout(1_000);
    assert!(matches!(drain(&mut m).as_slice(), [Action::Failed { .. }]));
}

#[test]
fn duplicate_and_late_replies_are_ignored() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(1), 0);
    m.start(clients(2), 0);
    drain(&mut m);
    assert_eq!(
        m.on_scores("c0", good_scores(0.9), 10),
        ReplyVerdict::Accepted
    );
    assert!(matches!(
        m.on_scores("c0", good_scores(0.1), 11),
        ReplyVerdict::Ignored(_)
    ));
    // Late: after the deadline.
    assert!(matches!(
        m.on_scores("c1", good_scores(0.1), 1_000),
        ReplyVerdict::Ignored(_)
    ));
    m.handle_timeout(1_000);
    let done = drain(&mut m);
    let [Action::Completed(out)] = done.as_slice() else {
        panic!("{done:?}")
    };
    // The duplicate did not overwrite the first reply.
    assert!((out.scores[1].quality - 0.9).abs() < 1e-5);
    // After completion, anything is late.
    assert!(matches!(
        m.on_scores("c1", good_scores(0.1), 5),
        ReplyVerdict::Ignored(_)
    ));
}

#[test]
fn bad_scores_are_rejected_and_the_client_may_retry() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(1), 0);
    m.start(clients(1), 0);
    drain(&mut m);
    let mut nan = good_scores(0.5);
    nan[0].probs[0] = f32::NAN;
    let mut out_of_range = good_scores(0.5);
    out_of_range[1].probs = vec![1.5, -0.5];
    let mut bad_sum = good_scores(0.5);
    bad_sum[2].probs = vec![0.5, 0.6];
    let mut unknown = good_scores(0.5);
    unknown[3].id = 999;
    let mut missing = good_scores(0.5);
    missing.pop();
    let mut twice = good_scores(0.5);
    twice[3].id = twice[2].id;
    let mut wrong_len = good_scores(0.5);
    wrong_len[0].probs = vec![1.0];
    for (name, bad) in [
        ("nan", nan),
        ("range", out_of_range),
        ("sum", bad_sum),
        ("unknown", unknown),
        ("missing", missing),
        ("twice", twice),
        ("len", wrong_len),
    ] {
        assert!(
            matches!(m.on_scores("c0", bad, 5), ReplyVerdict::Rejected(_)),
            "{name}"
        );
    }
    assert!(drain(&mut m).is_empty());
    assert_eq!(
        m.on_scores("c0", good_scores(0.5), 6),
        ReplyVerdict::Accepted
    );
    assert!(matches!(drain(&mut m).as_slice(), [Action::Completed(_)]));
}

#[test]
fn scores_from_a_client_never_sent_the_batch_are_rejected() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(1), 0);
    m.start(clients(1), 0);
    drain(&mut m);
    assert!(matches!(
        m.on_scores("stranger", good_scores(0.5), 5),
        ReplyVerdict::Rejected(_)
    ));
}

#[test]
fn restored_round_keeps_replies_and_resends_only_to_missing_clients() {
    let mut m = RoundMachine::new(7, task(), samples(), cfg(2), 0);
    m.start(clients(3), 0);
    drain(&mut m);
    m.on_scores("c0", good_scores(0.9), 10);
    let persisted: Vec<(ClientId, Reply)> = m
        .replies
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    // The process dies; a new one restores from the store.
    let mut r = RoundMachine::restore(7, task(), samples(), cfg(2), m.deadline_at(), persisted);
    assert_eq!(r.phase(), &Phase::Collecting);
    assert!(r.has_replied("c0"));
    r.join("c0".into(), 10.0, 100);
    r.join("c1".into(), 10.0, 100);
    assert_eq!(
        drain(&mut r),
        vec![Action::SendBatch {
            client: "c1".into()
        }]
    );
    assert_eq!(
        r.on_scores("c1", good_scores(0.7), 200),
        ReplyVerdict::Accepted
    );
    let done = drain(&mut r);
    let [Action::Completed(out)] = done.as_slice() else {
        panic!("{done:?}")
    };
    assert_eq!(out.contributors, vec!["c0".to_string(), "c1".to_string()]);
    assert!((out.scores[1].quality - 0.8).abs() < 1e-5);
}

#[test]
fn join_after_deadline_or_completion_sends_nothing() {
    let mut m = RoundMachine::new(1, task(), samples(), cfg(1), 0);
    m.start(clients(0), 0);
    m.join("late".into(), 1.0, 2_000);
    assert!(drain(&mut m).is_empty());
}

/// A client whose scores do not track the others' is left out of the screened mean: three
/// clients rank the four samples alike, a fourth puts everything on the intended label.
#[test]
fn the_screened_mean_leaves_out_a_client_that_does_not_track_the_others() {
    let ranked = |q: [f32; 4]| -> Vec<SampleScore> {
        samples()
            .iter()
            .zip(q)
            .map(|(s, q)| {
                let mut probs = vec![1.0 - q, 1.0 - q];
                probs[s.label as usize] = q;
                SampleScore { id: s.id, probs }
            })
            .collect()
    };
    let run = |aggregation| {
        let mut m = RoundMachine::new(
            1,
            task(),
            samples(),
            RoundConfig {
                aggregation,
                ..cfg(4)
            },
            0,
        );
        m.start(clients(4), 0);
        drain(&mut m);
        for (c, q) in [
            ("c0", [0.9, 0.2, 0.7, 0.4]),
            ("c1", [0.8, 0.3, 0.6, 0.3]),
            ("c2", [0.7, 0.1, 0.8, 0.2]),
            ("c3", [1.0, 1.0, 1.0, 1.0]),
        ] {
            assert_eq!(m.on_scores(c, ranked(q), 10), ReplyVerdict::Accepted);
        }
        let done = drain(&mut m);
        let [Action::Completed(out)] = done.as_slice() else {
            panic!("{done:?}")
        };
        // Everyone who replied is a contributor, counted or not.
        assert_eq!(out.contributors.len(), 4);
        out.scores.iter().map(|s| s.quality).collect::<Vec<_>>()
    };
    let screened = run(Aggregation::ScreenedMean { min_agreement: 0.0 });
    for (q, want) in screened.iter().zip([0.8, 0.2, 0.7, 0.3]) {
        assert!((q - want).abs() < 1e-5, "{screened:?}");
    }
    // The plain mean lets the fourth client lift every sample: the second to 0.4.
    let mean = run(Aggregation::WeightedMean);
    assert!((mean[1] - 0.4).abs() < 1e-5, "{mean:?}");
}
