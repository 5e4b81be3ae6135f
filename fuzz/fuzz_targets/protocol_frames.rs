//! The host's decoder of the agent's byte stream (everything a guest sends on the control
//! channel): any bytes, split anywhere, give frames or errors — never a panic, never more
//! buffered than the payload cap allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::Decoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the stream is split, the cap keeps the search small.
    let Some((&split, stream)) = data.split_first() else { return };
    let mut d = Decoder::with_max_payload(64 * 1024);
    for piece in stream.chunks(usize::from(split).max(1)) {
        d.feed(piece);
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    // What decodes must encode again.
                    let _ = frame.to_bytes();
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => return,
                Err(_) => {}
            }
        }
        assert!(d.buffered() <= 64 * 1024 + 64 + 256, "buffered {} bytes past the cap", d.buffered());
    }
    let _ = d.finish();
});
