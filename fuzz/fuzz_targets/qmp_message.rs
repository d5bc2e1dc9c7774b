//! Fuzz target: what QEMU sends on its QMP socket, one JSON message a line, classified
//! as the client's reader does (`vzk_vm::qemu::qmp::parse_message`: event, reply by id,
//! error reply, other); and the VM host protocol's frames both ways
//! (`vzk_vm::hosted::protocol::parse_request`, `ServerMessage`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_vm::hosted::protocol;
use vzk_vm::qemu::qmp;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(text) = std::str::from_utf8(line) {
            let _ = qmp::parse_message(text);
        }
        let _ = protocol::parse_request(line);
        let _ = serde_json::from_slice::<protocol::ServerMessage>(line);
    }
});
