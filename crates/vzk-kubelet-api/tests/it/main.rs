//! Integration tests of the kubelet API against the real kube-apiserver (from
//! `vzk-testenv`) and real kubectl, in front of a provider double whose containers are
//! local processes.

mod direct;
mod kubectl;
mod load;
mod load_client;
mod runtime;
mod support;
mod top;
mod websocket;
