//! Fuzzes frame decoding: whatever bytes a peer sends, decoding must return a message or
//! an error, never panic or allocate past the frame limit; and a decoded message must
//! re-encode to a frame that decodes to the same message.
#![no_main]

use crosslm_sdk::protocol::frame::{decode_frame, encode};
use crosslm_sdk::protocol::{ClientMsg, ServerMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode_frame::<ClientMsg>(data) {
        assert!(used <= data.len());
        let again = encode(&msg).expect("re-encode");
        let (back, _) = decode_frame::<ClientMsg>(&again)
            .expect("decode")
            .expect("whole frame");
        assert_eq!(format!("{back:?}"), format!("{msg:?}"));
    }
    let _ = decode_frame::<ServerMsg>(data);
});
