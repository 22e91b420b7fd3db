//! Fuzzes a client's score reply as the coordinator receives it: a frame decoded as
//! `ClientMsg::Scores`, whose chunk the coordinator's core feeds to the SDK's `Reassembly`,
//! bounded by the round's sample count. Checks: decoding never panics; a decoded reply
//! re-encodes to a frame that decodes to the same reply bit for bit (scores are f32: NaN
//! payloads and -0.0 must survive); the reassembly returns exactly the chunks pushed and
//! refuses any push past its limit. The coordinator's own score check (`Round::validate` in
//! `coordinator/src/round/mod.rs`: every probability in [0, 1], sum within 1e-3 of 1) is in
//! the burn-heavy coordinator crate; what the SDK contributes to it is
//! `privacy::project_to_simplex`, which a noising client applies to every row: for any
//! finite row it must produce one that check accepts.
#![no_main]

use crosslm_sdk::privacy::project_to_simplex;
use crosslm_sdk::protocol::frame::{decode_frame, encode};
use crosslm_sdk::protocol::{ClientMsg, Reassembly, SampleScore, TooMany};
use libfuzzer_sys::fuzz_target;

/// The coordinator's `round::SUM_TOLERANCE`.
const SUM_TOLERANCE: f32 = 1e-3;

fn bits(scores: &[SampleScore]) -> Vec<(u64, Vec<u32>)> {
    scores
        .iter()
        .map(|s| (s.id, s.probs.iter().map(|p| p.to_bits()).collect()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some((
        ClientMsg::Scores {
            round,
            scores,
            last,
        },
        _,
    ))) = decode_frame(data)
    else {
        return;
    };
    let frame = encode(&ClientMsg::Scores {
        round,
        scores: scores.clone(),
        last,
    })
    .expect("encode");
    let Some((
        ClientMsg::Scores {
            round: r2,
            scores: s2,
            last: l2,
        },
        used,
    )) = decode_frame(&frame).expect("decode")
    else {
        panic!("re-encoded Scores decoded as another message");
    };
    assert_eq!((r2, l2, used), (round, last, frame.len()));
    assert_eq!(bits(&s2), bits(&scores));

    // Two pushes of the chunk into a reassembly of `limit` items.
    let limit = (round % 64) as usize;
    let n = scores.len();
    let mut r = Reassembly::new(round, limit);
    let too_many: Result<(), TooMany> = Err(TooMany { key: round, limit });
    match r.push(scores.clone(), false) {
        Ok(None) => assert!(n <= limit),
        Ok(Some(_)) => panic!("a chunk not marked last completed the message"),
        Err(e) => return assert!(n > limit && Err(e) == too_many),
    }
    match r.push(scores.clone(), last) {
        Ok(got) => {
            assert!(2 * n <= limit);
            assert_eq!(got.is_some(), last);
            if let Some(all) = got {
                assert_eq!(bits(&all[..n]), bits(&scores));
                assert_eq!(bits(&all[n..]), bits(&scores));
            }
        }
        Err(e) => assert!(2 * n > limit && Err(e) == too_many),
    }

    for s in &scores {
        if s.probs.is_empty() || !s.probs.iter().all(|p| p.is_finite()) {
            continue;
        }
        let mut row = s.probs.clone();
        project_to_simplex(&mut row);
        let sum: f32 = row.iter().sum();
        assert!(
            row.iter().all(|p| (0.0..=1.0).contains(p)) && (sum - 1.0).abs() <= SUM_TOLERANCE,
            "{:?} projected to {row:?} (sum {sum})",
            s.probs
        );
    }
});
