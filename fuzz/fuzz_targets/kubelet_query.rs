//! Fuzz target: the kubelet API's query strings, as a client sends them: exec/attach
//! (`?command=…&stdin=1&tty=…`), container logs (`?follow&tailLines=…&sinceTime=…`) and
//! port-forward (`?port=80,443`). Any input gives options or a 400, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_kubelet_api::fuzz;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    fuzz::exec_query(raw);
    fuzz::log_query(raw);
    if let Some(ports) = fuzz::port_forward_query(raw) {
        assert!(!ports.is_empty() && !ports.contains(&0));
    }
});
