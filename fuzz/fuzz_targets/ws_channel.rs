//! Fuzz target: what a WebSocket client sends the kubelet API after the upgrade: raw
//! RFC 6455 frames read by the server (tungstenite, as configured by the API), each
//! message split by the channel protocol (binary `[channel][payload]` or base64 text),
//! resize messages parsed; and the SPDY remotecommand resize stream
//! (`{"Width":…,"Height":…}` objects). First byte: bit 0 = base64 channel protocol,
//! bit 1 = feed the rest to the SPDY resize stream instead.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_kubelet_api::fuzz;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 2 != 0 {
        fuzz::resize_stream(rest);
    } else {
        fuzz::websocket_stream(rest, mode & 1 != 0);
    }
});
